"""The self-supervised training loop of `medtl pretrain` (pretrain.method: simclr), single process or under Horovod.

    medtl pretrain --config JOB.yaml --workdir runs/pre --set pretrain.method=simclr
    horovodrun -np 2 -H localhost:2 --gloo medtl pretrain --config JOB.yaml --workdir runs/pre \
        --set pretrain.method=simclr

The job's phases set epochs, learning rates, warmup and what of the base trains, as in `medtl train`:
learning rates scale with the ranks (train.lr_scaling), rank 0 alone writes, and the same command with the
same --workdir resumes after the last completed epoch (medtl.train.rundir). There is no validation: a phase
keeps its last weights, not a best epoch. Labels are never read.
"""
from __future__ import annotations

import time

import numpy as np

from medtl import dist
from medtl.config import Config, check_views_batch, negatives_per_anchor
from medtl.data import verify
from medtl.data.pipeline import build_views_dataset, pipeline_errors, records_in
from medtl.errors import RunFailure
from medtl.models.backbones import batch_norm_statistics
from medtl.models.build import set_precision
from medtl.models.contrastive import build_simclr_model
from medtl.tf import tf
from medtl.train import callbacks as cb
from medtl.train.loop import (_check_in_sync, _phase_plan, _restore_previous_best, _steps_per_epoch, _verbosity,
                              build_optimizer, open_run)
from medtl.train.phases import apply_phase, check_phases_trainable, trainable_variable_names
from medtl.train.rundir import RunDir, RunState
from medtl.utils import faults
from medtl.utils.log import log


class ContrastiveEpochs(tf.keras.callbacks.Callback):
    """Per epoch, on every rank: the rank-averaged contrastive loss and positive-pair top-1 accuracy, one log
    line (rank 0), BatchNorm moving statistics averaged over ranks (so all hold the same weights), then the
    epoch's commit (checkpoint, history line, resume pointer: rank 0 writes). At the end
    of a phase its weights are kept (RunDir.phase_weights), as the next phase and the base file start there."""

    def __init__(self, ctx, run: RunDir, phase, index: int, phase_start: int, state: RunState,
                 guard: cb.NonFiniteGuard, keep: int, images_per_epoch: int, negatives: int):
        super().__init__()
        self.ctx, self.run, self.phase, self.index, self.phase_start = ctx, run, phase, index, phase_start
        self.state, self.guard, self.keep = state, guard, keep
        self.images_per_epoch, self.negatives = images_per_epoch, negatives
        self._start = 0.0
        self.last: dict = {}

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        if self.guard.tripped:
            return  # a partial epoch is never committed
        logs = logs or {}
        seconds = dist.allreduce_mean(self.ctx, time.monotonic() - self._start, "epoch_seconds")
        loss = dist.allreduce_mean(self.ctx, float(logs.get("loss", np.nan)), "epoch_loss")
        top1 = dist.allreduce_mean(self.ctx, float(logs.get("positive_top1", np.nan)), "epoch_positive_top1")
        lr = cb.current_learning_rate(self.model.optimizer)
        in_phase = epoch - self.phase_start + 1
        images_per_second = self.images_per_epoch / max(seconds, 1e-9)
        log(f"simclr epoch {epoch + 1} (phase '{self.phase.name}' {in_phase}/{self.phase.epochs}): contrastive loss "
            f"{loss:.4f}, positive-pair top-1 {top1:.3f} (chance {1 / (self.negatives + 1):.3f}), lr {lr:.3g}, "
            f"{images_per_second:.1f} img/s")
        dist.average_variables(self.ctx, batch_norm_statistics(self.model), "batch_norm_statistics")
        state = self.state
        state.epochs_done, state.phase_index, state.epoch_in_phase = epoch + 1, self.index, in_phase
        state.phase_done = in_phase >= self.phase.epochs
        state.ranks = self.ctx.size
        self.last = {"loss": cb._clean(loss), "positive_top1": cb._clean(top1)}
        row = {"phase": self.phase.name, "phase_index": self.index, "epoch": epoch, "epoch_in_phase": in_phase - 1,
               **self.last, "lr": lr, "seconds": seconds, "images_per_second": images_per_second,
               "ranks": self.ctx.size, "negatives_per_anchor": self.negatives,
               "skipped_steps_total": int(self.model.nonfinite_total.numpy())}
        self.run.commit_epoch(self.model, state, row, self.keep,
                              also=(self.run.phase_weights(self.index, self.phase.name),) if state.phase_done else ())


