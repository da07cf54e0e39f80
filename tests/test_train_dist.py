"""Distributed phased training through the CLI on 2 CPU ranks, under horovodrun --gloo and under mpirun as the
training MPIJob runs it (k8s/base/train.yaml); faults are in reliability/."""
import json
import math
import os
import re

import pytest

from conftest import JOBS, cli_env, launcher_argv, run_cli

pytestmark = pytest.mark.slow


def _history(run):
    return [json.loads(line) for line in open(os.path.join(run, "history.jsonl"))]


def _train(records, run, *sets, launcher=None, env=None):
    args = ["train", "--config", os.path.join(JOBS, "smoke.yaml"), "--workdir", run, "--set",
            f"data.records={records}", "--set", "train.batch_size=8"]
    for s in sets:
        args += ["--set", s]
    return run_cli(*args, launcher=launcher, env=env or cli_env(), timeout=1100)


def test_two_ranks_mixed_precision_phases_and_tensorboard(records, tmp_path):
    """Under mpirun, the production launcher (the MPIJob's); the reliability suite's 2-rank runs
    (tests/reliability/test_ranks.py: dead, stalled and NaN ranks) take horovodrun as well."""
    run = tmp_path / "run"
    r = _train(records, run, "train.precision=mixed_float16", "phases.1.trainable={regex: '^(block7|top_)'}",
               "train.train_eval_images=100", launcher=launcher_argv("mpirun"))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert len(re.findall(r"weights identical on 2 rank\(s\)", out)) == 2
    assert "2 rank(s), global batch 16" in out
    assert (run / "checkpoints" / "best.weights.h5").is_file()
    rows = _history(run)
    assert [row["phase"] for row in rows] == ["head", "top"] and all(row["ranks"] == 2 for row in rows)
    assert rows[0]["loss_scale"] > 0
    assert all(math.isfinite(row["loss"]) for row in rows)
    # Each phase trained exactly the variables its config names.
    trainable = json.load(open(run / "trainable.json"))
    head = {"head_dense_0", "logits"}
    assert {v.split("/")[0] for v in trainable["head"]} == head
    top = {v.split("/")[0] for v in trainable["top"]} - head
    assert top and all(re.match(r"^(block7|top_)", name) for name in top)
    assert not any("_bn" in name for name in top), "BatchNorm stays frozen"
    # Train AUROC on the fixed train sample of 100 images, predicted by both ranks and gathered like val.
    assert all(0.0 <= row["train_auroc"] <= 1.0 and row["train_eval_images"] == 100 for row in rows), rows
    assert all(row["loss_name"] == "bce" for row in rows)
    # TensorBoard scalars in Keras' layout: the same tags in train/ and validation/ overlay in one chart.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def tags(kind):
        events = EventAccumulator(str(run / "tensorboard" / kind))
        events.Reload()
        return set(events.Tags()["tensors"]) | set(events.Tags()["scalars"])

    train, validation = tags("train"), tags("validation")
    assert {"epoch_loss", "epoch_auroc", "epoch_learning_rate", "loss_scale", "images_per_second",
            "images_per_second_per_rank"} <= train
    assert {"epoch_loss", "epoch_auroc"} <= validation and any(t.startswith("epoch_auroc/") for t in validation)
