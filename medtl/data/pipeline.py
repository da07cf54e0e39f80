"""tf.data input pipelines over the ingested shards: rank sharding, decode, cache, shuffle, augment, batch.

Training streams are shuffled, repeated, augmented (data.augment) and batched with
drop_remainder; eval streams read every record of the split exactly once, in shard order.
Elements are (image, labels, mask): image (batch, size, size, channels) float32 in [0, 255],
labels and mask (batch, num_labels) float32. Keras uses the mask as the loss's sample weight.
With image_only (jobs that ignore labels, e.g. self-supervised pretraining) elements are the images
alone, and records without labels (`medtl ingest --unlabeled`, num_labels 0) are read too.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
from dataclasses import dataclass

import numpy as np

from medtl.config import Config
from medtl.data.augment import build_augment_fn, build_views_fn
from medtl.data.manifest import Manifest, check_input_size, read_manifest
from medtl.data.records import KEY, LABELS, MASK, PATIENT, image_feature
from medtl.data.subsets import select_subsets
from medtl.errors import MedtlError, RunFailure
from medtl.tf import tf
from medtl.utils.log import log

AUTOTUNE = tf.data.AUTOTUNE
# Shards a training stream reads at once, so records of several shards meet in the shuffle
# buffer. Reading is ~25x cheaper than decoding (docs/benchmarks.md): more buys nothing locally.
CYCLE_LENGTH = 8
# File sharding a training split needs ranks to get about as many records each: a rank with
# fewer would show each of its records more often per epoch.
MAX_RANK_IMBALANCE = 1.1
# Delimit the message of a failed in-stream shard check inside TensorFlow's error text.
_CHECK_START, _CHECK_END = "<medtl-check>", "</medtl-check>"
# Decoded, cached streams by what they hold. A memory cache lives in its dataset object, and
# training and val streams are rebuilt per phase and per epoch, so they must share one.
_CACHED: dict[tuple, tf.data.Dataset] = {}
_WARNED: set[tuple] = set()


def shard_paths(records: str, manifest: Manifest, split: str) -> list[str]:
    """Full paths of a split's shards, checked to exist (the cheap part of `medtl verify`)."""
    if split not in manifest.splits:
        raise MedtlError(
            f"split {split!r} is not in {records}/manifest.json; it has: {', '.join(manifest.splits)}"
        )
    paths = []
    for shard in manifest.splits[split].shards:
        path = f"{records.rstrip('/')}/{shard.file}"
        if not tf.io.gfile.exists(path):
            raise RunFailure(f"shard {path} listed in the manifest is missing; re-run `medtl ingest`")
        paths.append(path)
    return paths


def split_size(manifest: Manifest, split: str) -> int:
    """The split's records as ingested (records_in gives what a job reads of it)."""
    return manifest.records(split)


def records_in(cfg: Config, manifest: Manifest, split: str) -> int:
    """The records of `split` that cfg's jobs read: the train split's data.train_fraction subset, else all."""
    subset = train_subset(cfg, manifest) if split == "train" else None
    return subset.records if subset else split_size(manifest, split)


