"""Distributed phased training through the CLI under horovodrun (2 ranks, Gloo, CPU)."""
import json
import math
import os
import re
import sys

import numpy as np
import pytest

from conftest import JOBS, assert_user_error, cli_env, run_cli

pytestmark = pytest.mark.slow
HOROVODRUN = [os.path.join(os.path.dirname(sys.executable), "horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo"]


def _history(run):
    return [json.loads(line) for line in open(os.path.join(run, "history.jsonl"))]


def _train(records, run, *sets, launcher=None, env=None):
    args = ["train", "--config", os.path.join(JOBS, "smoke.yaml"), "--workdir", run, "--set",
            f"data.records={records}", "--set", "train.batch_size=8"]
    for s in sets:
        args += ["--set", s]
    return run_cli(*args, launcher=launcher, env=env or cli_env(), timeout=1100)


def _steps(records, ranks, batch=8):
    manifest = json.load(open(os.path.join(records, "manifest.json")))
    return manifest["splits"]["train"]["records"] // (batch * ranks)


def test_two_ranks_mixed_precision_nan_batch_stays_in_sync(records, tmp_path):
    run = tmp_path / "run"
    env = cli_env(MEDTL_FAULTS="nan_batch:rank=1,step=2")
    r = _train(records, run, "train.precision=mixed_float16", "phases.1.trainable={regex: '^(block7|top_)'}",
               launcher=HOROVODRUN, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert len(re.findall(r"weights identical on 2 rank\(s\)", out)) == 2
    rows = _history(run)
    assert [row["phase"] for row in rows] == ["head", "top"] and all(row["ranks"] == 2 for row in rows)
    # The NaN batch on rank 1 made every rank skip that one update.
    assert rows[0]["skipped_steps_total"] == 1 and rows[0]["loss_scale"] > 0
    assert all(math.isfinite(row["loss"]) for row in rows)
    # Each phase trained exactly the variables its config names.
    trainable = json.load(open(run / "trainable.json"))
    head = {"head_dense_0", "logits"}
    assert {v.split("/")[0] for v in trainable["head"]} == head
    top = {v.split("/")[0] for v in trainable["top"]} - head
    assert top and all(re.match(r"^(block7|top_)", name) for name in top)
    assert not any("_bn" in name for name in top), "BatchNorm stays frozen"
    # TensorBoard scalars, including per-label AUROC and the loss scale.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["tensors"]) | set(events.Tags()["scalars"])
    assert {"loss", "val_auroc", "lr", "loss_scale", "images_per_second", "images_per_second_per_rank"} <= tags
    assert any(t.startswith("val_auroc/") for t in tags)


def test_killed_rank_then_resume_with_other_rank_count(records, tmp_path):
    run = tmp_path / "run"
    sets = ("phases.0.epochs=2", "phases.1.epochs=2")
    kill_step = 2 * _steps(records, 2) + 1  # inside epoch 3, the first of phase 'top'
    r = _train(records, run, *sets, launcher=HOROVODRUN, env=cli_env(MEDTL_FAULTS=f"kill:rank=1,step={kill_step}"))
    assert r.returncode != 0
    assert "Process 1 exit with status code 137" in r.stdout + r.stderr
    state = json.load(open(run / "checkpoints" / "state.json"))
    assert state["epochs_done"] == 2 and state["ranks"] == 2
    assert os.path.exists(run / "checkpoints" / state["checkpoint"])

    r = _train(records, run, *sets)  # one rank this time
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stderr and "after epoch 2" in r.stderr
    rows = _history(run)
    assert [(row["epoch"], row["phase"]) for row in rows] == [(0, "head"), (1, "head"), (2, "top"), (3, "top")]
    assert [row["ranks"] for row in rows] == [2, 2, 1, 1]

    r = _train(records, run, *sets, "train.jit_compile=true")  # an execution setting may change
    assert r.returncode == 0 and "is complete" in r.stderr and "nothing to do" in r.stderr
    assert len(_history(run)) == 4
    r = _train(records, run, *sets, "model.head.dropout=0.5")
    assert_user_error(r, "holds a run with a different config", "model.head.dropout")


def test_persistent_nan_stops_within_an_epoch_and_keeps_the_best(records, tmp_path):
    run = tmp_path / "run"
    steps = _steps(records, 1)
    r = _train(records, run, "phases.1.epochs=2", "train.nonfinite_patience=3",
               env=cli_env(MEDTL_FAULTS=f"nan_from:step={steps}"))
    line = assert_user_error(r, "not finite", "epoch 2", "training stopped on all ranks", "epoch-0000.weights.h5")
    assert "phases.1.learning_rate" in line
    state = json.load(open(run / "checkpoints" / "state.json"))
    assert state["epochs_done"] == 1 and len(_history(run)) == 1
    from medtl.train.checkpoints import load_run

    _, _, model = load_run(str(run))
    assert all(np.isfinite(w).all() for w in model.get_weights())
