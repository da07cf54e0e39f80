"""Decode-free records (`medtl ingest --encoding raw`) through the CLI: ingest at a job's size, verify, train,
evaluate and export (which still takes PNG and JPEG bytes); a damaged raw shard named by verify and by train;
the stored-size checks and warnings. Expected pixels come from OpenCV's own PNG decode of the PNG records of
the same studies, not from medtl's raw path."""
import hashlib
import json
import os
import shutil

import numpy as np
import pytest

from medtl.data.manifest import (Manifest, SplitInfo, check_input_size, oversize_warning, read_manifest,
                                 write_manifest)
from medtl.errors import EXIT_RUNTIME, EXIT_USAGE, MedtlError

from conftest import REPO, assert_user_error, record_images, run_cli

TINY = os.path.join(REPO, "tests", "reliability", "tiny.yaml")  # 64 px
SIZE = 64


@pytest.fixture(scope="module")
def raw_records(studies, tmp_path_factory) -> str:
    """The session's studies ingested as raw pixels at tiny.yaml's input size (few train shards, so the
    training stream's first reads meet every one of them)."""
    out = str(tmp_path_factory.mktemp("raw") / "records")
    r = run_cli("ingest", "--images", os.path.join(studies, "images"), "--labels", os.path.join(studies, "labels.csv"),
                "--out", out, "--encoding", "raw", "--size-from", TINY, "--shard-mb", 0.5)
    assert r.returncode == 0, r.stderr
    assert f"storing images at {SIZE} px, the data.image_size of {TINY}" in r.stderr
    return out


def test_raw_ingest_stores_the_png_records_pixels(raw_records, records):
    import cv2

    with open(os.path.join(raw_records, "manifest.json")) as fh:
        raw = json.load(fh)
    assert (raw["encoding"], raw["image_size"], raw["bit_depth"]) == ("raw", SIZE, 16)
    assert sum(len(s["shards"]) for s in raw["splits"].values()) < 8  # the training stream reads all at once
    stored = record_images(raw_records, "test", "image/raw")
    pngs = record_images(records, "test", "image/png")  # conftest: the same studies, 64 px 16-bit PNG
    assert stored.keys() == pngs.keys() and len(stored) > 10
    for key, data in stored.items():
        assert len(data) == SIZE * SIZE * 2
        want = cv2.imdecode(np.frombuffer(pngs[key], np.uint8), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(np.frombuffer(data, "<u2").reshape(SIZE, SIZE), want)
    r = run_cli("verify", raw_records)
    assert r.returncode == 0 and "all read, parsed and checksummed" in r.stderr, r.stderr


def test_raw_streams_give_the_stored_pixels_scaled_to_255(raw_records):
    """The eval stream and the un-augmented training stream keep raw pixels as uint16 until the batch is
    made (docs/benchmarks.md); what the model gets is still each stored value times float32(255 / 65535),
    in all three channels. Expected values from numpy on the stored bytes."""
    import dataclasses

    from medtl.config import load_config
    from medtl.data.pipeline import build_dataset

    cfg = load_config(TINY, [f"data.records={raw_records}", "data.channels=3"])
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, augment=()))
    manifest = read_manifest(raw_records)
    scale = np.float32(255.0 / 65535.0)
    stored = {k: np.frombuffer(v, "<u2").reshape(SIZE, SIZE).astype(np.float32) * scale
              for k, v in record_images(raw_records, "test", "image/raw").items()}
    seen = 0
    for images, _, _, _, keys in build_dataset(cfg, "test", manifest=manifest, with_ids=True):
        assert images.dtype.name == "float32" and images.shape[1:] == (SIZE, SIZE, 3)
        for image, key in zip(images.numpy(), keys.numpy().astype(str)):
            for channel in range(3):
                np.testing.assert_array_equal(image[..., channel], stored[key])
            seen += 1
    assert seen == len(stored)
    train = next(iter(build_dataset(cfg, "train", manifest=manifest)))[0].numpy()
    assert train.dtype == np.float32 and train.shape[1:] == (SIZE, SIZE, 3) and (train[..., 0] == train[..., 2]).all()
    assert np.isin(train, np.arange(65536, dtype=np.float32) * scale).all()  # 16-bit values, scaled once