def read_split_ids(records: str, manifest: Manifest, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(patients (n,) str, labels (n, L), mask (n, L)) of every record of `split`, in shard order, without
    decoding an image (records are parsed for these three features only)."""
    files = shard_paths(records, manifest, split)
    spec = {PATIENT: tf.io.FixedLenFeature([], tf.string), LABELS: tf.io.VarLenFeature(tf.int64),
            MASK: tf.io.VarLenFeature(tf.int64)}
    ds = tf.data.TFRecordDataset(files).batch(1024).map(lambda r: tf.io.parse_example(r, spec))
    patients, labels, mask = [], [], []
    with pipeline_errors():
        for batch in ds:
            patients.extend(p.decode() for p in batch[PATIENT].numpy())
            width = manifest.num_labels
            labels.append(tf.sparse.to_dense(batch[LABELS]).numpy().reshape(-1, width))
            mask.append(tf.sparse.to_dense(batch[MASK]).numpy().reshape(-1, width))
    width = manifest.num_labels
    return (np.array(patients, dtype=object), np.concatenate(labels) if labels else np.zeros((0, width)),
            np.concatenate(mask) if mask else np.zeros((0, width)))


@dataclass(frozen=True)
class TrainSubset:
    """The train split's records that data.train_fraction keeps (medtl.data.subsets chose them)."""

    fraction: float
    patients: frozenset    # salted patient ids kept
    total_patients: int
    records: int           # records kept


_SUBSETS: dict[tuple, TrainSubset] = {}


def train_subset(cfg: Config, manifest: Manifest) -> TrainSubset | None:
    """data.train_fraction's nested, patient-level subset of the train split (medtl.data.subsets: the
    shortest prefix of the seeded patient order that holds that fraction of the images), or None when the
    fraction is 1. Read once per process and records folder."""
    fraction = cfg.data.train_fraction
    if fraction >= 1:
        return None
    key = (cfg.data.records, manifest.digest(), float(fraction), int(cfg.seed))
    if key not in _SUBSETS:
        patients, labels, mask = read_split_ids(cfg.data.records, manifest, "train")
        chosen = select_subsets(patients, labels, mask, [fraction], cfg.seed, manifest.labels,
                                where="data.train_fraction")[float(fraction)]
        subset = TrainSubset(float(fraction), frozenset(patients[chosen.rows].tolist()), len(set(patients.tolist())),
                             chosen.images)
        log(f"data.train_fraction={fraction:g}: {len(subset.patients)} of {subset.total_patients} train patients, "
            f"{subset.records} of {len(patients)} records")
        _SUBSETS[key] = subset
    return _SUBSETS[key]


def _keep_patients_fn(patients: frozenset):
    """filter_fn(shard, record) -> whether the record's patient is in `patients` (parsed, not decoded)."""
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(sorted(patients)), tf.ones(len(patients), tf.int64)),
        default_value=0)
    spec = {PATIENT: tf.io.FixedLenFeature([], tf.string)}

    def keep_fn(shard, record):
        return tf.equal(table.lookup(tf.io.parse_single_example(record, spec)[PATIENT]), 1)

    return keep_fn


def plan_shards(manifest: Manifest, split: str, files: list[str], rank: int, num_ranks: int,
                training: bool) -> tuple[list[str], bool]:
    """(this rank's files, by_file). By file when every rank gets files (and, for training, about
    as many records); otherwise every rank reads every file and keeps every num_ranks-th record."""
    if num_ranks == 1:
        return files, True
    counts = [s.records for s in manifest.splits[split].shards]
    per_rank = [sum(counts[r::num_ranks]) for r in range(num_ranks)]
    enough = len(files) >= num_ranks
    balanced = enough and max(per_rank) <= MAX_RANK_IMBALANCE * max(min(per_rank), 1)
    if enough and (balanced or not training):
        return files[rank::num_ranks], True
    key = (tuple(files), num_ranks)
    if rank == 0 and key not in _WARNED:
        _WARNED.add(key)
        reason = (f"{len(files)} shard(s) for {num_ranks} ranks" if not enough else
                  f"by file, ranks would get {min(per_rank)} to {max(per_rank)} records")
        log(f"warning: {split}: {reason}; sharding by record instead, so every rank reads every shard "
            f"({num_ranks}x the reads). Re-ingest with a smaller --shard-mb for file sharding.")
    return files, False


