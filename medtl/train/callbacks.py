"""Keras callbacks for a phase: exact validation AUROC, best-weights tracking, history, throughput."""
from __future__ import annotations

import json
import math
import os
import time

import numpy as np

from medtl import dist
from medtl.evaluate.metrics import mean_bce, summary_metrics
from medtl.evaluate.predict import predict_split
from medtl.tf import tf


class EpochMetrics(tf.keras.callbacks.Callback):
    """Adds throughput, learning rate and exact validation metrics (scikit-learn AUROC on the
    whole val split, gathered from all ranks) to the epoch logs, the same on every rank."""

    def __init__(self, cfg, manifest, ctx: dist.Context, images_per_epoch: int):
        super().__init__()
        self.cfg, self.manifest, self.ctx = cfg, manifest, ctx
        self.images_per_epoch = images_per_epoch
        self.label_names = manifest["labels"]
        self._start = 0.0
        # Per-epoch values kept out of the Keras logs so the progress bar stays readable.
        self.extra: dict = {}

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        seconds = time.monotonic() - self._start
        # Every rank took as long as the slowest; average the view anyway for stable logs.
        seconds = dist.allreduce_mean(self.ctx, seconds, "epoch_seconds")
        logs["images_per_second"] = self.images_per_epoch / seconds if seconds > 0 else 0.0
        logs["lr"] = current_learning_rate(self.model.optimizer)
        out = predict_split(self.model, self.cfg, self.manifest, "val", self.ctx)
        summary = summary_metrics(out["labels"], out["probs"], self.label_names, out["mask"])
        logs["val_loss"] = mean_bce(out["labels"], out["probs"], out["mask"])
        macro = summary["macro"]["auroc"]
        logs["val_auroc"] = macro if macro is not None else math.nan
        self.extra = {
            "seconds": seconds,
            "images_per_second_per_rank": logs["images_per_second"] / self.ctx.size,
            "ranks": self.ctx.size,
            "val_auroc_per_label": {name: row["auroc"] for name, row in summary["labels"].items()},
            "val_auprc": summary["macro"]["auprc"],
        }


def current_learning_rate(optimizer) -> float:
    """The rate the optimizer applies at its current step (schedules resolved)."""
    lr = optimizer.learning_rate
    if isinstance(lr, tf.keras.optimizers.schedules.LearningRateSchedule):
        return float(lr(optimizer.iterations))
    return float(tf.keras.backend.get_value(lr))


class BestWeights(tf.keras.callbacks.Callback):
    """Keeps the phase's best weights (by val_auroc) in memory on every rank, so the next
    phase can start from them without reading a file; rank 0 also saves them."""

    def __init__(self, ctx: dist.Context, path: str, overall_path: str, overall_best: float):
        super().__init__()
        self.ctx, self.path, self.overall_path = ctx, path, overall_path
        self.best = -math.inf
        self.best_epoch = -1
        self.weights = None
        self.overall_best = overall_best

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get("val_auroc", math.nan)
        if math.isnan(value) or value <= self.best:
            return
        self.best, self.best_epoch = value, epoch
        self.weights = [w.copy() for w in self.model.get_weights()]
        if self.ctx.primary:
            _save_weights_atomic(self.model, self.path)
        if value > self.overall_best:
            self.overall_best = value
            if self.ctx.primary:
                _save_weights_atomic(self.model, self.overall_path)

    def restore(self) -> None:
        if self.weights is not None:
            self.model.set_weights(self.weights)


def _save_weights_atomic(model, path: str) -> None:
    # Keras picks the format from the suffix: .weights.h5 stores variables by object path,
    # so a file saved with some layers frozen loads into a model with other flags.
    tmp = path[: -len(".weights.h5")] + ".tmp.weights.h5"
    model.save_weights(tmp)
    os.replace(tmp, path)


class HistoryWriter(tf.keras.callbacks.Callback):
    """One JSON line per epoch in history.jsonl (rank 0 only)."""

    def __init__(self, path: str, phase_index: int, phase_name: str, first_epoch: int, metrics: EpochMetrics):
        super().__init__()
        self.path, self.phase_index, self.phase_name = path, phase_index, phase_name
        self.first_epoch = first_epoch
        self.metrics = metrics

    def on_epoch_end(self, epoch, logs=None):
        row = {"phase": self.phase_name, "phase_index": self.phase_index, "epoch": epoch,
               "epoch_in_phase": epoch - self.first_epoch}
        row.update({key: _clean(value) for key, value in (logs or {}).items()})
        for key, value in self.metrics.extra.items():
            row[key] = {k: _clean(v) for k, v in value.items()} if isinstance(value, dict) else _clean(value)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")


def _clean(value):
    if value is None:
        return None
    value = float(np.asarray(value))
    return None if math.isnan(value) or math.isinf(value) else value
