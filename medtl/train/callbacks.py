"""Keras callbacks for a phase: metrics, best weights and checkpoints, the NaN guard, the SIGTERM stop,
TensorBoard."""
from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time

import numpy as np

from medtl import dist
from medtl.errors import Terminated
from medtl.models.backbones import batch_norm_statistics
from medtl.models.metrics import summary_metrics
from medtl.models.predict import predict_split
from medtl.tf import tf
from medtl.train.rundir import RunDir, RunState
from medtl.utils import faults


def current_learning_rate(optimizer) -> float:
    """The rate the optimizer applies at its current step (schedules resolved)."""
    lr = optimizer.learning_rate
    if isinstance(lr, tf.keras.optimizers.schedules.LearningRateSchedule):
        return float(lr(optimizer.iterations))
    return float(tf.keras.backend.get_value(lr))


class FaultHooks(tf.keras.callbacks.Callback):
    """Scheduled kills and stalls for the reliability tests (no-op unless MEDTL_FAULTS is set)."""

    def __init__(self, rank: int, steps_per_epoch: int):
        super().__init__()
        self.rank, self.steps_per_epoch = rank, steps_per_epoch
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        faults.before_step(self.rank, self._epoch * self.steps_per_epoch + batch)


class Heartbeat(tf.keras.callbacks.Callback):
    """Tells the stall watchdog (dist.StallWatchdog) which global step this rank is in."""

    def __init__(self, watchdog: dist.StallWatchdog, steps_per_epoch: int):
        super().__init__()
        self.watchdog, self.steps_per_epoch = watchdog, steps_per_epoch
        self._epoch, self._first = 0, True

    def on_train_begin(self, logs=None):
        self._first = True

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        self.watchdog.begin(self._epoch * self.steps_per_epoch + batch, first=self._first)
        self._first = False

    def on_train_batch_end(self, batch, logs=None):
        self.watchdog.end()


class NonFiniteGuard(tf.keras.callbacks.Callback):
    """Stops training on every rank when the last `patience` steps of an epoch were all skipped
    (the inputs, loss or gradients stayed NaN/Inf). The streak comes from gradients averaged over all
    ranks, so every rank sees the same value. Checked at epoch end, not per batch, so the
    train step never waits on the host; skipped steps leave the weights untouched meanwhile."""

    def __init__(self, patience: int):
        super().__init__()
        self.patience = patience
        self.tripped: tuple[int, int] | None = None

    def on_epoch_end(self, epoch, logs=None):
        streak = int(self.model.nonfinite_streak.numpy())
        if streak >= self.patience and self.tripped is None:
            self.tripped = (epoch, streak)
            self.model.stop_training = True


class SigtermFlag:
    """Set by SIGTERM (Kubernetes stopping the pod; horovodrun and mpirun pass it on to the ranks)."""

    def __init__(self):
        self.received = False

    def _handle(self, signum, frame):  # a signal handler: set the flag, nothing else
        self.received = True


@contextlib.contextmanager
def sigterm_flag():
    """A SigtermFlag that SIGTERM sets while the block runs (the previous handler comes back after).
    Only the main thread may set handlers; elsewhere (a library caller's thread) SIGTERM keeps its own."""
    flag = SigtermFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGTERM, flag._handle)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


class StopOnSigterm(tf.keras.callbacks.Callback):
    """Ends training after the step in progress when SIGTERM came, by raising Terminated.

    Only completed epochs are checkpointed (PhaseTracker), and resume starts at an epoch boundary,
    so a partial epoch is dropped, never committed: raising from the batch end skips every
    on_epoch_end. Placed last, so that a SIGTERM met during an epoch's end (validation, the commit)
    stops after that epoch's checkpoint is written. state.json keeps naming the last complete
    epoch; the same command resumes from it."""

    def __init__(self, flag: SigtermFlag, state: RunState, phase_name: str, steps_per_epoch: int):
        super().__init__()
        self.flag, self.state, self.phase_name, self.steps_per_epoch = flag, state, phase_name, steps_per_epoch
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.flag.received:
            raise self._terminated(f"after step {batch + 1} of {self.steps_per_epoch} of epoch {self._epoch + 1}; "
                                   "that epoch is not committed")

    def on_epoch_end(self, epoch, logs=None):
        if self.flag.received:
            raise self._terminated(f"at the end of epoch {epoch + 1}")

    def _terminated(self, where: str) -> Terminated:
        last = self.state.checkpoint
        resume = (f"the last checkpoint is {last} ({self.state.epochs_done} epoch(s) complete)" if last
                  else "no epoch was complete, so it starts again")
        return Terminated(f"SIGTERM: training stopped {where} (phase '{self.phase_name}'); {resume}. "
                          "The same command with the same --workdir resumes.")