@pytest.mark.slow
def test_raw_records_train_evaluate_and_export_taking_png_and_jpeg(raw_records, tmp_path):
    import cv2

    from medtl.tf import tf

    run, report, model = tmp_path / "run", tmp_path / "report", tmp_path / "model"
    r = run_cli("train", "--config", TINY, "--workdir", run, "--set", f"data.records={raw_records}",
                "--set", "phases.0.epochs=1", "--until-phase", "head")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pixels per pixel the model uses" not in r.stderr  # stored at the input size: no warning
    r = run_cli("evaluate", "--workdir", run, "--split", "test", "--out", report, "--set", "evaluate.bootstrap=50")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("export", "--workdir", run, "--out", model)
    assert r.returncode == 0, r.stderr[-3000:]

    # The export decodes PNG bytes itself: made here by OpenCV from the raw records' pixels, they must give
    # what evaluate computed from the raw stream, record by record.
    predictions = np.load(os.path.join(report, "predictions.npz"))
    by_key = dict(zip(predictions["key"].astype(str), predictions["probs"]))
    stored = record_images(raw_records, "test", "image/raw")
    keys = sorted(stored)[:8]
    pixels = [np.frombuffer(stored[k], "<u2").reshape(SIZE, SIZE) for k in keys]
    pngs = [cv2.imencode(".png", p)[1].tobytes() for p in pixels]
    jpegs = [cv2.imencode(".jpg", np.round(p / 257.0).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 100])[1].tobytes()
             for p in pixels]
    loaded = tf.saved_model.load(str(model))
    predict = loaded.signatures["predict_bytes"]
    from_png = predict(image_bytes=tf.constant(pngs))["probabilities"].numpy()
    np.testing.assert_allclose(from_png, np.stack([by_key[k] for k in keys]), atol=1e-5)
    from_jpeg = predict(image_bytes=tf.constant(jpegs))["probabilities"].numpy()
    assert from_jpeg.shape == from_png.shape
    np.testing.assert_allclose(from_jpeg, from_png, atol=0.02)  # 8-bit, lossy: close, not equal


def test_the_device_step_gives_the_cpu_streams_pixels_without_a_policy(raw_records):
    """data.augment_on: device: the stream's batches (stored uint16 pixels, one channel) through the training
    step's preparation are exactly the CPU stream's model inputs, batch for batch; with a policy the step
    applies it (the same as medtl.data.device_augment for the same seed and step)."""
    import dataclasses

    from medtl.config import load_config
    from medtl.data.device_augment import build_device_augment
    from medtl.data.pipeline import _seed, build_dataset, build_step_inputs_fn
    from medtl.tf import tf

    cpu = load_config(TINY, [f"data.records={raw_records}", "data.augment=[]", "data.deterministic=true"])
    device = dataclasses.replace(cpu, data=dataclasses.replace(cpu.data, augment_on="device"))
    prepare = build_step_inputs_fn(device, 0, 0)
    for step, (want, got) in enumerate(zip(build_dataset(cpu, "train").take(3), build_dataset(device, "train"))):
        assert got[0].dtype == tf.uint16 and got[0].shape[-1] == 1
        np.testing.assert_array_equal(prepare(got[0], step).numpy(), want[0].numpy())
        np.testing.assert_array_equal(got[1].numpy(), want[1].numpy())
    policy = load_config(TINY, [f"data.records={raw_records}", "data.augment_on=device"])
    images = next(iter(build_dataset(policy, "train")))[0]
    scaled = tf.cast(images, tf.float32) * (255.0 / 65535.0)
    augmented = build_device_augment(policy.data.augment, _seed(policy.seed, 0, 2))(scaled, tf.constant(5, tf.int64))
    np.testing.assert_array_equal(build_step_inputs_fn(policy, 0, 2)(images, tf.constant(5, tf.int64)).numpy(),
                                  tf.image.grayscale_to_rgb(augmented).numpy())


