"""`medtl train`: phased transfer learning over the shards, single process or under Horovod.

    medtl train --config jobs/smoke.yaml --workdir runs/smoke --set data.records=records/
    horovodrun -np 2 -H localhost:2 --gloo medtl train --config jobs/smoke.yaml --workdir runs/smoke ...

Re-running the same command with the same --workdir resumes after the last
completed epoch (with any number of ranks); a finished run is left as it is.
The run folder's layout is medtl.train.rundir's.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np

from medtl import dist
from medtl.config import Config
from medtl.data import verify
from medtl.data.manifest import (Manifest, check_input_size, check_train_split, check_val_split, oversize_warning,
                                 read_manifest)
from medtl.data.pipeline import (build_dataset, build_step_inputs_fn, device_step, pipeline_errors, records_in,
                                 split_size)
from medtl.errors import MedtlError, RunFailure
from medtl.models.build import build_model, set_precision
from medtl.models.heads import describe_head
from medtl.models.losses import build_loss
from medtl.tf import tf
from medtl.train import callbacks as cb
from medtl.train.phases import apply_phase, check_phases_trainable, trainable_variable_names
from medtl.train.rundir import RunDir, RunState, check_outside_records
from medtl.utils import faults
from medtl.utils.log import log, warning


def _steps_per_epoch(manifest: Manifest, cfg: Config, ctx: dist.Context) -> int:
    records = records_in(cfg, manifest, "train")
    global_batch_size = cfg.train.batch_size * ctx.size
    steps = records // global_batch_size
    if steps < 1:
        fraction = cfg.data.train_fraction
        what = (f"data.train_fraction={fraction:g} keeps {records} train records" if fraction < 1
                else f"the train split has {records} records")
        raise MedtlError(
            f"{what}, fewer than one global batch of {global_batch_size} ({cfg.train.batch_size} x {ctx.size} "
            f"ranks); lower train.batch_size or {'raise data.train_fraction' if fraction < 1 else 'ingest more studies'}"
        )
    return steps


def build_schedule(phase, learning_rate: float, steps_per_epoch: int):
    """Warmup (linear from 0) then cosine decay to 0, or constant, over the phase's steps."""
    total = phase.epochs * steps_per_epoch
    warmup = int(round(phase.warmup_epochs * steps_per_epoch))
    if phase.schedule == "constant" and not warmup:
        return learning_rate
    if phase.schedule == "constant":
        return tf.keras.optimizers.schedules.PiecewiseConstantDecay([warmup], [learning_rate, learning_rate])
    return tf.keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else learning_rate, decay_steps=max(total - warmup, 1),
        warmup_target=learning_rate if warmup else None, warmup_steps=warmup)


def build_optimizer(phase, learning_rate: float, steps_per_epoch: int):
    """The phase's optimizer. Gradients are averaged across ranks in the train step, and
    compile() adds loss scaling for mixed_float16."""
    schedule = build_schedule(phase, learning_rate, steps_per_epoch)
    if phase.optimizer == "sgd":
        return tf.keras.optimizers.SGD(schedule, momentum=phase.momentum, weight_decay=phase.weight_decay or None)
    if phase.optimizer == "adamw":
        return tf.keras.optimizers.AdamW(schedule, weight_decay=phase.weight_decay)
    return tf.keras.optimizers.Adam(schedule)


def _configure_threads(cfg: Config) -> None:
    # Must run before TensorFlow executes its first op.
    if cfg.train.intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(cfg.train.intra_op_threads)
    if cfg.train.inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(cfg.train.inter_op_threads)


def _prepare_run(ctx: dist.Context, cfg: Config, run: RunDir) -> RunState:
    """Rank 0 reads (or starts) the run folder; every rank gets the same resume state."""
    state = None
    if ctx.primary:
        run.create()
        state = run.read_state()
        if state is None:
            run.write_config(cfg)
            run.trim_history(0)
            state = RunState(seed=cfg.seed)
        else:
            changed = run.changed_settings(cfg)
            if changed:
                log(f"train: resuming with changed execution settings: {', '.join(changed)}")
                run.write_config(cfg)
            run.trim_history(state.history_lines)
        run.write_index()
    shared = dist.broadcast_object(ctx, dataclasses.asdict(state) if state else None, "run_state")
    return RunState(**shared)


