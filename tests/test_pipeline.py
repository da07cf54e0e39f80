"""The input pipeline as training and evaluation use it: shapes, rank sharding, exactly-once eval,
seeded augmentation, masks through to the loss, caches, and shards that do not match the manifest."""
import glob
import hashlib
import os

import numpy as np
import pytest

from medtl.config import load_config
from medtl.data import pipeline
from medtl.data.decode import encode_png, encode_stored
from medtl.data.manifest import Manifest, Shard, SplitInfo, read_manifest, write_manifest
from medtl.data.pipeline import build_dataset, pipeline_errors, plan_shards
from medtl.data.records import encode_example, shard_name
from medtl.errors import MedtlError
from medtl.tf import tf

from conftest import JOBS, assert_user_error, run_cli

NUM_LABELS = 3


def record_image(index: int, size: int) -> np.ndarray:
    """A flat [0, 1] image whose grey level encodes the record's index (survives any resize)."""
    return np.full((size, size), (1000 + 100 * index) / 65535, np.float32)


def index_of(image: np.ndarray) -> int:
    """The record index of a decoded, unaugmented image (float32 in [0, 255])."""
    return int(round((float(image.mean()) * 65535 / 255 - 1000) / 100))


def labels_of(index: int) -> list[int]:
    return [(index >> bit) & 1 for bit in range(NUM_LABELS)]


def mask_of(index: int) -> list[int]:
    return [1, 0 if index % 3 == 0 else 1, 1]


def write_records(out, shards: dict[str, list[int]], size: int = 32, num_labels: int = NUM_LABELS,
                  bad_shard: tuple[str, int] | None = None, bad: dict | None = None, encoding: str = "png") -> Manifest:
    """Shards in `medtl ingest`'s layout: shards[split] lists records per shard; indices run on
    across splits. `bad` (image_size / num_labels / png: the stored bytes) applies to the records of `bad_shard`."""
    os.makedirs(out, exist_ok=True)
    index = 0
    splits = {}
    for split, counts in shards.items():
        files = []
        for i, count in enumerate(counts):
            name = shard_name(split, i, len(counts))
            broken = bad if bad_shard == (split, i) else {}
            with tf.io.TFRecordWriter(os.path.join(out, name)) as writer:
                for _ in range(count):
                    png = broken.get("png", encode_stored(record_image(index, broken.get("image_size", size)), 16,
                                                          encoding))
                    labels = (labels_of(index) + [0] * 8)[:broken.get("num_labels", num_labels)]
                    mask = (mask_of(index) + [1] * 8)[:broken.get("num_labels", num_labels)]
                    writer.write(encode_example(png, labels, mask, "p", str(index), encoding=encoding))
                    index += 1
            path = os.path.join(out, name)
            files.append(Shard(file=name, records=count, bytes=os.path.getsize(path),
                               sha256=hashlib.sha256(open(path, "rb").read()).hexdigest()))
        splits[split] = SplitInfo(records=sum(counts), shards=tuple(files))
    manifest = Manifest(labels=tuple(f"L{i}" for i in range(num_labels)), stored_image_size=size, bit_depth=16,
                        channels=1, splits=splits, encoding=encoding)
    write_manifest(str(out), manifest)
    return manifest


def cfg_for(records, *overrides):
    return load_config(os.path.join(JOBS, "smoke.yaml"),
                       [f"data.records={records}", "data.image_size=32", "train.batch_size=2", *overrides])


def take(ds, batches):
    return [tuple(t.numpy() for t in batch) for batch, _ in zip(ds, range(batches))]


def stream_indices(ds, records):
    """Record indices of the first `records` training images (augmentation off)."""
    seen = []
    for images, _, _ in ds:
        seen += [index_of(im) for im in images.numpy()]
        if len(seen) >= records:
            return seen[:records]


@pytest.fixture
def small(tmp_path):
    """4 train shards of 5 records (indices 0-19), val 3+3+2 (20-27), test 4 (28-31)."""
    write_records(tmp_path / "rec", {"train": [5, 5, 5, 5], "val": [3, 3, 2], "test": [4]})
    return tmp_path / "rec"