@pytest.mark.slow
def test_augmentation_on_the_device_trains_through_the_cli(raw_records, tmp_path):
    """The default policy (Affine, brightness/contrast, gamma, CLAHE, noise) in the training step, with XLA on
    (the step's forward/backward pass compiled, the augmentation outside it: ImageProjectiveTransformV3 has no
    XLA kernel) and deterministic ops (CLAHE's histograms without bincount)."""
    config = tmp_path / "default-policy.yaml"
    config.write_text("\n".join(line for line in open(TINY).read().splitlines()
                                if not line.startswith(("  augment:", "    - Affine"))))
    r = run_cli("train", "--config", config, "--workdir", tmp_path / "run", "--set", f"data.records={raw_records}",
                "--set", "phases.0.epochs=1", "--set", "data.deterministic=true", "--set", "data.augment_on=device",
                "--set", "train.jit_compile=true", "--until-phase", "head")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train: data.augment_on: device: the training step scales the stored pixels, applies Affine, " \
           "RandomBrightnessContrast, RandomGamma, CLAHE, GaussNoise and makes 3 channels" in r.stderr
    assert "data.augment_on is device but no GPU is visible" in r.stderr
    with open(tmp_path / "run" / "history.jsonl") as fh:
        assert len(fh.read().splitlines()) == 1


def _damage_first_record(folder: str, cut: int) -> str:
    """Cut `cut` bytes off the image of the first record of the first train shard and rewrite the shard,
    with its size and SHA-256 updated in manifest.json (so only the record check can find it)."""
    from medtl.tf import tf

    path = os.path.join(folder, "manifest.json")
    manifest = json.load(open(path))
    entry = manifest["splits"]["train"]["shards"][0]
    shard = os.path.join(folder, entry["file"])
    records = [r.numpy() for r in tf.data.TFRecordDataset(shard)]
    example = tf.train.Example.FromString(records[0])
    image = example.features.feature["image/raw"].bytes_list.value
    image[0] = image[0][:-cut]
    records[0] = example.SerializeToString()
    with tf.io.TFRecordWriter(shard) as writer:
        for record in records:
            writer.write(record)
    data = open(shard, "rb").read()
    entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    with open(path, "w") as fh:
        json.dump(manifest, fh)
    return entry["file"]


@pytest.mark.slow
def test_damaged_raw_shard_is_named_by_verify_and_train(raw_records, tmp_path):
    folder = tmp_path / "damaged"
    shutil.copytree(raw_records, folder)
    shard = _damage_first_record(str(folder), 2)
    bytes_now = SIZE * SIZE * 2 - 2
    assert_user_error(run_cli("verify", folder), shard, "bad_record", f"record 0 holds {bytes_now} image bytes",
                      f"{SIZE}x{SIZE} 16-bit raw ({SIZE * SIZE * 2} bytes)", exit_code=EXIT_RUNTIME)
    # Training at half the stored size: the warning with its numbers, then the damaged record, by shard.
    r = run_cli("train", "--config", TINY, "--workdir", tmp_path / "run", "--set", f"data.records={folder}",
                "--set", "data.image_size=32", "--set", "phases.0.epochs=1", "--until-phase", "head")
    assert_user_error(r, f"shard {folder / shard}: a record holds {bytes_now} image bytes but manifest.json says "
                      f"the shards hold {SIZE}x{SIZE} 16-bit raw images", exit_code=EXIT_RUNTIME)
    warnings = [w for w in r.stderr.splitlines() if "pixels per pixel the model uses" in w]
    assert len(warnings) == 1, r.stderr[-3000:]
    assert f"stores {SIZE} px images, 2.0x the model input data.image_size 32 px" in warnings[0]
    assert "decodes" not in warnings[0] and "reads and resizes 4.0 pixels per pixel" in warnings[0]


