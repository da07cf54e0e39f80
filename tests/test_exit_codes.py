"""Exit codes through the CLI (2: usage or config, before any work; 1: a failure while working) and
SIGTERM: training stops after the step in progress, keeps its last checkpoint, and a re-run resumes."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, assert_user_error, cli_env, run_cli
from medtl.errors import EXIT_RUNTIME, EXIT_TERMINATED, EXIT_USAGE

TINY = os.path.join(REPO, "tests", "reliability", "tiny.yaml")
HOROVODRUN = os.path.join(os.path.dirname(sys.executable), "horovodrun")


def _train_args(records, run, *sets):
    args = ["train", "--config", TINY, "--workdir", str(run), "--set", f"data.records={records}"]
    for s in sets:
        args += ["--set", s]
    return args


def test_usage_error_exits_2():
    r = run_cli("synth", "--out", "x", "--n", "0")
    assert_user_error(r, "--n must be >= 1")
    assert r.returncode == EXIT_USAGE


def test_bad_config_key_exits_2_before_any_work(records, tmp_path):
    run = tmp_path / "run"
    r = run_cli(*_train_args(records, run, "train.batch_sise=8"))
    assert_user_error(r, "batch_sise")
    assert r.returncode == EXIT_USAGE
    assert not run.exists()  # found before any work: no run folder


def test_argparse_error_exits_2():
    r = run_cli("train", "--no-such-option")
    assert r.returncode == 2 and "usage:" in r.stderr


@pytest.mark.slow
def test_nan_stop_exits_1(records, tmp_path):
    run = tmp_path / "run"
    r = run_cli(*_train_args(records, run, "train.nonfinite_patience=2", "phases.0.epochs=1"),
                env=cli_env(PYTHONPATH=REPO, MEDTL_FAULTS="nan_from:step=0"))
    assert_user_error(r, "were not finite", "training stopped on all ranks")
    assert r.returncode == EXIT_RUNTIME


def _steps_per_epoch(records, batch_size=8) -> int:
    manifest = json.load(open(os.path.join(records, "manifest.json")))
    return manifest["splits"]["train"]["records"] // batch_size


def _wait_for_history(run, lines: int, proc, timeout: float) -> None:
    path = os.path.join(run, "history.jsonl")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and len(open(path).read().splitlines()) >= lines:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended early ({proc.returncode}): {proc.communicate()[1][-3000:]}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"no {lines} history line(s) in {timeout} s")


def _start(args, env, launcher=()):
    cmd = [*launcher, sys.executable, "-m", "medtl", *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def _stopped(proc, seconds: float):
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=seconds)
    return proc.returncode, err, time.monotonic() - start


def _assert_resumes(records, run):
    state = json.load(open(os.path.join(run, "checkpoints", "state.json")))
    assert state["epochs_done"] == 1 and state["checkpoint"] == "epoch-0000.weights.h5"
    assert os.path.exists(os.path.join(run, "checkpoints", state["checkpoint"]))
    assert len(open(os.path.join(run, "history.jsonl")).read().splitlines()) == 1  # no partial epoch
    again = run_cli(*_train_args(records, run), env=cli_env(PYTHONPATH=REPO))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" in again.stderr
    epochs = [json.loads(line)["epoch"] for line in open(os.path.join(run, "history.jsonl"))]
    assert epochs == [0, 1, 2, 3]  # every epoch once: none repeated, none skipped


@pytest.mark.slow
def test_sigterm_stops_after_the_step_and_resumes(records, tmp_path):
    run = tmp_path / "run"
    steps = _steps_per_epoch(records)
    # The second step of epoch 2 waits 5 s, so SIGTERM lands inside an epoch, not after the run.
    env = cli_env(PYTHONPATH=REPO, MEDTL_FAULTS=f"stall:step={steps + 1},seconds=5")
    proc = _start(_train_args(records, run), env)
    _wait_for_history(run, 1, proc, timeout=300)
    code, err, seconds = _stopped(proc, 60)
    assert code == EXIT_TERMINATED, err[-3000:]
    line = assert_user_error(subprocess.CompletedProcess([], code, "", err), "SIGTERM: training stopped",
                             "epoch-0000.weights.h5", "resumes")
    assert "of epoch 2" in line or "end of epoch 1" in line, line
    assert seconds < 30, seconds
    _assert_resumes(records, run)


@pytest.mark.slow
def test_sigterm_to_horovodrun_reaches_the_rank(records, tmp_path):
    run = tmp_path / "run"
    # As above, a step of epoch 2 waits 5 s: on a fast machine the tiny run could otherwise end before
    # SIGTERM arrives (exit 0 in 0.4 s on one).
    env = cli_env(PYTHONPATH=REPO, MEDTL_FAULTS=f"stall:step={_steps_per_epoch(records) + 1},seconds=5")
    proc = _start(_train_args(records, run), env, launcher=[HOROVODRUN, "-np", "1", "-H", "localhost:1", "--gloo"])
    _wait_for_history(run, 1, proc, timeout=300)
    code, err, seconds = _stopped(proc, 60)
    assert code != 0 and seconds < 30, (code, seconds)
    assert "medtl: error: SIGTERM: training stopped" in err, err[-3000:]  # the rank's own stop, not a kill
    _assert_resumes(records, run)
