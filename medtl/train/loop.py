"""`medtl train`: phased transfer learning over the shards, single process or under Horovod.

    medtl train --config jobs/smoke.yaml --workdir runs/smoke
    horovodrun -np 2 -H localhost:2 --gloo medtl train --config jobs/smoke.yaml --workdir runs/smoke

Run folder: config.yaml (resolved), history.jsonl (one line per epoch),
checkpoints/best.weights.h5 (weights with the best val macro AUROC over all phases) and
checkpoints/phase<i>-<name>.weights.h5 (best of each phase).
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

from medtl import dist
from medtl.config import Config, save_config
from medtl.data.ingest import read_manifest
from medtl.data import verify
from medtl.data.pipeline import build_dataset, split_size
from medtl.errors import MedtlError
from medtl.models.build import build_model, set_precision
from medtl.models.losses import build_loss
from medtl.tf import tf
from medtl.train import callbacks as cb
from medtl.train.phases import apply_phase, check_phases_trainable
from medtl.utils.log import log

CONFIG_FILE = "config.yaml"
HISTORY_FILE = "history.jsonl"
CHECKPOINT_DIR = "checkpoints"
BEST_WEIGHTS = "best.weights.h5"


def phase_weights_name(index: int, name: str) -> str:
    return f"phase{index}-{name}.weights.h5"


def _steps_per_epoch(manifest: dict, cfg: Config, ctx: dist.Context) -> int:
    records = split_size(manifest, "train")
    global_batch_size = cfg.train.batch_size * ctx.size
    steps = records // global_batch_size
    if steps < 1:
        raise MedtlError(
            f"the train split has {records} records, fewer than one global batch of {global_batch_size} "
            f"({cfg.train.batch_size} x {ctx.size} ranks); lower train.batch_size or ingest more studies"
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


def _build_optimizer(ctx: dist.Context, phase, learning_rate: float, steps_per_epoch: int):
    # Horovod averages the gradients; mixed precision loss scaling is added by compile().
    schedule = build_schedule(phase, learning_rate, steps_per_epoch)
    return dist.wrap_optimizer(ctx, tf.keras.optimizers.Adam(schedule))


def train(cfg: Config, workdir: str) -> dict:
    """Run every phase of `cfg`; returns {'best_val_auroc', 'epochs', 'workdir'}."""
    ctx = dist.init()
    manifest = read_manifest(cfg.data.records)
    damaged = verify.check_cheap(cfg.data.records, manifest, ["train", "val"])
    if damaged:
        raise MedtlError(f"{damaged[0]}; run `medtl verify {cfg.data.records}` and re-ingest or restore it")
    label_names = manifest["labels"]
    checkpoints = os.path.join(workdir, CHECKPOINT_DIR)
    if ctx.primary:
        os.makedirs(checkpoints, exist_ok=True)
        save_config(cfg, os.path.join(workdir, CONFIG_FILE))
        history_path = os.path.join(workdir, HISTORY_FILE)
        if os.path.exists(history_path):
            os.remove(history_path)

    tf.keras.utils.set_random_seed(cfg.seed)
    set_precision(cfg.train.precision)
    model = build_model(cfg, len(label_names))
    check_phases_trainable(model, cfg)
    steps = _steps_per_epoch(manifest, cfg, ctx)
    train_ds = build_dataset(cfg, "train", ctx.rank, ctx.size, manifest)
    global_batch_size = cfg.train.batch_size * ctx.size
    log(f"train: {split_size(manifest, 'train')} train / {split_size(manifest, 'val')} val records, "
        f"{len(label_names)} labels, {ctx.size} rank(s), global batch {global_batch_size}, "
        f"{steps} steps per epoch, {cfg.model.backbone} at {cfg.data.image_size} px, {cfg.train.precision}")

    epoch = 0
    overall_best = -math.inf
    for index, phase in enumerate(cfg.phases):
        trainable = apply_phase(model, cfg, phase)
        learning_rate = phase.learning_rate * dist.lr_scale(ctx, cfg.train.lr_scaling)
        model.compile(optimizer=_build_optimizer(ctx, phase, learning_rate, steps), loss=build_loss())
        params = int(sum(np.prod(v.shape) for v in model.trainable_variables))
        log(f"phase {index + 1}/{len(cfg.phases)} '{phase.name}': {phase.epochs} epoch(s), lr {learning_rate:g}, "
            f"{len(trainable)} base layers trainable ({params:,} trainable parameters with the head), "
            f"BatchNorm {'training' if phase.train_batch_norm else 'frozen'}")
        metrics = cb.EpochMetrics(cfg, manifest, ctx, steps * global_batch_size)
        best = cb.BestWeights(ctx, os.path.join(checkpoints, phase_weights_name(index, phase.name)),
                              os.path.join(checkpoints, BEST_WEIGHTS), overall_best)
        callbacks = dist.broadcast_callbacks(ctx) + [metrics, best]
        if ctx.primary:
            callbacks.append(cb.HistoryWriter(os.path.join(workdir, HISTORY_FILE), index, phase.name, epoch,
                                              metrics))
        try:
            model.fit(train_ds, epochs=epoch + phase.epochs, initial_epoch=epoch, steps_per_epoch=steps,
                      callbacks=callbacks, verbose=_verbosity(ctx))
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as exc:
            # A damaged shard met mid-training: name it (deep check) rather than skip it.
            verify.raise_if_damaged(cfg.data.records, manifest, ["train", "val"], exc)
        epoch += phase.epochs
        overall_best = best.overall_best
        best.restore()  # the next phase starts from this phase's best weights
        log(f"phase '{phase.name}' done: best val macro AUROC {best.best:.4f} (epoch {best.best_epoch + 1})")
    summary = {"best_val_auroc": overall_best, "epochs": epoch, "workdir": workdir}
    if ctx.primary:
        with open(os.path.join(workdir, "train_summary.json"), "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2)
    return summary


def _verbosity(ctx: dist.Context) -> int:
    if not ctx.primary:
        return 0
    import sys

    return 1 if sys.stdout.isatty() else 2