def _seed(*parts: int) -> int:
    """A 32-bit seed mixed from several integers (the seed, rank, epoch, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _read_fn(path, expected):
    """(shard path, serialised record) pairs of one shard; the path travels along for error messages.
    When the shard ends, its record count must be the manifest's `expected` (-1: unchecked): a
    manifest and shards that disagree fail the stream naming the shard, never train silently."""
    end_marker = tf.data.Dataset.from_tensors((tf.constant(b""), tf.constant(True)))
    marked = tf.data.TFRecordDataset(path).map(lambda record: (record, tf.constant(False))).concatenate(end_marker)

    def count_fn(count, item):
        record, last = item
        ok = tf.logical_or(tf.logical_not(last), tf.logical_or(expected < 0, tf.equal(count, expected)))
        check = _require(ok, path, "count_mismatch: ", tf.strings.as_string(count), " records, manifest says ",
                         tf.strings.as_string(expected), ". Run `medtl verify` and re-ingest or restore the shard")
        with tf.control_dependencies([check]):
            return count + 1, (record, last)

    records = (marked.scan(tf.constant(0, tf.int64), count_fn)
               .filter(lambda record, last: tf.logical_not(last)).map(lambda record, last: record))
    return tf.data.Dataset.zip((tf.data.Dataset.from_tensors(path).repeat(), records))


def build_records(files: list[str], by_file: bool, rank: int, num_ranks: int, training: bool,
                  shuffle_seed: int | None, deterministic: bool, counts: list[int] | None = None) -> tf.data.Dataset:
    """This rank's (shard, record) pairs. Training interleaves shards (shuffled per pass when
    shuffle_seed is given); eval reads them one after another, in order. `counts` (each file's
    records in the manifest) has every shard's record count checked as it is read."""
    counts = [-1] * len(files) if counts is None else [int(c) for c in counts]
    ds = tf.data.Dataset.from_tensor_slices((files, tf.constant(counts, tf.int64)))
    if not training:
        ds = ds.flat_map(_read_fn)
    else:
        if shuffle_seed is not None:
            ds = ds.shuffle(len(files), seed=shuffle_seed, reshuffle_each_iteration=True)
        # Record sharding needs the same record order on every rank, hence deterministic then.
        ds = ds.interleave(_read_fn, cycle_length=min(len(files), CYCLE_LENGTH), num_parallel_calls=AUTOTUNE,
                           deterministic=deterministic or not by_file)
    if not by_file:
        ds = ds.shard(num_ranks, rank)
    return ds


def _require(ok, shard, *message):
    """An op that fails the stream, naming the shard, when `ok` is false."""
    text = tf.strings.join([_CHECK_START, "shard ", shard, ": ", *message, _CHECK_END])
    return tf.debugging.Assert(ok, [text])


def _checked_vector(values, expected: int, shard, name: str):
    found = tf.size(values)
    check = _require(tf.equal(found, expected), shard, "a record has ", tf.strings.as_string(found),
                     f" values in '{name}' but manifest.json lists {expected} labels; shards of different "
                     "ingests cannot be mixed: re-run `medtl ingest` for this folder")
    with tf.control_dependencies([check]):
        return tf.reshape(values, [expected])  # (num_labels,)


def _checked_image(image, stored: int, shard):
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    check = _require(tf.logical_and(tf.equal(height, stored), tf.equal(width, stored)), shard,
                     "a record holds a ", tf.strings.as_string(height), "x", tf.strings.as_string(width),
                     f" px image but manifest.json says the shards hold {stored}x{stored} images; shards of different "
                     "ingests cannot be mixed: re-run `medtl ingest` for this folder")
    with tf.control_dependencies([check]):
        return tf.ensure_shape(tf.identity(image), (stored, stored, 1))


def _record_spec(encoding: str, with_ids: bool = False) -> dict:
    spec = {image_feature(encoding): tf.io.FixedLenFeature([], tf.string, default_value=""),
            LABELS: tf.io.VarLenFeature(tf.int64), MASK: tf.io.VarLenFeature(tf.int64)}
    if with_ids:
        spec.update({PATIENT: tf.io.FixedLenFeature([], tf.string), KEY: tf.io.FixedLenFeature([], tf.string)})
    return spec


def decode_stored_png(png, bit_depth: int):
    """PNG bytes at the stored bit depth -> (h, w, 1) float32 in [0, 255]."""
    dtype = tf.uint16 if int(bit_depth) == 16 else tf.uint8
    return tf.cast(tf.io.decode_png(png, channels=1, dtype=dtype), tf.float32) * (255.0 / ((1 << int(bit_depth)) - 1))


