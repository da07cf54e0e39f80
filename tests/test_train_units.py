"""Training pieces without a full run: schedules, optimizers, LR scaling, phase selection, early stopping."""
import json
import math
import os

import numpy as np
import pytest

from medtl import dist
from medtl.config import load_config
from medtl.models.build import build_model, get_base
from medtl.tf import tf
from medtl.train import callbacks as cb
from medtl.train.loop import build_optimizer, build_schedule
from medtl.train.phases import apply_phase, check_phases_trainable
from medtl.train.rundir import RunDir, RunState

from conftest import JOBS


def _cfg(*overrides):
    return load_config(os.path.join(JOBS, "smoke.yaml"), list(overrides))


def test_warmup_then_cosine_schedule():
    cfg = _cfg("phases.0.epochs=4", "phases.0.warmup_epochs=1")
    schedule = build_schedule(cfg.phases[0], 0.1, steps_per_epoch=10)
    assert float(schedule(0)) == pytest.approx(0.0)
    assert float(schedule(5)) == pytest.approx(0.05)
    assert float(schedule(10)) == pytest.approx(0.1)
    assert float(schedule(25)) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 15 / 30)), rel=1e-5)
    assert float(schedule(40)) == pytest.approx(0.0, abs=1e-7)
    constant = build_schedule(_cfg("phases.0.schedule=constant").phases[0], 0.1, 10)
    assert constant == 0.1


def test_optimizers_per_phase():
    cfg = _cfg("phases.0.optimizer=adamw", "phases.0.weight_decay=0.01", "phases.1.optimizer=sgd",
               "phases.1.momentum=0.8")
    adamw = build_optimizer(cfg.phases[0], 1e-3, 10)
    sgd = build_optimizer(cfg.phases[1], 1e-3, 10)
    assert isinstance(adamw, tf.keras.optimizers.AdamW) and adamw.weight_decay == pytest.approx(0.01)
    assert isinstance(sgd, tf.keras.optimizers.SGD) and sgd.momentum == pytest.approx(0.8)


def test_lr_scaling_policies():
    ctx = dist.Context(rank=0, size=4)
    assert dist.lr_scale(ctx, "linear") == 4 and dist.lr_scale(ctx, "sqrt") == 2 and dist.lr_scale(ctx, "none") == 1


def test_top_fraction_and_regex_phases():
    cfg = _cfg("phases.0.trainable={top_fraction: 0.1}", "phases.1.trainable={regex: '^block7'}")
    model = build_model(cfg, 3)
    base = get_base(model)
    apply_phase(model, cfg, cfg.phases[0])
    learnable = [l for l in base.layers if l._trainable_weights]
    trained = [l for l in base.layers if l.trainable and l.trainable_weights]
    non_bn_top = [l for l in learnable[-round(0.1 * len(learnable)):]
                  if not isinstance(l, tf.keras.layers.BatchNormalization)]
    assert trained == non_bn_top
    apply_phase(model, cfg, cfg.phases[1])
    names = [l.name for l in base.layers if l.trainable and l.trainable_weights]
    assert names and all(n.startswith("block7") for n in names)


def test_regex_matching_nothing_fails_before_training():
    from medtl.errors import ConfigError

    cfg = _cfg("phases.1.trainable={regex: '^resnet_stage'}")
    with pytest.raises(ConfigError, match="matches no layer with weights in EfficientNetB0"):
        check_phases_trainable(build_model(cfg, 3), cfg)


def test_weight_decay_needs_a_decoupled_optimizer():
    from medtl.errors import ConfigError

    with pytest.raises(ConfigError, match="'phases.0.weight_decay' needs optimizer adamw or sgd"):
        _cfg("phases.0.weight_decay=0.01")


def test_phase_tracker_early_stopping_and_commit(tmp_path):
    cfg = _cfg("phases.0.epochs=6", "phases.0.early_stopping_patience=2")
    os.makedirs(tmp_path / "checkpoints")
    model = tf.keras.Sequential([tf.keras.layers.Dense(1, input_shape=(2,))])
    model.compile("adam", "mse")
    state = RunState()
    guard = cb.NonFiniteGuard(5)
    metrics = type("M", (), {"extra": {"ranks": 1}})()
    tracker = cb.PhaseTracker(dist.Context(), RunDir(str(tmp_path)), cfg.phases[0], 0, 0, state, metrics, guard, keep=2)
    tracker.set_model(model)
    for epoch, auroc in enumerate([0.6, 0.7, 0.65, 0.64]):
        model.stop_training = False
        tracker.on_epoch_end(epoch, {"val_auroc": auroc, "loss": 0.5})
    assert model.stop_training and state.phase_done and state.epochs_done == 4
    assert tracker.best == 0.7 and tracker.best_epoch == 1
    rows = [json.loads(l) for l in open(tmp_path / "history.jsonl")]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3] and rows[-1]["stopped_early"]
    files = sorted(os.listdir(tmp_path / "checkpoints"))
    assert files == ["best.weights.h5", "epoch-0002.weights.h5", "epoch-0003.weights.h5", "phase0-head.weights.h5",
                     "state.json"]
    saved = json.load(open(tmp_path / "checkpoints" / "state.json"))
    assert saved["checkpoint"] == "epoch-0003.weights.h5" and saved["history_lines"] == 4


def test_state_pointer_never_names_a_missing_file(tmp_path):
    os.makedirs(tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / "state.json").write_text(json.dumps({"checkpoint": "epoch-0007.weights.h5"}))
    from medtl.errors import MedtlError

    with pytest.raises(MedtlError, match="names epoch-0007.weights.h5, which is missing"):
        RunDir(str(tmp_path)).read_state()
