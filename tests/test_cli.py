"""The `medtl` command: help for every subcommand, env, and one clear line for each user error."""
import os

import pytest

from conftest import JOBS, assert_user_error, cli_env, run_cli

SUBCOMMANDS = ("synth", "ingest", "train", "search", "evaluate", "compare", "export", "predict", "demo", "env")


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help(command):
    r = run_cli(command, "--help")
    assert r.returncode == 0 and f"usage: medtl {command}" in r.stdout


def test_env_reports_the_stack():
    r = run_cli("env")
    assert r.returncode == 0, r.stderr
    for name in ("tensorflow", "tf-keras", "horovod", "tensorflow-io", "albumentations", "GPUs"):
        assert name in r.stdout
    assert "2.17.1" in r.stdout and "tf_keras" in r.stdout
    assert "built with: gloo" in r.stdout
    # The CPU row names the model and whether TensorFlow's oneDNN kernels run (they change NaN handling).
    cpu = next(line for line in r.stdout.splitlines() if line.startswith("CPU "))
    assert "TensorFlow oneDNN ops on" in cpu or "TensorFlow oneDNN ops off" in cpu, cpu
    off = run_cli("env", env=cli_env(TF_ENABLE_ONEDNN_OPTS="0"))
    assert "TensorFlow oneDNN ops off" in off.stdout, off.stdout


def test_import_guard_selects_keras_2():
    import subprocess
    import sys

    code = "import medtl.tf; import tensorflow as tf; print(tf.keras.__name__)"
    env = cli_env(TF_USE_LEGACY_KERAS="0")  # medtl must override a user's 0
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip().startswith("tf_keras"), out.stderr


def test_import_guard_fails_clearly_when_keras_3_was_loaded_first():
    import subprocess
    import sys

    code = ("import os; os.environ['TF_USE_LEGACY_KERAS']='0'; import tensorflow as tf; tf.keras.layers;"
            "import medtl.tf")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode != 0
    assert "tf.keras is Keras 3" in out.stderr and "TF_USE_LEGACY_KERAS=1" in out.stderr


def test_synth_cli_is_deterministic(tmp_path):
    for name in ("a", "b"):
        r = run_cli("synth", "--out", tmp_path / name, "--n", 12, "--seed", 5, "--size", 48)
        assert r.returncode == 0, r.stderr
    assert (tmp_path / "a" / "labels.csv").read_bytes() == (tmp_path / "b" / "labels.csv").read_bytes()
    assert "synth: 12 images" in r.stderr


def test_unknown_config_key(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text((open(os.path.join(JOBS, "smoke.yaml")).read()).replace("backbone:", "bakbone:"))
    r = run_cli("train", "--config", cfg, "--workdir", tmp_path / "run")
    assert_user_error(r, "job.yaml", "unknown key 'model.bakbone'", "backbone, batchnorm_momentum, head, weights")


def test_set_on_missing_key():
    r = run_cli("train", "--config", os.path.join(JOBS, "smoke.yaml"), "--workdir", "/tmp/x",
                "--set", "train.lr=0.1")
    assert_user_error(r, "--set train.lr", "unknown key 'train.lr'", "batch_size")


def test_records_not_set():
    r = run_cli("train", "--config", os.path.join(JOBS, "smoke.yaml"), "--workdir", "/tmp/x")
    assert_user_error(r, "data.records is empty", "--set data.records=DIR")


def test_records_folder_without_manifest(tmp_path):
    r = run_cli("train", "--config", os.path.join(JOBS, "smoke.yaml"), "--workdir", tmp_path / "run",
                "--set", f"data.records={tmp_path}")
    assert_user_error(r, "no manifest.json in", str(tmp_path))


def test_unknown_backbone(records, tmp_path):
    r = run_cli("train", "--config", os.path.join(JOBS, "smoke.yaml"), "--workdir", tmp_path / "run",
                "--set", f"data.records={records}", "--set", "model.backbone=EfficientNetB9")
    assert_user_error(r, "unknown backbone 'EfficientNetB9'", "EfficientNetB4")


def test_imagenet_weights_without_network_or_cache(records, tmp_path):
    # An empty home (no ~/.keras cache) and a proxy that refuses connections: no download can happen.
    env = cli_env(HOME=tmp_path, KERAS_HOME=tmp_path / ".keras", https_proxy="http://127.0.0.1:9",
                  http_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    r = run_cli("train", "--config", os.path.join(JOBS, "smoke.yaml"), "--workdir", tmp_path / "run",
                "--set", f"data.records={records}", "--set", "model.weights=imagenet", env=env)
    line = assert_user_error(r, "ImageNet weights for EfficientNetB0", "efficientnetb0_notop.h5",
                             "model.weights")
    assert str(tmp_path / ".keras" / "models") in line


def test_missing_weights_file(records, tmp_path):
    r = run_cli("train", "--config", os.path.join(JOBS, "smoke.yaml"), "--workdir", tmp_path / "run",
                "--set", f"data.records={records}", "--set", f"model.weights={tmp_path}/base.h5")
    assert_user_error(r, f"weights file {tmp_path}/base.h5 does not exist")


def test_evaluate_without_run(tmp_path):
    r = run_cli("evaluate", "--workdir", tmp_path, "--out", tmp_path / "rep")
    assert_user_error(r, "is not a medtl run folder", "config.yaml")
