"""Phases run as separate jobs (`medtl train --until-phase NAME`), as the phased Kubernetes overlays do."""
import json
import os

import pytest

from conftest import REPO, assert_user_error, run_cli

pytestmark = pytest.mark.slow


def _train(records, run, *extra):
    """The reliability suite's tiny job (MobileNetV3Small at 64 px, phases head and top), one epoch each."""
    return run_cli("train", "--config", os.path.join(REPO, "tests", "reliability", "tiny.yaml"), "--workdir", run,
                   "--set", f"data.records={records}", "--set", "train.batch_size=8", "--set", "phases.0.epochs=1",
                   "--set", "phases.1.epochs=1", *extra)


def _phases(run):
    return [json.loads(line)["phase"] for line in open(os.path.join(run, "history.jsonl"))]


def test_phases_as_separate_runs_resume_one_after_another(records, tmp_path):
    run = str(tmp_path / "run")
    assert_user_error(_train(records, run, "--until-phase", "tail"), "--until-phase 'tail'", "head, top")

    r = _train(records, run, "--until-phase", "head")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stopped after phase 'head'" in r.stderr and "continues with phase 'top'" in r.stderr
    assert _phases(run) == ["head"]
    assert json.load(open(os.path.join(run, "train_summary.json")))["stopped_after_phase"] == "head"

    r = _train(records, run, "--until-phase", "head")  # the job restarted after it had finished: no-op
    assert r.returncode == 0 and "already complete" in r.stderr and "nothing to do" in r.stderr
    assert _phases(run) == ["head"]

    r = _train(records, run, "--until-phase", "top")  # the next job of the chain
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stderr and "phase 2/2 'top'" in r.stderr
    assert _phases(run) == ["head", "top"]
    assert "stopped_after_phase" not in json.load(open(os.path.join(run, "train_summary.json")))