def test_wrong_recorded_shape_is_named_by_verify(raw_records, tmp_path):
    folder = tmp_path / "reshaped"
    shutil.copytree(raw_records, folder)
    manifest = json.load(open(folder / "manifest.json"))
    manifest["image_size"] = 48
    (folder / "manifest.json").write_text(json.dumps(manifest))
    first = next(iter(manifest["splits"].values()))["shards"][0]["file"]  # verify's order: the manifest's
    assert_user_error(run_cli("verify", folder), first, f"record 0 holds {SIZE * SIZE * 2} image bytes",
                      "48x48 16-bit raw (4608 bytes)", exit_code=EXIT_RUNTIME)


def test_unknown_encoding_and_upsampling_are_refused_naming_the_key(raw_records, tmp_path):
    folder = tmp_path / "future"
    shutil.copytree(raw_records, folder)
    manifest = json.load(open(folder / "manifest.json"))
    manifest["encoding"] = "webp"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert_user_error(run_cli("verify", folder), str(folder / "manifest.json"), "key 'encoding' is 'webp'",
                      "png, raw", exit_code=EXIT_USAGE)
    r = run_cli("train", "--config", TINY, "--workdir", tmp_path / "run", "--set", f"data.records={raw_records}",
                "--set", "data.image_size=96")
    assert_user_error(r, "data.image_size is 96 px", f"stores {SIZE} px images", "data.allow_upsample: true",
                      exit_code=EXIT_USAGE)
    assert not os.path.exists(tmp_path / "run")  # refused before any work
    r = run_cli("ingest", "--images", tmp_path, "--labels", tmp_path / "x.csv", "--out", tmp_path / "o",
                "--size-from", TINY, "--image-size", 64)
    assert r.returncode == EXIT_USAGE and "--image-size: not allowed with argument --size-from" in r.stderr


def test_finalize_refuses_parts_of_another_encoding(studies, tmp_path):
    out = tmp_path / "records"
    common = ("--images", os.path.join(studies, "images"), "--labels", os.path.join(studies, "labels.csv"),
              "--out", out, "--image-size", 32)
    r = run_cli("ingest", *common, "--encoding", "raw", "--worker-index", 0, "--num-workers", 1)
    assert r.returncode == 0, r.stderr
    assert_user_error(run_cli("ingest-finalize", *common, "--num-workers", 1), "ingest part 0",
                      "written with --encoding raw but finalize was given --encoding png", exit_code=EXIT_USAGE)
    assert not (out / "manifest.json").exists()


def _manifest(stored: int, encoding: str = "png") -> Manifest:
    return Manifest(labels=("a",), stored_image_size=stored, bit_depth=16, splits={"train": SplitInfo()},
                    encoding=encoding)


def test_stored_size_against_the_model_input():
    assert oversize_warning("R", _manifest(96), 64) is None  # 1.5x: not more than 1.5x
    text = oversize_warning("R", _manifest(512), 64)
    assert "R stores 512 px images, 8.0x the model input data.image_size 64 px" in text
    assert "every epoch decodes and resizes 64.0 pixels per pixel the model uses" in text
    check_input_size("R", _manifest(64), 64, allow_upsample=False)
    check_input_size("R", _manifest(64), 96, allow_upsample=True)
    with pytest.raises(MedtlError, match="data.image_size is 96 px but R stores 64 px images"):
        check_input_size("R", _manifest(64), 96, allow_upsample=False)


def test_manifests_before_the_encoding_field_load_as_png_with_their_digest(tmp_path):
    write_manifest(str(tmp_path), _manifest(64))
    old = json.load(open(tmp_path / "manifest.json"))
    del old["encoding"]  # what ingest wrote before the field existed
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    loaded = read_manifest(str(tmp_path))
    assert loaded.encoding == "png"
    assert loaded.digest() == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    assert _manifest(64, "raw").digest() != loaded.digest()
