"""The TFRecord schema: what one record carries, and nothing more.

Allow-list: the stored image (PNG bytes under image/png, or raw pixels under image/raw, by the
manifest's encoding), labels, label mask, a salted hash of the patient, a salted hash of the image key,
and (only if asked for) a few non-identifying fields (medtl.data.fields). Patient names, IDs, dates and
accession numbers have no field to go into.
"""
from __future__ import annotations

from medtl.data.fields import SAFE_FIELDS
from medtl.tf import tf

IMAGE = "image/png"
IMAGE_RAW = "image/raw"  # records of `medtl ingest --encoding raw`
LABELS = "labels"
MASK = "mask"
PATIENT = "patient"
KEY = "key"
FIELD_PREFIX = "field/"
ALLOWED_FEATURES = (IMAGE, IMAGE_RAW, LABELS, MASK, PATIENT, KEY) + tuple(FIELD_PREFIX + f for f in SAFE_FIELDS)


def image_feature(encoding: str) -> str:
    """The feature holding the image in records of this encoding (medtl.data.decode.ENCODINGS)."""
    return IMAGE_RAW if encoding == "raw" else IMAGE


def encode_example(image: bytes, labels, mask, patient_hash: str, key_hash: str,
                   fields: dict[str, str] | None = None, encoding: str = "png") -> bytes:
    """One serialised tf.train.Example (deterministic bytes for the same inputs); `image` holds the
    stored bytes of `encoding`."""
    unknown = set(fields or {}) - set(SAFE_FIELDS)
    if unknown:  # the allow-list is enforced here, whatever the caller passes
        raise ValueError(f"fields {sorted(unknown)} are not on the record allow-list {SAFE_FIELDS}")
    feature = {
        image_feature(encoding): tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
        LABELS: tf.train.Feature(int64_list=tf.train.Int64List(value=list(labels))),
        MASK: tf.train.Feature(int64_list=tf.train.Int64List(value=list(mask))),
        PATIENT: tf.train.Feature(bytes_list=tf.train.BytesList(value=[patient_hash.encode()])),
        KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[key_hash.encode()])),
    }
    for name, value in sorted((fields or {}).items()):
        feature[FIELD_PREFIX + name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value.encode()]))
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    return example.SerializeToString(deterministic=True)


def feature_spec(num_labels: int, encoding: str = "png") -> dict:
    return {
        image_feature(encoding): tf.io.FixedLenFeature([], tf.string),
        LABELS: tf.io.FixedLenFeature([num_labels], tf.int64),
        MASK: tf.io.FixedLenFeature([num_labels], tf.int64),
        PATIENT: tf.io.FixedLenFeature([], tf.string),
        KEY: tf.io.FixedLenFeature([], tf.string),
    }


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def read_fields(paths: list[str], names: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """{record key: {field: value}} for every record of the shards, parsing only the key and the fields
    (not the image): what subgroup reports need beside the predictions. A missing field reads ""."""
    spec = {KEY: tf.io.FixedLenFeature([], tf.string),
            **{FIELD_PREFIX + n: tf.io.FixedLenFeature([], tf.string, default_value="") for n in names}}
    out = {}
    for batch in tf.data.TFRecordDataset(paths).batch(1024).map(lambda raw: tf.io.parse_example(raw, spec)):
        values = {n: batch[FIELD_PREFIX + n].numpy() for n in names}
        for i, key in enumerate(batch[KEY].numpy()):
            out[key.decode()] = {n: values[n][i].decode() for n in names}
    return out