def test_shapes_dtypes_and_ranges(small):
    cfg = cfg_for(small)
    images, labels, mask = take(build_dataset(cfg, "train"), 1)[0]
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.float32
    assert labels.shape == mask.shape == (2, NUM_LABELS) and labels.dtype == mask.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 255.0
    eval_batches = take(build_dataset(cfg, "val"), 10)
    assert [b[0].shape for b in eval_batches] == [(2, 32, 32, 3)] * 4  # 8 records, nothing dropped
    odd = take(build_dataset(cfg_for(small, "train.batch_size=3", "data.channels=1"), "val"), 10)
    assert [b[0].shape for b in odd] == [(3, 32, 32, 1), (3, 32, 32, 1), (2, 32, 32, 1)]  # last batch kept


def test_resize_from_stored_size(tmp_path):
    write_records(tmp_path / "big", {"train": [4], "val": [2]}, size=64)
    cfg = cfg_for(tmp_path / "big", "data.image_size=40", "data.augment=[]")
    images = take(build_dataset(cfg, "val"), 1)[0][0]
    assert images.shape == (2, 40, 40, 3)
    assert [index_of(im) for im in images] == [4, 5]  # area resize keeps the grey level


def test_raw_and_png_records_give_the_same_streams(tmp_path):
    """Raw pixels read with a reshape are the PNG records' decoded pixels: eval and (unaugmented) training."""
    shards = {"train": [6, 6], "val": [5]}
    streams = {}
    for encoding in ("png", "raw"):
        write_records(tmp_path / encoding, shards, size=40, encoding=encoding)
        cfg = cfg_for(tmp_path / encoding, "data.augment=[]", "data.channels=3", "data.deterministic=true")
        streams[encoding] = [take(build_dataset(cfg, "val"), 3), take(build_dataset(cfg, "train"), 4)]
    for png, raw in zip(*streams.values()):
        for a, b in zip(png, raw):
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y)
    images = streams["raw"][0][0][0]  # (batch, 32, 32, 3): gray repeated, levels kept by the area resize
    assert images.shape[-1] == 3 and (images[..., 0] == images[..., 2]).all()
    assert index_of(images[0]) == 12


def test_stream_channels_equal_the_exports(tmp_path):
    """The stream's gray -> RGB (an outer product) gives the export's grayscale_to_rgb values exactly."""
    values = tf.constant(np.random.default_rng(0).uniform(0, 255, (2, 5, 7, 1)).astype(np.float32))
    np.testing.assert_array_equal(pipeline._stream_to_channels(values, 3).numpy(),
                                  pipeline.to_channels(values, 3).numpy())
    np.testing.assert_array_equal(pipeline._stream_to_channels(values, 1).numpy(), values.numpy())


def test_eval_reads_every_record_once_in_shard_order(small):
    cfg = cfg_for(small, "train.batch_size=3")
    for split, first, count in (("val", 20, 8), ("test", 28, 4), ("train", 0, 20)):
        got = [index_of(im) for b in build_dataset(cfg, split, training=False) for im in b[0].numpy()]
        assert got == list(range(first, first + count)), split


@pytest.mark.parametrize("num_ranks, by_file", [(2, True), (3, False), (5, False)])
def test_eval_ranks_are_disjoint_and_cover_the_split(small, num_ranks, by_file):
    cfg = cfg_for(small)
    manifest = read_manifest(str(small))
    files = pipeline.shard_paths(str(small), manifest, "val")
    assert plan_shards(manifest, "val", files, 0, num_ranks, training=False)[1] == (len(files) >= num_ranks)
    per_rank = [[index_of(im) for b in build_dataset(cfg, "val", r, num_ranks) for im in b[0].numpy()]
                for r in range(num_ranks)]
    flat = [i for rank in per_rank for i in rank]
    assert sorted(flat) == list(range(20, 28))  # every record once over all ranks


@pytest.mark.parametrize("num_ranks, by_file", [(2, True), (3, False), (5, False)])
def test_training_ranks_are_disjoint_and_cover_the_split(small, num_ranks, by_file):
    # 4 shards of 5: 2 ranks split them evenly (by file); 3 ranks would get 10/5/5 records and
    # 5 ranks are more than the shards (by record).
    cfg = cfg_for(small, "data.augment=[]", "train.batch_size=1")
    manifest = read_manifest(str(small))
    files = pipeline.shard_paths(str(small), manifest, "train")
    assert plan_shards(manifest, "train", files, 0, num_ranks, training=True)[1] is by_file
    owned = []
    for rank in range(num_ranks):
        size = 10 if by_file else len(range(rank, 20, num_ranks))
        seen = stream_indices(build_dataset(cfg, "train", rank, num_ranks), 3 * size)
        owned.append(set(seen))
        assert len(owned[-1]) == size  # a rank keeps to its records, pass after pass
    assert sorted(i for rank in owned for i in rank) == list(range(20))  # disjoint, and every record