def _phase_plan(cfg: Config, state: RunState) -> list[tuple[int, int]]:
    """(phase index, epochs already done in it) for the phases still to run."""
    plan = []
    for index in range(len(cfg.phases)):
        if index < state.phase_index or (index == state.phase_index and state.phase_done and state.epochs_done):
            continue
        done = state.epoch_in_phase if index == state.phase_index and state.epochs_done else 0
        plan.append((index, done))
    return plan


def _weights_fingerprint(model) -> str:
    """Hash of the network's layer weights (not per-rank bookkeeping such as metric totals)."""
    digest = hashlib.sha256()
    for layer in model.layers:
        for w in layer.get_weights():
            digest.update(np.ascontiguousarray(w).tobytes())
    return digest.hexdigest()[:13]


def _check_in_sync(ctx: dist.Context, model, phase_name: str) -> str:
    """Every rank must hold the same weights after a phase; returns the fingerprint."""
    fingerprint = _weights_fingerprint(model)
    values = dist.fingerprints_agree(ctx, float(int(fingerprint, 16)))
    if len(set(values)) != 1:
        raise RunFailure(f"ranks hold different weights after phase {phase_name!r} (fingerprints "
                         f"{', '.join(f'{int(v):013x}' for v in values)}); training is not synchronised")
    log(f"phase {phase_name!r}: weights identical on {ctx.size} rank(s) (fingerprint {fingerprint})")
    return fingerprint


def _last_phase(cfg: Config, until_phase: str | None) -> int:
    """The index of the last phase this run may train (`--until-phase NAME`; default: the last)."""
    names = [phase.name for phase in cfg.phases]
    if until_phase is None:
        return len(names) - 1
    if until_phase not in names:
        raise MedtlError(f"--until-phase {until_phase!r} is not a phase of this config; its phases are: "
                         f"{', '.join(names)}")
    return names.index(until_phase)


def train(cfg: Config, workdir: str, until_phase: str | None = None) -> dict:
    """Run (or resume) the phases of `cfg` up to and including `until_phase` (default: all of them);
    returns a summary. A later run with the same workdir resumes where this one stopped."""
    last = _last_phase(cfg, until_phase)
    ctx, manifest, run, state = open_run(cfg, workdir, ("train", "val"))  # refuses unlabeled records
    if state.finished(cfg):
        log(f"train: {workdir} is complete ({state.epochs_done} epochs, best val macro AUROC "
            f"{state.overall_best:.4f}); nothing to do. Train into a new --workdir to start again.")
        return {"best_val_auroc": state.overall_best, "epochs": state.epochs_done, "workdir": workdir, "resumed": False,
                "phase_best_val_auroc": _phase_bests(cfg, state)}
    plan = [(index, done) for index, done in _phase_plan(cfg, state) if index <= last]
    if not plan:
        log(f"train: phase '{cfg.phases[last].name}' of {workdir} is already complete ({state.epochs_done} epochs); "
            f"nothing to do. Run without --until-phase, or with a later phase, to continue.")
        return {"best_val_auroc": state.overall_best, "epochs": state.epochs_done, "workdir": workdir, "resumed": False,
                "phase_best_val_auroc": _phase_bests(cfg, state)}

    tf.keras.utils.set_random_seed(cfg.seed + 1000 * state.epochs_done)
    set_precision(cfg.train.precision)
    model = build_model(cfg, manifest.num_labels)
    check_phases_trainable(model, cfg)
    loss = build_loss(cfg.train.loss, manifest)
    steps = _steps_per_epoch(manifest, cfg, ctx)
    global_batch_size = cfg.train.batch_size * ctx.size
    log(f"train: {records_in(cfg, manifest, 'train')} train / {split_size(manifest, 'val')} val records, "
        f"{manifest.num_labels} labels, {ctx.size} rank(s), global batch {global_batch_size}, "
        f"{steps} steps per epoch, {cfg.model.backbone} at {cfg.data.image_size} px, {cfg.train.precision}, "
        f"loss {cfg.train.loss.name}")
    log(f"train: head {describe_head(model, cfg.model.head)}")
    if device_step(cfg):
        applies = f", applies {', '.join(t.name for t in cfg.data.augment)}" if cfg.data.augment else ""
        channels = f"makes {cfg.data.channels} channel{'s' if cfg.data.channels > 1 else ''}"
        log(f"train: data.augment_on: device: the training step scales the stored pixels{applies} and {channels}"
            + ("" if cfg.data.augment else " (no augmentation policy)"))
    if state.epochs_done:
        log(f"train: resuming {workdir} after epoch {state.epochs_done} (phase {state.phase_index + 1}, "
            f"checkpoint {state.checkpoint}, written by {state.ranks} rank(s))")

    watchdog = dist.StallWatchdog(ctx, cfg.train.stall_shutdown_seconds).start()
    try:
        with cb.sigterm_flag() as sigterm:
            fingerprints = _run_phases(ctx, cfg, run, manifest, state, model, loss, steps, (watchdog, sigterm), plan)
    finally:
        watchdog.stop()
    summary = {"best_val_auroc": state.overall_best, "epochs": state.epochs_done, "workdir": workdir,
               "ranks": ctx.size, "weights_fingerprint": fingerprints, "phase_best_val_auroc": _phase_bests(cfg, state)}
    if last < len(cfg.phases) - 1:
        summary["stopped_after_phase"] = cfg.phases[last].name
        log(f"train: stopped after phase '{cfg.phases[last].name}' (--until-phase); the same command with the "
            f"same --workdir and a later --until-phase (or none) continues with phase "
            f"'{cfg.phases[last + 1].name}'")
    run.write_summary(summary)
    run.write_index()
    return summary