def _decode_raw(data, manifest: Manifest, shard):
    """Raw stored pixels -> (stored, stored, 1) uint8/uint16, the byte count checked against the manifest."""
    size, expected = manifest.stored_image_size, manifest.raw_image_bytes
    found = tf.strings.length(data)
    check = _require(tf.equal(found, expected), shard, "a record holds ", tf.strings.as_string(found),
                     f" image bytes but manifest.json says the shards hold {size}x{size} {manifest.bit_depth}-bit raw "
                     f"images ({expected} bytes each); the shard is damaged or not the manifest's: re-run "
                     "`medtl ingest` for this folder")
    with tf.control_dependencies([check]):
        pixels = tf.io.decode_raw(data, tf.uint16 if manifest.bit_depth == 16 else tf.uint8, little_endian=True)
    return tf.reshape(pixels, (size, size, 1))


def decode_stored(data, manifest: Manifest, shard):
    """A record's stored image (manifest.encoding) -> (stored, stored, 1) float32 in [0, 255], checked
    against the manifest's size (a failed check names the shard)."""
    if manifest.encoding == "raw":
        scale = 255.0 / ((1 << manifest.bit_depth) - 1)
        return tf.cast(_decode_raw(data, manifest, shard), tf.float32) * scale
    return _checked_image(decode_stored_png(data, manifest.bit_depth), manifest.stored_image_size, shard)


def resize_stored(image, stored_size: int, image_size: int):
    """(stored, stored, 1) -> (image_size, image_size, 1): area averages when shrinking (no aliasing),
    bilinear when enlarging."""
    if stored_size != image_size:
        image = tf.image.resize(image, (image_size, image_size), method="area" if stored_size > image_size
                                else "bilinear")
    return tf.ensure_shape(image, (image_size, image_size, 1))


def to_channels(images, channels: int):
    """Gray images to the model's channel count (repeated for RGB backbones)."""
    images = tf.cast(images, tf.float32)
    return tf.image.grayscale_to_rgb(images) if channels == 3 else images


def _stored_scale(dtype) -> float:
    """The factor from a stream's pixels to [0, 255]: stored 16-bit pixels are scaled, 8-bit and float32 ones
    already are in [0, 255]."""
    return 255.0 / 65535.0 if dtype == tf.uint16 else 1.0


def _stream_to_channels(images, channels: int):
    """to_channels for tf.data, which always runs on the CPU: there an outer product with ones(1, 3) (exact:
    each value times 1.0) costs about 0.2 ms per 380 px image against 0.4-0.9 ms for grayscale_to_rgb's
    tile, about half of a decode-free stream's work (docs/benchmarks.md). The export keeps the tile: on a
    GPU, TF32 matmuls would round. uint16 images are stored 16-bit pixels (build_decode_fn's stored_pixels):
    the product scales them to [0, 255] with decode_stored's one float32 multiply, so the values are its own."""
    scale = _stored_scale(images.dtype)
    images = tf.cast(images, tf.float32)
    if channels != 3:
        return images * scale if scale != 1.0 else images
    shape = tf.shape(images)  # (..., size, size, 1)
    rgb = tf.linalg.matmul(tf.reshape(images, (-1, 1)), tf.fill((1, 3), tf.constant(scale, tf.float32)))
    return tf.reshape(rgb, tf.concat([shape[:-1], [3]], 0))


def build_resize_fn(stored_size: int, image_size: int, channels: int):
    """(stored, stored, 1) float32 in [0, 255] -> the model input: the eval stream's preprocessing,
    also used by the exported SavedModel (medtl.serve.export) so serving sees training's pixels."""

    def resize_fn(image):
        return to_channels(resize_stored(image, stored_size, image_size), channels)

    return resize_fn