def test_training_stream_is_shuffled_and_repeats(small):
    cfg = cfg_for(small, "data.augment=[]", "train.batch_size=1")
    seen = stream_indices(build_dataset(cfg, "train"), 60)
    # Three passes; the fused shuffle + repeat may let a record of one pass slip past the boundary.
    assert set(seen) == set(range(20)) and all(2 <= seen.count(i) <= 4 for i in range(20))
    assert seen[:20] != seen[20:40] and seen[:20] != list(range(20))  # reshuffled every pass


def test_augmentation_is_deterministic_under_a_seed(small):
    cfg = cfg_for(small, "data.deterministic=true")
    first = take(build_dataset(cfg, "train"), 4)
    again = take(build_dataset(cfg, "train"), 4)
    for a, b in zip(first, again):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    other = take(build_dataset(cfg_for(small, "data.deterministic=true", "seed=1"), "train"), 4)
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(first, other))


def test_augmentation_changes_with_rank_and_epoch_not_with_threads(tmp_path):
    # One shard and no shuffle: every stream shows the records in the same order, so any
    # difference between them is the augmentation.
    write_records(tmp_path / "one", {"train": [6], "val": [2]})
    cfg = cfg_for(tmp_path / "one", "data.shuffle_buffer=1", "data.deterministic=true")
    plain = take(build_dataset(cfg_for(tmp_path / "one", "data.shuffle_buffer=1", "data.deterministic=true",
                                       "data.augment=[]"), "train"), 6)
    base = take(build_dataset(cfg, "train"), 6)  # 2 passes over the 6 records
    assert [index_of(im) for b in plain for im in b[0]] == [0, 1, 2, 3, 4, 5] * 2
    changed = [not np.array_equal(a[0][i], p[0][i]) for a, p in zip(base, plain) for i in range(2)]
    assert sum(changed) >= 6  # the default policy touches most images
    pass1, pass2 = np.concatenate([b[0] for b in base[:3]]), np.concatenate([b[0] for b in base[3:]])
    assert not np.array_equal(pass1, pass2)  # the same records, augmented differently next pass
    for stream in (build_dataset(cfg, "train", first_epoch=1),
                   build_dataset(cfg_for(tmp_path / "one", "data.shuffle_buffer=1", "data.deterministic=true",
                                         "train.batch_size=2"), "train", rank=1, num_ranks=2)):
        assert not np.array_equal(np.concatenate([b[0] for b in take(stream, 3)]), pass1)
    # Labels and masks are untouched by augmentation.
    for a, p in zip(base, plain):
        np.testing.assert_array_equal(a[1], p[1])
        np.testing.assert_array_equal(a[2], p[2])


def test_labels_and_masks_are_carried_through(small):
    cfg = cfg_for(small)
    for b in build_dataset(cfg, "val"):
        images, labels, mask = (t.numpy() for t in b)
        for image, y, m in zip(images, labels, mask):
            index = index_of(image)
            assert y.tolist() == labels_of(index) and m.tolist() == mask_of(index)