def _phase_bests(cfg: Config, state: RunState) -> dict[str, float]:
    """Phase name -> its best val macro AUROC, for the phases trained so far."""
    return {cfg.phases[int(index)].name: best["metric"] for index, best in sorted(state.phase_best.items())
            if best.get("metric") is not None and best["metric"] > float("-inf")}


def _run_phases(ctx, cfg, run: RunDir, manifest, state, model, loss, steps, signals, plan) -> dict:
    """The phases of `plan` ((index, epochs done) each); returns {phase name: weights fingerprint}.
    `signals` is (the stall watchdog, the SIGTERM flag)."""
    watchdog, sigterm = signals
    global_batch_size = cfg.train.batch_size * ctx.size
    fingerprints = {}
    for position, (index, done_in_phase) in enumerate(plan):
        phase = cfg.phases[index]
        first_epoch = state.epochs_done
        phase_start = first_epoch - done_in_phase
        if position == 0 and index > 0 and not done_in_phase:
            _restore_previous_best(ctx, model, run, cfg, index)
        trainable = apply_phase(model, cfg, phase)
        learning_rate = phase.learning_rate * dist.lr_scale(ctx, cfg.train.lr_scaling)
        # XLA for the whole step, or only for its forward/backward pass when the step also holds what XLA cannot
        # compile: Horovod's allreduce, or the device augmentation's ImageProjectiveTransformV3.
        xla_outside = ctx.distributed or device_step(cfg)
        model.compile(optimizer=build_optimizer(phase, learning_rate, steps), loss=loss,
                      jit_compile=cfg.train.jit_compile and not xla_outside)
        model.reduce_gradients = dist.gradient_reducer(ctx, cfg.train.fp16_allreduce)
        model.jit_gradients = cfg.train.jit_compile and xla_outside
        model._xla_gradients = None  # retrace for this phase's trainable variables
        model.optimizer.build(model.trainable_variables)
        if done_in_phase and ctx.primary:
            model.load_weights(run.checkpoint(state.checkpoint))
        dist.broadcast_variables(ctx, model.variables + list(model.optimizer.variables))
        run.record_trainable(phase.name, trainable_variable_names(model))
        params = int(sum(np.prod(v.shape) for v in model.trainable_variables))
        log(f"phase {index + 1}/{len(cfg.phases)} '{phase.name}': epoch(s) {done_in_phase + 1}..{phase.epochs} of "
            f"{phase.epochs}, "
            f"{phase.optimizer} lr {learning_rate:g}, {len(trainable)} base layers trainable ({params:,} trainable "
            f"parameters with the head), BatchNorm {'training' if phase.train_batch_norm else 'frozen'}")
        guard = cb.NonFiniteGuard(cfg.train.nonfinite_patience)
        metrics = cb.EpochMetrics(cfg, manifest, ctx, steps * global_batch_size, guard, loss)
        tracker = cb.PhaseTracker(ctx, run, phase, index, phase_start, state, metrics, guard,
                                  cfg.train.keep_checkpoints)
        callbacks = [cb.Heartbeat(watchdog, steps), guard, metrics, tracker]
        if faults.active("kill") or faults.active("stall"):
            callbacks.insert(0, cb.FaultHooks(ctx.rank, steps))
        if ctx.primary:
            callbacks.append(cb.TensorBoardWriter(run, metrics, guard))
        callbacks.append(cb.StopOnSigterm(sigterm, state, phase.name, steps))  # last: after an epoch's commit
        train_ds = build_dataset(cfg, "train", ctx.rank, ctx.size, manifest, first_epoch=first_epoch)
        model.prepare_inputs = build_step_inputs_fn(cfg, ctx.rank, first_epoch) if device_step(cfg) else None
        train_ds = faults.corrupt_inputs(train_ds, ctx.rank, first_epoch * steps)
        try:
            with pipeline_errors():  # a shard check failing inside tf.data: one line naming the shard
                model.fit(train_ds, epochs=phase_start + phase.epochs, initial_epoch=first_epoch,
                          steps_per_epoch=steps, callbacks=callbacks, verbose=_verbosity(ctx))
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError, tf.errors.FailedPreconditionError) as exc:
            # A damaged shard met mid-training: name it (deep check) rather than skip it.
            verify.raise_if_damaged(cfg.data.records, manifest, ["train", "val"], exc)
        if guard.tripped:
            epoch, streak = guard.tripped
            dist.primary_reports_agreed_stop(ctx)  # the streak is of averaged gradients: every rank is here
            raise RunFailure(
                f"the inputs, loss or gradients were not finite for the last {streak} steps of epoch {epoch + 1} "
                f"(phase '{phase.name}'; those updates were skipped); training stopped on all ranks. The last "
                f"good checkpoint is {state.checkpoint or 'none (no epoch completed)'} and the best weights are "
                f"untouched. Lower the learning rate (phases.{index}.learning_rate) or check the data.")
        tracker.restore_best()  # the next phase starts from this phase's best weights
        fingerprints[phase.name] = _check_in_sync(ctx, model, phase.name)
        log(f"phase '{phase.name}' done: best val macro AUROC {tracker.best:.4f} (epoch {tracker.best_epoch + 1})")
    return fingerprints