def build_parse_fn(manifest: Manifest, with_ids: bool = False):
    """parse_fn(shard, record) -> (stored image bytes, labels (L,) int64, mask (L,) int64[, patient, key]),
    checked against the manifest."""
    num_labels = manifest.num_labels
    spec = _record_spec(manifest.encoding, with_ids)
    image_key = image_feature(manifest.encoding)

    def parse_fn(shard, record):
        ex = tf.io.parse_single_example(record, spec)
        labels = _checked_vector(ex[LABELS].values, num_labels, shard, LABELS)
        mask = _checked_vector(ex[MASK].values, num_labels, shard, MASK)
        empty = _require(tf.strings.length(ex[image_key]) > 0, shard, f"a record has no image ('{image_key}', the "
                         f"feature of {manifest.encoding} records); the shard is damaged or not written by medtl: "
                         "re-run `medtl ingest` for this folder")
        with tf.control_dependencies([empty]):
            data = tf.identity(ex[image_key])
        return (data, labels, mask) + ((ex[PATIENT], ex[KEY]) if with_ids else ())

    return parse_fn


def keeps_stored_pixels(manifest: Manifest, image_size: int, quantise: bool) -> bool:
    """Whether a stream's decode keeps the stored integers of raw shards stored at the input size: they go
    through the shuffle buffer and batching as uint8/uint16 (half or a quarter of float32's bytes) and are
    scaled to [0, 255] per batch by model_input_fn, in the same multiply."""
    return manifest.encoding == "raw" and manifest.stored_image_size == image_size and not quantise


def build_decode_fn(manifest: Manifest, image_size: int, quantise: bool, with_ids: bool = False,
                    stored_pixels: bool = False):
    """decode_fn(shard, record) -> (image (size, size, 1), labels (L,), mask (L,)[, patient, key]).
    The image is float32 in [0, 255], rounded to uint8 when `quantise` (what albumentations takes). With
    `stored_pixels`, where keeps_stored_pixels holds, it is the stored uint8/uint16 pixels instead: only
    for streams that end in build_model_input_fn, which scales them."""
    parse_fn = build_parse_fn(manifest, with_ids)
    stored = manifest.stored_image_size
    keep = stored_pixels and keeps_stored_pixels(manifest, image_size, quantise)

    def decode_fn(shard, record):
        data, labels, mask, *ids = parse_fn(shard, record)
        if keep:
            return (_decode_raw(data, manifest, shard), tf.cast(labels, tf.float32), tf.cast(mask, tf.float32), *ids)
        image = decode_stored(data, manifest, shard)  # (stored, stored, 1)
        image = resize_stored(image, stored, image_size)
        if quantise:
            image = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
        return (image, tf.cast(labels, tf.float32), tf.cast(mask, tf.float32), *ids)

    return decode_fn


def _cache_name(cfg: Config, manifest: Manifest, split: str, rank: int, num_ranks: int, training: bool,
                quantise: bool) -> str:
    """A cache file prefix that changes whenever what it holds would: tf.data never checks."""
    subset = [cfg.data.train_fraction, cfg.seed] if split == "train" and cfg.data.train_fraction < 1 else []
    content = json.dumps([cfg.data.records, manifest.splits[split].to_dict(), manifest.stored_image_size,
                          manifest.bit_depth] + subset, sort_keys=True)
    digest = hashlib.sha256(content.encode()).hexdigest()[:12]
    mode = "train" if training else "eval"
    pixels = "u8" if quantise else "stored" if keeps_stored_pixels(manifest, cfg.data.image_size, quantise) else "f32"
    return (f"{cfg.data.cache.rstrip('/')}/{split}-{mode}-{cfg.data.image_size}px-{pixels}"
            f"-rank{rank}of{num_ranks}-{digest}")