def test_masked_labels_contribute_no_gradient(tmp_path):
    """A training step on build_dataset's stream: label 1 is masked in every record (and always
    positive, so it would pull hard), label 0 is not. Only label 0's output weights move."""
    from medtl.models.build import build_model
    from medtl.models.losses import build_loss

    out = tmp_path / "masked"
    manifest = write_records(out, {"train": [8], "val": [2]})
    for shard in manifest.splits["train"].shards:  # rewrite with label 1 positive and masked
        with tf.io.TFRecordWriter(str(out / shard.file)) as writer:
            for i in range(8):
                png = encode_png(record_image(i, 32), 16)
                writer.write(encode_example(png, [i % 2, 1, 0], [1, 0, 1], "p", str(i)))
    cfg = cfg_for(out, "model.head.dense=[]", "model.head.dropout=0", "train.batch_size=4")
    tf.keras.utils.set_random_seed(0)
    model = build_model(cfg, NUM_LABELS)
    model.compile(optimizer=tf.keras.optimizers.SGD(0.5), loss=build_loss(cfg.train.loss))
    kernel, bias = (w.copy() for w in model.get_layer("logits").get_weights())
    model.fit(build_dataset(cfg, "train"), steps_per_epoch=2, epochs=1, verbose=0)
    new_kernel, new_bias = model.get_layer("logits").get_weights()
    assert new_bias[1] == bias[1] and np.array_equal(new_kernel[:, 1], kernel[:, 1])
    assert new_bias[0] != bias[0] and not np.array_equal(new_kernel[:, 0], kernel[:, 0])


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_cache_gives_the_same_stream(small, tmp_path, cache):
    where = str(tmp_path / "cache") if cache == "disk" else "memory"
    plain = cfg_for(small, "data.augment=[]", "data.deterministic=true")
    cached = cfg_for(small, "data.augment=[]", "data.deterministic=true", f"data.cache={where}")
    for split in ("val", "test"):
        expected = [index_of(im) for b in build_dataset(plain, split) for im in b[0].numpy()]
        for _ in range(2):  # the second read comes from the cache
            assert [index_of(im) for b in build_dataset(cached, split) for im in b[0].numpy()] == expected
    train = stream_indices(build_dataset(cached, "train"), 40)
    assert sorted(train[:20]) == sorted(train[20:]) == list(range(20))
    if cache == "disk":
        assert glob.glob(os.path.join(where, "val-eval-32px-f32-rank0of1-*.index"))


def test_disk_cache_is_read_instead_of_the_shards(small, tmp_path):
    where = str(tmp_path / "cache")
    cfg = cfg_for(small, f"data.cache={where}")
    first = [b[1].numpy().tolist() for b in build_dataset(cfg, "val")]
    pipeline._CACHED.clear()  # as a new process would
    for name in glob.glob(str(small / "val-*.tfrecord")):
        with open(name, "wb") as fh:
            fh.write(b"not a tfrecord any more")
    assert [b[1].numpy().tolist() for b in build_dataset(cfg, "val")] == first


def test_a_cache_in_use_is_a_clear_error(tmp_path):
    write_records(tmp_path / "rec", {"train": [4], "val": [400]})
    cfg = cfg_for(tmp_path / "rec", f"data.cache={tmp_path / 'cache'}")
    writing = iter(build_dataset(cfg, "val"))
    next(writing)  # a first pass under way holds the cache's lockfile, as a running job would
    pipeline._CACHED.clear()
    with pytest.raises(MedtlError, match=r"data.cache: .*lockfile exists: another run is writing this cache"):
        with pipeline_errors():
            next(iter(build_dataset(cfg, "val")))
    del writing


@pytest.mark.parametrize("encoding, bad, message", [
    ("png", {"image_size": 24}, "a record holds a 24x24 px image but manifest.json says the shards hold 32x32 images"),
    ("png", {"num_labels": 2}, "a record has 2 values in 'labels' but manifest.json lists 3 labels"),
    ("png", {"png": b""}, "a record has no image ('image/png', the feature of png records)"),
    ("raw", {"image_size": 24}, "a record holds 1152 image bytes but manifest.json says the shards hold 32x32 16-bit "
                                "raw images (2048 bytes each)"),
    ("raw", {"png": b"\0" * 2047}, "a record holds 2047 image bytes"),
])
def test_shard_that_does_not_match_the_manifest_is_named(tmp_path, encoding, bad, message):
    records = tmp_path / "O'Brien's scans é"  # quotes and UTF-8 survive TensorFlow's escaping
    write_records(records, {"train": [4, 4], "val": [2, 2]}, bad_shard=("val", 1), bad=bad, encoding=encoding)
    cfg = cfg_for(records)
    with pytest.raises(MedtlError) as err:
        with pipeline_errors():
            list(build_dataset(cfg, "val"))
    text = str(err.value)
    assert text.startswith(f"shard {records / 'val-00001-of-00002.tfrecord'}: ") and message in text
    assert "\n" not in text


@pytest.mark.slow
def test_train_cli_names_the_bad_shard(tmp_path):
    write_records(tmp_path / "bad", {"train": [8, 8], "val": [4], "test": [4]}, bad_shard=("train", 1),
                  bad={"image_size": 24})
    r = run_cli("train", "--config", os.path.join(JOBS, "smoke.yaml"), "--workdir", tmp_path / "run",
                "--set", f"data.records={tmp_path / 'bad'}", "--set", "train.batch_size=4",
                "--set", "data.image_size=32")
    assert_user_error(r, "train-00001-of-00002.tfrecord", "24x24 px image", "32x32")
