"""Scheduled fault injection for the reliability tests (as Horovod's own tests kill ranks on purpose).

Set MEDTL_FAULTS to ';'-separated faults, each `kind:key=value,...`:
  nan_batch:rank=R,step=S       that rank's input batch at global step S is NaN (once)
  nan_from:step=S               every rank's inputs are NaN from global step S on (persistent)
  kill:rank=R,step=S            that rank SIGKILLs itself before global step S
  stall:rank=R,step=S,seconds=T that rank sleeps T seconds before global step S (before its allreduce)
  stall_validation:rank=R,epoch=E,seconds=T
                                that rank sleeps T seconds in the validation after epoch E (0-based), before
                                its predictions (the others wait in the allgather of them)
  stall_collective:rank=R,name=N,seconds=T
                                that rank sleeps T seconds before the collective named N (medtl.dist's
                                allgather, allgather_objects or allreduce_mean; e.g. weights_fingerprint), once
  kill_in_checkpoint:epoch=E    rank 0 SIGKILLs itself after writing epoch E's weights, before the pointer
  kill_trial:step=N,epoch=E     `medtl search` SIGKILLs itself after epoch E of trial number N
  failed_start:step=N           `medtl search`'s trial number N trains at minus its learning rate (away from
                                the labels: a start far below the others, which never learns)
  slow_start:step=N             `medtl search`'s trial number N reports val AUROC 0 after its first epoch and 1
                                after its second (a start far below the others, then far above), whatever it
                                scored; its training and later scores are its own
  kill_in_finalize:step=N       ingest finalize SIGKILLs itself once N shards have their final names (N = all
                                shards: before quarantine.csv and manifest.json are written)
  kill_in_cleanup:step=N        ingest finalize SIGKILLs itself after writing the manifest, once N part folders
                                are removed
Never set in production; with it unset every hook here is a no-op.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass

ENV = "MEDTL_FAULTS"


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int | None = None
    step: int | None = None
    epoch: int | None = None
    seconds: float = 0.0
    name: str | None = None


def parse(text: str) -> list[Fault]:
    faults = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        kind, _, args = item.partition(":")
        values = dict(pair.split("=", 1) for pair in args.split(",") if pair)
        faults.append(Fault(kind=kind, rank=_int(values.get("rank")), step=_int(values.get("step")),
                            epoch=_int(values.get("epoch")), seconds=float(values.get("seconds", 0)),
                            name=values.get("name")))
    return faults


def _int(value):
    return None if value is None else int(value)


def active(kind: str) -> list[Fault]:
    return [f for f in parse(os.environ.get(ENV, "")) if f.kind == kind]


def _mine(fault: Fault, rank: int) -> bool:
    return fault.rank is None or fault.rank == rank


def corrupt_inputs(ds, rank: int, first_step: int):
    """Wrap a training dataset of (image, labels, mask) batches with the NaN faults for this rank."""
    nan_batch = [f.step for f in active("nan_batch") if _mine(f, rank)]
    nan_from = [f.step for f in active("nan_from") if _mine(f, rank)]
    if not nan_batch and not nan_from:
        return ds
    from medtl.tf import tf

    def inject_fn(index, batch):
        step = index + first_step
        bad = tf.constant(False)
        for s in nan_batch:
            bad = tf.logical_or(bad, tf.equal(step, s))
        for s in nan_from:
            bad = tf.logical_or(bad, step >= s)
        image = batch[0]
        if not image.dtype.is_floating:  # stored pixels of a device-step stream: as float32 in [0, 255]
            image = tf.cast(image, tf.float32) * (255.0 / image.dtype.max)
        image = tf.where(bad, tf.fill(tf.shape(image), float("nan")), image)
        return (image,) + tuple(batch[1:])

    return ds.enumerate().map(inject_fn)


def before_step(rank: int, step: int) -> None:
    """Kill or stall this rank before a global step, if scheduled."""
    for fault in active("kill"):
        if _mine(fault, rank) and fault.step == step:
            # The wall-clock time, so that a test can time the launcher's exit from the death itself.
            print(f"medtl fault: rank {rank} SIGKILLs itself before global step {step} at unix time "
                  f"{time.time():.3f}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    for fault in active("stall"):
        if _mine(fault, rank) and fault.step == step:
            time.sleep(fault.seconds)


def in_validation(rank: int, epoch: int) -> None:
    """Stall this rank in the validation after `epoch`, if scheduled."""
    for fault in active("stall_validation"):
        if _mine(fault, rank) and fault.epoch == epoch:
            time.sleep(fault.seconds)


_collectives_stalled: set = set()


def before_collective(rank: int, name: str) -> None:
    """Stall this rank before the first collective named `name`, if scheduled."""
    for fault in active("stall_collective"):
        if _mine(fault, rank) and fault.name == name and fault not in _collectives_stalled:
            _collectives_stalled.add(fault)
            time.sleep(fault.seconds)


def in_checkpoint(epoch: int) -> None:
    """Die between a checkpoint's weights and its pointer, if scheduled."""
    for fault in active("kill_in_checkpoint"):
        if fault.epoch == epoch:
            os.kill(os.getpid(), signal.SIGKILL)


def in_trial(trial_number: int, epoch: int) -> None:
    """Die in the middle of a search trial, if scheduled."""
    for fault in active("kill_trial"):
        if fault.step == trial_number and fault.epoch == epoch:
            os.kill(os.getpid(), signal.SIGKILL)


def failed_start(trial_number: int) -> bool:
    """Whether trial number N of a search is to train away from the labels, if scheduled."""
    return any(fault.step == trial_number for fault in active("failed_start"))


def trial_score(trial_number: int, epoch: int, score: float) -> float:
    """The val AUROC trial number N of a search reports after `epoch` (1-based): 0 and 1 after its first two
    epochs if a slow start is scheduled for it, else `score`."""
    if epoch in (1, 2) and any(fault.step == trial_number for fault in active("slow_start")):
        return float(epoch - 1)
    return score


def in_finalize(kind: str, done: int) -> None:
    """Die in ingest finalize (kind kill_in_finalize or kill_in_cleanup) after `done` steps, if scheduled."""
    for fault in active(kind):
        if fault.step == done:
            os.kill(os.getpid(), signal.SIGKILL)