def open_run(cfg: Config, workdir: str, splits: tuple[str, ...], unlabeled_ok: bool = False):
    """What every training job (`medtl train`, `medtl pretrain`) does before it builds a model: TensorFlow's
    threads and determinism, Horovod, the records' checks (the `splits` it reads must hold images and be
    undamaged; val also labels of both kinds), outputs outside the records, then the run folder and its
    state, resumed if there is one. Returns (ctx, manifest, run, state)."""
    _configure_threads(cfg)
    if cfg.data.deterministic:
        # Same batches are not enough for the same weights: kernels must also reduce in a fixed order.
        tf.config.experimental.enable_op_determinism()
    ctx = dist.init(cfg.train.stall_shutdown_seconds)
    manifest = read_manifest(cfg.data.records, unlabeled_ok=unlabeled_ok)
    check_train_split(cfg.data.records, manifest)
    check_input_size(cfg.data.records, manifest, cfg.data.image_size, cfg.data.allow_upsample)
    if "val" in splits:
        check_val_split(cfg.data.records, manifest)
    check_outside_records(cfg, workdir)
    damaged = verify.check_cheap(cfg.data.records, manifest, list(splits))
    if damaged:
        raise RunFailure(f"{damaged[0]}; run `medtl verify {cfg.data.records}` and re-ingest or restore it")
    records_in(cfg, manifest, "train")  # data.train_fraction's subset, refused here if it lacks a label's positives
    oversize = oversize_warning(cfg.data.records, manifest, cfg.data.image_size)
    if oversize:
        warning(oversize)
    run = RunDir(workdir, ctx.primary)
    return ctx, manifest, run, _prepare_run(ctx, cfg, run)


def _restore_previous_best(ctx, model, run: RunDir, cfg, index: int) -> None:
    """A run resumed at a phase boundary starts the phase from the previous phase's best weights
    (within one process they are kept in memory; see PhaseTracker.restore_best)."""
    path = run.phase_weights(index - 1, cfg.phases[index - 1].name)
    if ctx.primary and os.path.exists(path):
        model.load_weights(path)
    dist.broadcast_variables(ctx, model.variables)


def _verbosity(ctx: dist.Context) -> int:
    if not ctx.primary:
        return 0
    import sys

    return 1 if sys.stdout.isatty() else 2