def masked_loss(loss_fn, labels: np.ndarray, logits: np.ndarray, mask: np.ndarray) -> float:
    """The training loss function on a whole split, reduced as Keras reduces a training batch (the sum of
    the masked per-label losses over all entries), so that val loss and train loss compare."""
    value = loss_fn(tf.constant(labels, tf.float32), tf.constant(logits, tf.float32),
                    sample_weight=tf.constant(mask, tf.float32))
    return float(value)


class EpochMetrics(tf.keras.callbacks.Callback):
    """Adds throughput, learning rate, the rank-averaged loss and exact validation metrics
    (scikit-learn AUROC on the whole val split, gathered from all ranks; val loss with the training
    loss function) to the epoch logs, identically on every rank, and the macro AUROC of a fixed,
    un-augmented sample of train.train_eval_images train images (train_auroc), to read overfitting."""

    def __init__(self, cfg, manifest, ctx: dist.Context, images_per_epoch: int, guard: NonFiniteGuard, loss_fn):
        super().__init__()
        self.cfg, self.manifest, self.ctx, self.guard, self.loss_fn = cfg, manifest, ctx, guard, loss_fn
        self.images_per_epoch = images_per_epoch
        self.label_names = manifest.labels
        self._start = 0.0
        # Per-epoch values kept out of the Keras logs so the progress bar stays readable.
        self.extra: dict = {}

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        if self.guard.tripped:
            return
        logs = logs if logs is not None else {}
        seconds = dist.allreduce_mean(self.ctx, time.monotonic() - self._start, "epoch_seconds")
        logs["loss"] = dist.allreduce_mean(self.ctx, float(logs.get("loss", math.nan)), "epoch_loss")
        logs["images_per_second"] = self.images_per_epoch / seconds if seconds > 0 else 0.0
        logs["lr"] = current_learning_rate(self.model.optimizer)
        # Ranks that train BatchNorm hold different moving statistics: average them, so that every rank
        # validates (and keeps) the same network.
        dist.average_variables(self.ctx, batch_norm_statistics(self.model), "batch_norm_statistics")
        dist.reached(f"validation after epoch {epoch + 1}")
        faults.in_validation(self.ctx.rank, epoch)
        out = predict_split(self.model, self.cfg, self.manifest, "val", self.ctx, logits=True)
        summary = summary_metrics(out["labels"], out["probs"], self.label_names, out["mask"])
        logs["val_loss"] = masked_loss(self.loss_fn, out["labels"], out["logits"], out["mask"])
        macro = summary["macro"]["auroc"]
        logs["val_auroc"] = macro if macro is not None else math.nan
        train_auroc, sampled = self._train_auroc(epoch)
        optimizer = self.model.optimizer
        self.extra = {
            "train_auroc": train_auroc,
            "train_eval_images": sampled,
            "loss_name": self.cfg.train.loss.name,  # loss and val_loss are both this function
            "seconds": seconds,
            "images_per_second_per_rank": logs["images_per_second"] / self.ctx.size,
            "ranks": self.ctx.size,
            "val_auroc_per_label": {name: row["auroc"] for name, row in summary["labels"].items()},
            "val_auprc": summary["macro"]["auprc"],
            "skipped_steps_total": int(self.model.nonfinite_total.numpy()),
            "loss_scale": float(optimizer.loss_scale) if hasattr(optimizer, "loss_scale") else None,
        }

    def _train_auroc(self, epoch: int) -> tuple[float | None, int]:
        """(macro AUROC, images) on the fixed train sample, predicted by all ranks like val; (None, 0) when off."""
        images = self.cfg.train.train_eval_images
        if not images:
            return None, 0
        dist.reached(f"train AUROC after epoch {epoch + 1}")
        # logits=True: the function validation traced already (sigmoid applied by predict_split).
        out = predict_split(self.model, self.cfg, self.manifest, "train", self.ctx, sample=images, logits=True)
        macro = summary_metrics(out["labels"], out["probs"], self.label_names, out["mask"])["macro"]["auroc"]
        return macro, len(out["probs"])


