"""tf.data input pipelines over the ingested shards.

Training streams are shuffled, repeated and batched with drop_remainder; eval
streams read every record of the split exactly once, in shard order.
Elements are (image, labels, mask): image (batch, size, size, channels) float32
in [0, 255], labels and mask (batch, num_labels) float32. Keras uses the mask
as the loss's sample weight.
"""
from __future__ import annotations

from medtl.config import Config
from medtl.data.records import IMAGE, KEY, LABELS, MASK, PATIENT, feature_spec
from medtl.errors import MedtlError
from medtl.tf import tf
from medtl.utils.log import log

AUTOTUNE = tf.data.AUTOTUNE


def shard_paths(records: str, manifest: dict, split: str) -> list[str]:
    """Full paths of a split's shards, checked to exist (the cheap part of `medtl verify`)."""
    if split not in manifest["splits"]:
        raise MedtlError(
            f"split {split!r} is not in {records}/manifest.json; it has: {', '.join(manifest['splits'])}"
        )
    paths = []
    for shard in manifest["splits"][split]["shards"]:
        path = f"{records.rstrip('/')}/{shard['file']}"
        if not tf.io.gfile.exists(path):
            raise MedtlError(f"shard {path} listed in the manifest is missing; re-run `medtl ingest`")
        paths.append(path)
    return paths


def split_size(manifest: dict, split: str) -> int:
    return int(manifest["splits"][split]["records"])


def decode_stored_png(png, bit_depth: int):
    """PNG bytes at the stored bit depth -> (h, w, 1) float32 in [0, 255]."""
    dtype = tf.uint16 if int(bit_depth) == 16 else tf.uint8
    scale = 255.0 / float((1 << int(bit_depth)) - 1)
    return tf.cast(tf.io.decode_png(png, channels=1, dtype=dtype), tf.float32) * scale


def build_resize_fn(stored_size: int, image_size: int, channels: int):
    """(stored, stored, 1) float32 in [0, 255] -> (image_size, image_size, channels), what the model sees."""

    def resize_fn(image):
        if stored_size != image_size:
            image = tf.image.resize(image, (image_size, image_size), method="area" if stored_size > image_size
                                    else "bilinear")
        image = tf.ensure_shape(image, (image_size, image_size, 1))
        if channels == 3:
            image = tf.image.grayscale_to_rgb(image)
        return image

    return resize_fn


def build_image_fn(bit_depth: int, stored_size: int, image_size: int, channels: int):
    """PNG bytes as stored by ingest -> (image_size, image_size, channels) float32 in [0, 255].

    The model's input preprocessing; the exported SavedModel (medtl.serve.export) uses
    the same two steps, so serving sees exactly the pixels training saw.
    """
    resize_fn = build_resize_fn(stored_size, image_size, channels)

    def image_fn(png):
        return resize_fn(decode_stored_png(png, bit_depth))  # (stored, stored, 1) -> model input

    return image_fn


def _decode_fn(manifest: dict, image_size: int, channels: int, with_ids: bool = False):
    num_labels = len(manifest["labels"])
    spec = feature_spec(num_labels)
    image_fn = build_image_fn(int(manifest["bit_depth"]), int(manifest["image_size"]), image_size, channels)

    def parse_fn(record):
        ex = tf.io.parse_single_example(record, spec)
        out = (image_fn(ex[IMAGE]), tf.cast(ex[LABELS], tf.float32), tf.cast(ex[MASK], tf.float32))
        return out + ((ex[PATIENT], ex[KEY]) if with_ids else ())

    return parse_fn


def build_dataset(cfg: Config, split: str, rank: int = 0, num_ranks: int = 1, manifest: dict | None = None,
                  training: bool | None = None, first_epoch: int = 0, with_ids: bool = False) -> tf.data.Dataset:
    """The batched dataset of `split` for one rank. Training streams repeat forever; their order is
    seeded by (seed, rank, first_epoch), so a resumed run does not replay epoch 1's order.

    with_ids adds the salted patient and record-key hashes: (image, labels, mask, patient, key).
    """
    from medtl.data.ingest import read_manifest

    manifest = manifest or read_manifest(cfg.data.records)
    training = split == "train" if training is None else training
    files = shard_paths(cfg.data.records, manifest, split)
    by_file = len(files) >= num_ranks
    if num_ranks > 1 and not by_file and rank == 0:
        log(f"warning: {split} has {len(files)} shard(s) for {num_ranks} ranks; sharding by record, "
            "so every rank reads every shard. Re-ingest with smaller --shard-mb for file sharding.")
    ds = tf.data.Dataset.from_tensor_slices(files)
    if num_ranks > 1 and by_file:
        ds = ds.shard(num_ranks, rank)
    seed = (cfg.seed * 1_000_003 + first_epoch * 7919 + rank) % (2 ** 31)
    if training:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
        ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(len(files), 8),
                           num_parallel_calls=AUTOTUNE, deterministic=False)
    else:
        ds = ds.flat_map(tf.data.TFRecordDataset)  # shard order, every record once
    if num_ranks > 1 and not by_file:
        ds = ds.shard(num_ranks, rank)
    if training:
        ds = ds.shuffle(cfg.data.shuffle_buffer, seed=seed + 1, reshuffle_each_iteration=True)
        ds = ds.repeat()
    ds = ds.map(_decode_fn(manifest, cfg.data.image_size, cfg.data.channels, with_ids), num_parallel_calls=AUTOTUNE,
                deterministic=not training)
    ds = ds.batch(cfg.train.batch_size, drop_remainder=training)
    return ds.prefetch(AUTOTUNE)
