"""`medtl pretrain` through the CLI on tiny data: the base file and its sidecar, `medtl train` starting from
it, and the refusals (no method, a method not built, another backbone or channel count, a damaged file)."""
import json
import os
import shutil

import pytest

from conftest import REPO, assert_user_error, run_cli

TINY = os.path.join(REPO, "tests", "reliability", "tiny.yaml")
# One epoch that trains every layer: what a supervised pretrain of the base does.
PRETRAIN_SET = ("--set", "phases=[{name: all, epochs: 1, learning_rate: 0.001, trainable: all}]")
# One head-only epoch: the base must stay exactly as loaded.
HEAD_ONLY_SET = ("--set", "phases=[{name: head, epochs: 1, learning_rate: 0.001, trainable: none}]")


def _pretrain(records, run, *extra):
    return run_cli("pretrain", "--config", TINY, "--workdir", run, "--set", f"data.records={records}",
                   *PRETRAIN_SET, *extra)


def _train(records, run, weights, *extra):
    return run_cli("train", "--config", TINY, "--workdir", run, "--set", f"data.records={records}",
                   "--set", f"model.weights={weights}", *HEAD_ONLY_SET, *extra)


@pytest.fixture(scope="module")
def base_run(records, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("pretrain") / "run")
    result = _pretrain(records, run, "--set", "pretrain.method=supervised")
    assert result.returncode == 0, result.stderr[-3000:]
    return run, result


@pytest.mark.slow
def test_pretrain_writes_base_and_sidecar(base_run, records):
    from medtl.data.manifest import read_manifest

    run, result = base_run
    base = os.path.join(run, "base.weights.h5")
    assert result.stdout.strip().splitlines()[-1] == base
    assert os.path.getsize(base) > 0
    meta = json.load(open(base + ".json"))
    assert meta["backbone"] == "MobileNetV3Small" and meta["channels"] == 3 and meta["image_size"] == 64
    assert meta["method"] == "supervised" and meta["epochs"] == 1
    assert meta["records_digest"] == read_manifest(records).digest()
    assert set(meta) == {"backbone", "image_size", "channels", "method", "epochs", "records_digest",
                         "medtl_version"}


@pytest.mark.slow
def test_train_from_base_starts_from_its_weights(base_run, records, tmp_path):
    import numpy as np

    from medtl.models.backbones import build_backbone
    from medtl.train.rundir import load_run

    base = os.path.join(base_run[0], "base.weights.h5")
    run = str(tmp_path / "target")
    result = _train(records, run, base)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = build_backbone("MobileNetV3Small", base, 64, 3).get_weights()
    random = build_backbone("MobileNetV3Small", "none", 64, 3).get_weights()
    trained = load_run(run)[2].get_layer("backbone").get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(expected, trained))  # head-only: the base is the file's
    assert not all(np.array_equal(a, b) for a, b in zip(random, trained))


@pytest.mark.slow
def test_mismatched_or_damaged_base_is_refused(base_run, records, tmp_path):
    base = os.path.join(base_run[0], "base.weights.h5")
    assert_user_error(_train(records, str(tmp_path / "a"), base, "--set", "model.backbone=EfficientNetB0"),
                      base, "MobileNetV3Small with 3 channel(s)", "EfficientNetB0 with 3 channel(s)", exit_code=2)
    assert_user_error(_train(records, str(tmp_path / "b"), base, "--set", "data.channels=1"),
                      "MobileNetV3Small with 3 channel(s)", "MobileNetV3Small with 1 channel(s)", exit_code=2)

    truncated = str(tmp_path / "truncated.weights.h5")
    with open(base, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read()[: os.path.getsize(base) // 2])
    shutil.copy(base + ".json", truncated + ".json")
    assert_user_error(_train(records, str(tmp_path / "c"), truncated), truncated, "truncated or corrupt",
                      "re-run", exit_code=2)


def test_pretrain_needs_a_built_method(records, tmp_path):
    run = str(tmp_path / "run")
    assert_user_error(_pretrain(records, run), "pretrain.method is missing", "supervised", exit_code=2)
    assert_user_error(_pretrain(records, run, "--set", "pretrain.method=moco"), "pretrain.method",
                      "not built yet", exit_code=2)
    assert_user_error(_pretrain(records, run, "--set", "pretrain.method=magic"), "pretrain.method",
                      "supervised", exit_code=2)
    assert not os.path.exists(os.path.join(run, "base.weights.h5"))


def test_plain_weights_file_without_sidecar_has_no_meta(tmp_path):
    from medtl.models import basefile

    plain = tmp_path / "imagenet_notop.h5"
    plain.write_bytes(b"")
    assert basefile.read_meta(str(plain)) is None
    basefile.check_fits(str(plain), "EfficientNetB0", 3)  # a user's own .h5: loaded unchecked, as before