class PhaseTracker(tf.keras.callbacks.Callback):
    """Per epoch: tracks the phase's best weights (in memory on every rank, on disk on rank 0),
    stops the phase early after `patience` epochs without improvement, and has rank 0 commit
    the epoch checkpoint, the history line and the resume pointer."""

    def __init__(self, ctx, run: RunDir, phase, index: int, phase_start: int, state: RunState,
                 metrics: EpochMetrics, guard: NonFiniteGuard, keep: int):
        super().__init__()
        self.ctx, self.run, self.phase, self.index = ctx, run, phase, index
        self.phase_start, self.state, self.metrics, self.guard, self.keep = phase_start, state, metrics, guard, keep
        best = state.phase_best.get(str(index), {})
        self.best = best.get("metric", -math.inf)
        self.best_epoch = best.get("epoch", -1)
        self.weights = None  # the phase's best weights, when reached in this process
        self.phase_path = run.phase_weights(index, phase.name)

    def on_epoch_end(self, epoch, logs=None):
        if self.guard.tripped:
            return  # a partial epoch is never committed
        logs = logs or {}
        value = float(logs.get("val_auroc", math.nan))
        best_files = []  # copies of this epoch's checkpoint (commit_epoch serialises the weights once)
        if not math.isnan(value) and value > self.best:
            self.best, self.best_epoch = value, epoch
            self.weights = [w.copy() for w in self.model.get_weights()]
            best_files.append(self.phase_path)
            if self.state.overall_best is None or value > self.state.overall_best:
                self.state.overall_best = value
                best_files.append(self.run.best_weights)
        in_phase = epoch - self.phase_start + 1
        stale = epoch - self.best_epoch
        early = bool(self.phase.early_stopping_patience) and stale >= self.phase.early_stopping_patience
        if early:
            self.model.stop_training = True
        state = self.state
        state.epochs_done, state.phase_index, state.epoch_in_phase = epoch + 1, self.index, in_phase
        state.phase_done = early or in_phase >= self.phase.epochs
        state.phase_best[str(self.index)] = {"metric": self.best, "epoch": self.best_epoch}
        state.ranks = self.ctx.size
        row = {"phase": self.phase.name, "phase_index": self.index, "epoch": epoch, "epoch_in_phase": in_phase - 1,
               "stopped_early": early and in_phase < self.phase.epochs}
        row.update({k: _clean(v) for k, v in logs.items()})
        for key, value in self.metrics.extra.items():
            row[key] = {k: _clean(v) for k, v in value.items()} if isinstance(value, dict) else _clean(value)
        # Written by rank 0 only; every rank's state names the same last checkpoint for its messages.
        self.run.commit_epoch(self.model, state, row, self.keep, also=tuple(best_files))

    def restore_best(self) -> None:
        """Leave the model at the phase's best weights, on every rank."""
        if self.weights is not None:
            self.model.set_weights(self.weights)
        elif self.ctx.primary and os.path.exists(self.phase_path):
            self.model.load_weights(self.phase_path)  # reached before a resume
        if self.weights is None:
            dist.broadcast_variables(self.ctx, self.model.variables)


class TensorBoardWriter(tf.keras.callbacks.Callback):
    """Scalars per epoch (rank 0), in Keras' layout: train/ and validation/ folders holding the same tags
    (epoch_loss, epoch_auroc), so TensorBoard draws the two curves on one chart. train/ also has the
    learning rate, loss scale and images/s (global and per rank); validation/ the AUROC per label."""

    def __init__(self, run: RunDir, metrics: EpochMetrics, guard: NonFiniteGuard):
        super().__init__()
        self.train_writer = tf.summary.create_file_writer(run.tensorboard_folder("train"))
        self.val_writer = tf.summary.create_file_writer(run.tensorboard_folder("validation"))
        self.metrics, self.guard = metrics, guard

    def on_epoch_end(self, epoch, logs=None):
        if self.guard.tripped:
            return
        logs, extra = logs or {}, self.metrics.extra
        train = {"epoch_loss": logs.get("loss"), "epoch_auroc": extra.get("train_auroc"),
                 "epoch_learning_rate": logs.get("lr"), "images_per_second": logs.get("images_per_second"),
                 "images_per_second_per_rank": extra.get("images_per_second_per_rank"),
                 "loss_scale": extra.get("loss_scale")}
        val = {"epoch_loss": logs.get("val_loss"), "epoch_auroc": logs.get("val_auroc"),
               **{f"epoch_auroc/{k}": v for k, v in extra.get("val_auroc_per_label", {}).items()}}
        for writer, values in ((self.train_writer, train), (self.val_writer, val)):
            with writer.as_default(step=epoch):
                for tag, value in values.items():
                    if value is not None and math.isfinite(float(value)):
                        tf.summary.scalar(tag, float(value))
            writer.flush()


def _clean(value):
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):  # counts (ranks, skipped steps) stay integers
        return int(value)
    value = float(np.asarray(value))
    return None if math.isnan(value) or math.isinf(value) else value
