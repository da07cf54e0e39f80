"""`medtl bench train`: what medtl's training path costs, and how it scales, in one run.

1. Overhead: images/s of `medtl train` (tf.data from shards, the Horovod-ready train
   step, callbacks) against a plain `model.fit` on in-memory tensors with the same
   model, phase and batch size. Goal: >= 0.9. When the config augments, medtl train is
   also timed with augmentation off, to split the pipeline's own cost from the
   augmentation's work (which shares the CPU with the model on a machine without a GPU).
2. Scaling (--scaling): `horovodrun -np 2` against `-np 1`, one TensorFlow thread per
   rank and each rank pinned to its own CPU core (medtl.bench.pinned), same per-rank
   batch. Goal: >= 1.8x (90% efficiency).
Epoch 1 (tracing) is excluded; the median of the other epochs counts.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from medtl.config import Config, dump_config
from medtl.data.manifest import Manifest, manifest_path
from medtl.utils import fs
from medtl.utils.log import log


def _records(root: str, cfg: Config, n: int) -> str:
    from medtl.data.ingest import IngestOptions, ingest
    from medtl.data.synth import synthesize

    studies, records = os.path.join(root, "studies"), os.path.join(root, "records")
    if not os.path.exists(manifest_path(records)):
        log(f"bench train: writing {n} synthetic studies and ingesting them at {cfg.data.image_size} px")
        synthesize(studies, n, seed=0, size=max(96, cfg.data.image_size))
        ingest(IngestOptions(images=os.path.join(studies, "images"), labels=os.path.join(studies, "labels.csv"),
                             out=records, image_size=cfg.data.image_size, val_fraction=0.1, test_fraction=0.1,
                             shard_mb=1.0, progress=False))
    return records


def _one_phase(cfg: Config, records: str, epochs: int, phase_index: int, **train) -> Config:
    phase = dataclasses.replace(cfg.phases[phase_index], epochs=epochs, early_stopping_patience=0, warmup_epochs=0)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, records=records), phases=(phase,),
                               train=dataclasses.replace(cfg.train, **train))


def _history_rate(workdir: str) -> float:
    from medtl.train.rundir import RunDir

    rates = [row["images_per_second"] for row in RunDir(workdir).read_history()]
    return statistics.median(rates[1:]) if len(rates) > 1 else rates[0]


def medtl_rate(cfg: Config, workdir: str) -> float:
    from medtl.train.loop import train

    train(cfg, workdir)
    return _history_rate(workdir)


def plain_fit_rate(cfg: Config, manifest: Manifest) -> float:
    """A plain Keras model (default train step) fitted on random in-memory tensors."""
    from medtl.models.build import build_model, set_precision
    from medtl.models.losses import build_loss
    from medtl.tf import tf
    from medtl.train.loop import build_optimizer
    from medtl.train.phases import apply_phase

    set_precision(cfg.train.precision)
    classifier = build_model(cfg, manifest.num_labels)
    phase = cfg.phases[0]
    apply_phase(classifier, cfg, phase)
    model = tf.keras.Model(classifier.inputs, classifier.outputs)
    steps = manifest.records("train") // cfg.train.batch_size
    model.compile(optimizer=build_optimizer(phase, phase.learning_rate, steps), loss=build_loss(cfg.train.loss, manifest))
    rng = np.random.default_rng(0)
    n = steps * cfg.train.batch_size
    size, channels, labels = cfg.data.image_size, cfg.data.channels, manifest.num_labels
    x = rng.uniform(0, 255, (n, size, size, channels)).astype(np.float32)
    y = rng.integers(0, 2, (n, labels)).astype(np.float32)
    # The ideal input: batches already in memory, one iterator for all epochs.
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(cfg.train.batch_size, drop_remainder=True)
    ds = ds.cache().repeat().prefetch(tf.data.AUTOTUNE)
    times = []

    class Timer(tf.keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.start)

    model.fit(ds, steps_per_epoch=steps, epochs=phase.epochs, callbacks=[Timer()], verbose=0)
    return n / statistics.median(times[1:] if len(times) > 1 else times)


def scaling_rates(cfg: Config, root: str) -> dict[int, float]:
    """Global images/s of `medtl train` under horovodrun with 1 and 2 ranks, one thread and one core each."""
    horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    rates = {}
    for ranks in (1, 2):
        workdir = os.path.join(root, f"scaling-{ranks}")
        shutil.rmtree(workdir, ignore_errors=True)
        config = os.path.join(root, "scaling.yaml")
        fs.write_text_atomic(config, dump_config(cfg))
        cmd = [horovodrun, "-np", str(ranks), "-H", f"localhost:{ranks}", "--gloo", sys.executable, "-m", "medtl.bench.pinned",
               sys.executable, "-m", "medtl", "train", "--config", config, "--workdir", workdir]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"horovodrun -np {ranks} failed:\n{done.stderr[-2000:]}")
        rates[ranks] = _history_rate(workdir)
    return rates


def run(cfg: Config, records: str | None, epochs: int, n: int, scaling: bool, keep: str | None,
        phase_index: int = -1) -> dict:
    from medtl.data.manifest import read_manifest

    root = keep or tempfile.mkdtemp(prefix="medtl-bench-train-")
    records = records or _records(root, cfg, n)
    manifest = read_manifest(records)
    phase_index = phase_index % len(cfg.phases)
    one = _one_phase(cfg, records, epochs, phase_index)
    workdir = os.path.join(root, "medtl-run")
    shutil.rmtree(workdir, ignore_errors=True)
    medtl = medtl_rate(one, workdir)
    bare = None
    if one.data.augment:
        bare_workdir = os.path.join(root, "medtl-run-augment-off")
        shutil.rmtree(bare_workdir, ignore_errors=True)
        bare = medtl_rate(dataclasses.replace(one, data=dataclasses.replace(one.data, augment=())), bare_workdir)
    plain = plain_fit_rate(one, manifest)
    phase = one.phases[0]
    lines = [f"bench train: {cfg.model.backbone} {cfg.data.image_size} px, batch {cfg.train.batch_size}, "
             f"phase '{phase.name}' (trainable {phase.trainable.to_yaml()}), {cfg.train.precision}, "
             f"{manifest.records('train')} train records, median of epochs 2-{epochs}, "
             f"{os.cpu_count()} CPU cores",
             f"  medtl train (tf.data + train step + callbacks): {medtl:8.1f} images/s",
             f"  plain model.fit on in-memory tensors:           {plain:8.1f} images/s",
             f"  ratio medtl / plain: {medtl / plain:.2f} (goal >= 0.90)"]
    result = {"medtl": medtl, "plain": plain, "ratio": medtl / plain}
    if bare is not None:
        lines += [f"  medtl train with data.augment off:              {bare:8.1f} images/s",
                  f"  ratio medtl without augmentation / plain: {bare / plain:.2f} "
                  f"(the {len(one.data.augment)} augmentation transform(s) cost {1 - medtl / bare:.0%} of the rate)"]
        result["ratio_no_augment"] = bare / plain
    if scaling:
        threaded = _one_phase(cfg, records, epochs, phase_index, intra_op_threads=1, inter_op_threads=1)
        rates = scaling_rates(threaded, root)
        lines += [f"  horovodrun -np 1, 1 thread on 1 core: {rates[1]:8.1f} images/s",
                  f"  horovodrun -np 2, 1 thread and 1 core per rank: {rates[2]:8.1f} images/s (global)",
                  f"  scaling 2 ranks / 1 rank: {rates[2] / rates[1]:.2f}x (goal >= 1.80x)"]
        result["scaling"] = rates[2] / rates[1]
    print("\n".join(lines))
    if keep is None:
        shutil.rmtree(root, ignore_errors=True)
    return result
