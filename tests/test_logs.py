"""medtl's log lines: the `medtl: ...` format and levels, rank gating, timestamps, the run folder's copy,
and the TensorFlow import filter that lets TensorFlow's own errors through."""
import os
import re

import pytest

from medtl.errors import MedtlError
from medtl.utils import log

from conftest import cli_env, run_cli

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ "


@pytest.fixture(autouse=True)
def _primary_again():
    yield
    log.set_primary(True)


def test_format_and_levels(capsys, monkeypatch):
    monkeypatch.delenv(log.LEVEL_ENV, raising=False)
    monkeypatch.delenv(log.TIMESTAMPS_ENV, raising=False)
    log.log("hello")
    log.debug("hidden")
    log.warning("careful")
    log.error("broken")
    assert capsys.readouterr().err.splitlines() == ["medtl: hello", "medtl: warning: careful", "medtl: error: broken"]
    monkeypatch.setenv(log.LEVEL_ENV, "debug")
    log.debug("detail")
    assert capsys.readouterr().err == "medtl: debug: detail\n"


def test_other_ranks_print_errors_only(capsys):
    log.set_primary(False)
    log.log("info")
    log.warning("warn")
    log.error("rank 1 failed")
    assert capsys.readouterr().err == "medtl: error: rank 1 failed\n"


def test_timestamps_on_request(capsys, monkeypatch):
    monkeypatch.setenv(log.TIMESTAMPS_ENV, "1")
    log.log("stamped")
    assert re.fullmatch(STAMP + r"medtl: stamped\n", capsys.readouterr().err)


def test_run_folder_copy_waits_for_the_folder_and_ends_with_the_error(tmp_path, capsys):
    run = tmp_path / "run"
    with pytest.raises(MedtlError):
        with log.copy_to_run_folder(str(run)) as path:
            log.log("before the folder exists")
            assert not run.exists()  # the copy never creates the run folder itself
            run.mkdir()
            log.log("after")
            raise MedtlError("the bad thing; fix it")
    lines = open(path).read().splitlines()
    assert [re.sub("^" + STAMP, "", line) for line in lines] == [
        "medtl: before the folder exists", "medtl: after", "medtl: error: the bad thing; fix it"]
    # stderr keeps its own format; the error is the caller's to print there.
    assert capsys.readouterr().err == "medtl: before the folder exists\nmedtl: after\n"
    log.log("outside the block")
    assert len(open(path).read().splitlines()) == 3


def test_run_folder_copy_is_the_primary_ranks(tmp_path):
    log.set_primary(False)
    with log.copy_to_run_folder(str(tmp_path)) as path:
        log.log("info")
        log.error("an error")
    assert not os.path.exists(path)


def test_cli_log_timestamps_flag(tmp_path):
    r = run_cli("--log-timestamps", "synth", "--out", tmp_path, "--n", 4, "--size", 32)
    assert r.returncode == 0, r.stderr
    assert re.search("^" + STAMP + r"medtl: synth: 4 images", r.stderr, re.M), r.stderr
    r = run_cli("synth", "--out", tmp_path / "b", "--n", 0, env=cli_env(MEDTL_LOG_TIMESTAMPS="1"))
    assert r.returncode == 2 and re.fullmatch(STAMP + r"medtl: error: --n must be >= 1, got 0\n", r.stderr)


def test_tensorflow_import_filter_drops_only_the_known_plugin_lines():
    from medtl.tf import _SPURIOUS

    spurious = ("2026-12-01 01:02:58.355508: E external/local_xla/xla/stream_executor/cuda/cuda_fft.cc:485] "
                "Unable to register cuFFT factory: Attempting to register factory for plugin cuFFT when one has "
                "already been registered\n")
    assert _SPURIOUS.match(spurious)
    assert _SPURIOUS.match(spurious.replace("cuFFT", "cuDNN"))
    real = "2026-12-01 01:02:58.355508: E tensorflow/core/framework/op_kernel.cc:1840] OP_REQUIRES failed\n"
    assert not _SPURIOUS.match(real)


def test_tensorflow_errors_are_not_hidden_and_its_import_is_quiet():
    """Level 2 (TensorFlow's errors show, its INFO and WARNING lines do not), and no spurious lines at import."""
    import subprocess
    import sys

    env = cli_env()
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    code = "import os, medtl.tf; print(os.environ['TF_CPP_MIN_LOG_LEVEL'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "2" and out.stderr == "", out.stderr