def build_decoded(cfg: Config, manifest: Manifest, split: str, rank: int, num_ranks: int, training: bool,
                  quantise: bool, first_epoch: int, with_ids: bool = False) -> tf.data.Dataset:
    """This rank's decoded (image, labels, mask[, patient, key]) records before the shuffle buffer,
    cached if asked."""
    check_input_size(cfg.data.records, manifest, cfg.data.image_size, cfg.data.allow_upsample)
    files = shard_paths(cfg.data.records, manifest, split)
    expected = {f"{cfg.data.records.rstrip('/')}/{shard.file}": shard.records
                for shard in manifest.splits[split].shards}
    files, by_file = plan_shards(manifest, split, files, rank, num_ranks, training)
    counts = [expected[f] for f in files]
    decode_fn = build_decode_fn(manifest, cfg.data.image_size, quantise, with_ids, stored_pixels=True)
    deterministic = cfg.data.deterministic or not training
    subset = train_subset(cfg, manifest) if split == "train" else None

    def records_fn(shuffle_seed):
        ds = build_records(files, by_file, rank, num_ranks, training, shuffle_seed, deterministic, counts)
        return ds.filter(_keep_patients_fn(subset.patients)) if subset else ds

    if cfg.data.cache == "none":
        # Shards are shuffled per pass only when this rank owns them: record sharding needs the same
        # record order on every rank, so each rank keeps the same records every pass.
        shuffle_seed = _seed(cfg.seed, rank, first_epoch) if by_file else None
        return records_fn(shuffle_seed).map(decode_fn, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    key = (cfg.data.records, split, rank, num_ranks, training, quantise, with_ids, cfg.data.image_size,
           cfg.data.cache, deterministic, json.dumps(manifest.splits[split].to_dict(), sort_keys=True),
           cfg.data.train_fraction if subset else 1.0, cfg.seed if subset else 0)
    if key not in _CACHED:
        # Shard order is fixed when cached: the cache replays the first pass, the shuffle buffer mixes.
        ds = records_fn(None).map(decode_fn, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
        if cfg.data.cache == "memory":
            _CACHED[key] = ds.cache()
        else:
            tf.io.gfile.makedirs(cfg.data.cache)
            _CACHED[key] = ds.cache(_cache_name(cfg, manifest, split, rank, num_ranks, training, quantise)
                                    + ("-ids" if with_ids else ""))
    return _CACHED[key]


def sample_counts(manifest: Manifest, split: str, images: int) -> list[int]:
    """Records a fixed sample of `images` takes from the head of each shard of `split` (every record when
    the split is smaller): in proportion to the shards' sizes, largest remainders rounded up."""
    counts = [s.records for s in manifest.splits[split].shards]
    total = sum(counts)
    if images >= total:
        return counts
    exact = [images * c / total for c in counts]
    takes = [int(e) for e in exact]
    for i in sorted(range(len(counts)), key=lambda i: takes[i] - exact[i])[:images - sum(takes)]:
        takes[i] += 1
    return takes


def sample_size(cfg: Config, manifest: Manifest, split: str, images: int) -> int:
    """The records build_sample_dataset reads: sample_counts' total, or from data.train_fraction's subset."""
    subset = train_subset(cfg, manifest) if split == "train" else None
    return min(images, subset.records) if subset else sum(sample_counts(manifest, split, images))


def build_sample_dataset(cfg: Config, manifest: Manifest, split: str, images: int, rank: int = 0,
                         num_ranks: int = 1) -> tf.data.Dataset:
    """An eval stream of a fixed sample of `split`, e.g. the train images scored each epoch beside val:
    the first records of every shard (sample_counts), decoded and batched like an eval stream, never
    augmented. Ingest writes a split's records in a seeded random order, so a shard's head is a random
    sample of it, and only the sample is read. The same records whatever the rank count: each rank keeps
    every num_ranks-th of them."""
    files = shard_paths(cfg.data.records, manifest, split)
    subset = train_subset(cfg, manifest) if split == "train" else None
    takes = tf.constant(sample_counts(manifest, split, images), tf.int64)

    def head_fn(path, take):
        return tf.data.Dataset.zip((tf.data.Dataset.from_tensors(path).repeat(),
                                    tf.data.TFRecordDataset(path).take(take)))

    if subset:  # data.train_fraction: the sample's images come from the subset, in shard order
        ds = tf.data.Dataset.from_tensor_slices((files, tf.fill([len(files)], tf.constant(-1, tf.int64))))
        ds = ds.flat_map(head_fn).filter(_keep_patients_fn(subset.patients)).take(images)
    else:
        ds = tf.data.Dataset.from_tensor_slices((files, takes)).flat_map(head_fn)
    ds = ds.shard(num_ranks, rank)
    ds = ds.map(build_decode_fn(manifest, cfg.data.image_size, quantise=False, stored_pixels=True),
                num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.batch(cfg.train.batch_size).map(build_model_input_fn(cfg.data.channels), num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE)


def build_model_input_fn(channels: int):
    def model_input_fn(images, labels, mask, *ids):  # (batch, size, size, 1) -> (batch, size, size, channels)
        return (_stream_to_channels(images, channels), labels, mask, *ids)

    return model_input_fn


def device_step(cfg: Config) -> bool:
    """Whether training streams leave scaling, augmentation and channels to the training step
    (data.augment_on: device)."""
    return cfg.data.augment_on == "device"


def build_step_inputs_fn(cfg: Config, rank: int, first_epoch: int):
    """For data.augment_on: device, the training step's first op: (batch of a device-step stream, step) ->
    the model's input. Stored uint8/uint16 pixels (or float32 in [0, 255]) are scaled to [0, 255], augmented
    by the policy as TensorFlow ops (medtl.data.device_augment), seeded by (seed, rank, first_epoch) and the
    step, and turned into the model's channels. It runs where the step runs: on the GPU when there is one."""
    from medtl.data.device_augment import build_device_augment

    augment = (build_device_augment(cfg.data.augment, _seed(cfg.seed, rank, first_epoch), cfg.data.deterministic)
               if cfg.data.augment else None)
    channels = cfg.data.channels

    def step_inputs_fn(images, step):
        scale = _stored_scale(images.dtype)
        images = tf.cast(images, tf.float32) * scale if scale != 1.0 else tf.cast(images, tf.float32)
        if augment is not None:
            images = augment(images, step)
        return to_channels(images, channels)

    return step_inputs_fn


def build_dataset(cfg: Config, split: str, rank: int = 0, num_ranks: int = 1, manifest: Manifest | None = None,
                  training: bool | None = None, first_epoch: int = 0, with_ids: bool = False,
                  image_only: bool = False) -> tf.data.Dataset:
    """The batched dataset of `split` for one rank. Training streams repeat forever; their shuffles
    and augmentations are seeded by (seed, rank, first_epoch, position in the stream), so build
    one per phase with the epoch it starts at (a resumed run does not replay epoch 1).

    with_ids (eval streams) adds the salted patient and record-key hashes: (image, labels, mask, patient, key).
    image_only gives the images alone, (batch, size, size, channels), and accepts unlabeled records; the
    stream is otherwise the same (shuffle, augmentation, rank sharding, cache).
    """
    if with_ids and image_only:
        raise ValueError("with_ids and image_only exclude each other")
    manifest = manifest or read_manifest(cfg.data.records, unlabeled_ok=image_only)
    training = split == "train" if training is None else training
    on_device = training and device_step(cfg) and not image_only
    augment = training and bool(cfg.data.augment) and not on_device
    deterministic = cfg.data.deterministic or not training
    if with_ids and training:
        raise ValueError("with_ids is for eval streams")
    # 8-bit images through the shuffle buffer when augmenting: what albumentations takes on the CPU, and on the
    # device a quarter of float32's bytes (raw shards at the input size keep their stored pixels instead).
    quantise = augment or (on_device and bool(cfg.data.augment)
                           and not keeps_stored_pixels(manifest, cfg.data.image_size, False))
    ds = build_decoded(cfg, manifest, split, rank, num_ranks, training, quantise, first_epoch, with_ids)
    if training:
        ds = ds.shuffle(cfg.data.shuffle_buffer, seed=_seed(cfg.seed, rank, first_epoch),
                        reshuffle_each_iteration=True)
        # tf.data fuses shuffle + repeat into one op that refills the buffer from the next pass while
        # it drains: no stall at pass ends, but a pass's last records may come after the next pass's first.
        if on_device:  # the training step scales, augments and makes the channels (build_step_inputs_fn)
            ds = ds.repeat().batch(cfg.train.batch_size, drop_remainder=True)
        else:
            ds = ds.repeat().enumerate()  # (position, (image, labels, mask)): positions seed augmentation
            ds = ds.batch(cfg.train.batch_size, drop_remainder=True)
            if augment:
                ds = ds.map(build_augment_fn(cfg.data.augment, (cfg.seed, rank, first_epoch)),
                            num_parallel_calls=AUTOTUNE, deterministic=deterministic)
            else:
                ds = ds.map(lambda positions, batch: batch)
    else:
        ds = ds.batch(cfg.train.batch_size)
    if not on_device:
        ds = ds.map(build_model_input_fn(cfg.data.channels), num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    if image_only:
        ds = ds.map(lambda images, labels, mask: images)  # (batch, size, size, channels)
    options = tf.data.Options()
    options.deterministic = deterministic
    return ds.with_options(options).prefetch(AUTOTUNE)


def build_views_dataset(cfg: Config, rank: int = 0, num_ranks: int = 1, manifest: Manifest | None = None,
                        first_epoch: int = 0) -> tf.data.Dataset:
    """The self-supervised (simclr) training stream of one rank: batches (2 * batch, size, size, channels)
    float32 in [0, 255], two views of each of train.batch_size train images (pretrain.view_policy): views a,
    then views b. Labels are dropped unread, so records with no labels train the same. Shuffle, repeat,
    rank sharding and seeds are the training stream's; batches are whole (drop_remainder), so every rank
    holds the same number of images, as gathering the projections needs."""
    manifest = manifest or read_manifest(cfg.data.records, unlabeled_ok=True)
    deterministic = cfg.data.deterministic
    ds = build_decoded(cfg, manifest, "train", rank, num_ranks, True, True, first_epoch)
    ds = ds.map(lambda image, labels, mask: image)  # (size, size, 1) uint8
    ds = ds.shuffle(cfg.data.shuffle_buffer, seed=_seed(cfg.seed, rank, first_epoch), reshuffle_each_iteration=True)
    ds = ds.repeat().enumerate().batch(cfg.train.batch_size, drop_remainder=True)
    policy = cfg.pretrain.view_policy(cfg.data.image_size, cfg.data.augment)
    ds = ds.map(build_views_fn(policy, (cfg.seed, rank, first_epoch)), num_parallel_calls=AUTOTUNE,
                deterministic=deterministic)
    ds = ds.map(lambda views: _stream_to_channels(views, cfg.data.channels), num_parallel_calls=AUTOTUNE,
                deterministic=deterministic)
    options = tf.data.Options()
    options.deterministic = deterministic
    return ds.with_options(options).prefetch(AUTOTUNE)


def _unescape(text: str) -> str:
    """Undo the C escapes TensorFlow applies to quotes and backslashes in assertion messages."""
    return re.sub(r"\\(['\"\\])", r"\1", text)


def as_user_error(exc: Exception) -> MedtlError | None:
    """The MedtlError for a failed shard check or a locked cache met inside tf.data, else None."""
    text = str(getattr(exc, "message", exc))
    match = re.search(re.escape(_CHECK_START) + "(.*?)" + re.escape(_CHECK_END), text, re.S)
    if match:
        return RunFailure(_unescape(match.group(1)))
    match = re.search(r"cache lockfile already exists \('([^']+)'\)", text)
    if match:
        return RunFailure(f"data.cache: {match.group(1)} exists: another run is writing this cache, or one was "
                          "interrupted while writing it; if no other run uses it, delete that file")
    return None


@contextlib.contextmanager
def pipeline_errors():
    """Wrap code that iterates a dataset: input errors raised inside tf.data become one MedtlError."""
    try:
        yield
    except tf.errors.OpError as exc:
        converted = as_user_error(exc)
        if converted is None:
            raise
        raise converted from None