def train_simclr(cfg: Config, workdir: str):
    """Run (or resume) the phases of `cfg` with the NT-Xent loss; returns (summary, model). The model holds the
    last phase's final weights on every rank (rank 0's alone when the run was already complete)."""
    check_views_batch(cfg.train.batch_size, 1)  # per rank; the same on any number of ranks
    ctx, manifest, run, state = open_run(cfg, workdir, ("train",), unlabeled_ok=True)  # labels are never read
    tf.keras.utils.set_random_seed(cfg.seed + 1000 * state.epochs_done)
    set_precision(cfg.train.precision)
    model = build_simclr_model(cfg)
    summary = {"epochs": state.epochs_done, "workdir": workdir, "ranks": ctx.size, "best_val_auroc": None,
               "manifest_digest": manifest.digest()}
    if state.finished(cfg):
        last = len(cfg.phases) - 1
        log(f"pretrain: {workdir} is complete ({state.epochs_done} epochs); nothing to train. Pretrain into a new "
            "--workdir to start again.")
        if ctx.primary:
            model.load_weights(run.phase_weights(last, cfg.phases[last].name))
        return summary, model
    check_phases_trainable(model, cfg)
    steps = _steps_per_epoch(manifest, cfg, ctx)
    negatives = negatives_per_anchor(cfg.train.batch_size, ctx.size)
    log(f"pretrain: simclr on {records_in(cfg, manifest, 'train')} train records (labels unused), {ctx.size} rank(s), "
        f"global batch {cfg.train.batch_size * ctx.size} ({cfg.train.batch_size} per rank, 2 views each), "
        f"{negatives} negatives per anchor gathered from {ctx.size} rank(s), temperature {cfg.pretrain.temperature:g}, "
        f"{steps} steps per epoch, {cfg.model.backbone} at {cfg.data.image_size} px, {cfg.train.precision}")
    if state.epochs_done:
        log(f"pretrain: resuming {workdir} after epoch {state.epochs_done} (phase {state.phase_index + 1}, "
            f"checkpoint {state.checkpoint}, written by {state.ranks} rank(s))")
    watchdog = dist.StallWatchdog(ctx, cfg.train.stall_shutdown_seconds).start()
    try:
        with cb.sigterm_flag() as sigterm:
            fingerprints, last = _run_phases(ctx, cfg, run, manifest, state, model, steps, (watchdog, sigterm))
    finally:
        watchdog.stop()
    summary.update({"epochs": state.epochs_done, "weights_fingerprint": fingerprints, **last})
    run.write_summary(summary)
    return summary, model


def _compile_phase(ctx, cfg: Config, model, phase, steps: int) -> float:
    """Compile `model` for a phase (trainable set by apply_phase before); returns the scaled learning rate."""
    learning_rate = phase.learning_rate * dist.lr_scale(ctx, cfg.train.lr_scaling)
    model.compile(optimizer=build_optimizer(phase, learning_rate, steps),
                  jit_compile=cfg.train.jit_compile and not ctx.distributed)
    model.reduce_gradients = dist.gradient_reducer(ctx, cfg.train.fp16_allreduce)
    model.gather_rows = dist.rows_gatherer(ctx, "simclr_projections")
    model.rank = ctx.rank
    model.jit_gradients = False  # the gather sits inside the gradient computation; Horovod ops have no XLA kernels
    model._xla_gradients = None
    model.optimizer.build(model.trainable_variables)
    return learning_rate


def _run_phases(ctx, cfg: Config, run: RunDir, manifest, state: RunState, model, steps: int, signals):
    """The phases still to run; returns ({phase name: weights fingerprint}, the last epoch's loss and top-1)."""
    watchdog, sigterm = signals
    fingerprints, last = {}, {}
    negatives = negatives_per_anchor(cfg.train.batch_size, ctx.size)
    for position, (index, done_in_phase) in enumerate(_phase_plan(cfg, state)):
        phase = cfg.phases[index]
        first_epoch = state.epochs_done
        phase_start = first_epoch - done_in_phase
        if position == 0 and index > 0 and not done_in_phase:
            _restore_previous_best(ctx, model, run, cfg, index)  # the previous phase's final weights
        trainable = apply_phase(model, cfg, phase)
        learning_rate = _compile_phase(ctx, cfg, model, phase, steps)
        if done_in_phase and ctx.primary:
            model.load_weights(run.checkpoint(state.checkpoint))
        dist.broadcast_variables(ctx, model.variables + list(model.optimizer.variables))
        run.record_trainable(phase.name, trainable_variable_names(model))
        log(f"phase {index + 1}/{len(cfg.phases)} '{phase.name}': epoch(s) {done_in_phase + 1}..{phase.epochs} of "
            f"{phase.epochs}, {phase.optimizer} lr {learning_rate:g}, {len(trainable)} base layers trainable, "
            f"BatchNorm {'training' if phase.train_batch_norm else 'frozen'}")
        guard = cb.NonFiniteGuard(cfg.train.nonfinite_patience)
        epochs = ContrastiveEpochs(ctx, run, phase, index, phase_start, state, guard, cfg.train.keep_checkpoints,
                                   steps * cfg.train.batch_size * ctx.size, negatives)
        callbacks = [cb.Heartbeat(watchdog, steps), guard, epochs]
        if faults.active("kill") or faults.active("stall"):
            callbacks.insert(0, cb.FaultHooks(ctx.rank, steps))
        callbacks.append(cb.StopOnSigterm(sigterm, state, phase.name, steps))  # last: after an epoch's commit
        views = build_views_dataset(cfg, ctx.rank, ctx.size, manifest, first_epoch=first_epoch)
        try:
            with pipeline_errors():
                model.fit(views, epochs=phase_start + phase.epochs, initial_epoch=first_epoch, steps_per_epoch=steps,
                          callbacks=callbacks, verbose=_verbosity(ctx))
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError, tf.errors.FailedPreconditionError) as exc:
            verify.raise_if_damaged(cfg.data.records, manifest, ["train"], exc)
        if guard.tripped:
            epoch, streak = guard.tripped
            dist.primary_reports_agreed_stop(ctx)
            raise RunFailure(
                f"the inputs, contrastive loss or gradients were not finite for the last {streak} steps of epoch "
                f"{epoch + 1} (phase '{phase.name}'; those updates were skipped); pretraining stopped on all ranks. "
                f"The last good checkpoint is {state.checkpoint or 'none (no epoch completed)'}. Lower the learning "
                f"rate (phases.{index}.learning_rate), raise pretrain.temperature, or check the data.")
        fingerprints[phase.name] = _check_in_sync(ctx, model, phase.name)
        last = epochs.last or last
    return fingerprints, last
