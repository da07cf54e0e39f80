"""Horovod, in one place: process layout, optimizer wrapping, broadcasts and reductions.

This is the only module that imports Horovod, and only when the process was
launched by horovodrun or mpirun. Otherwise everything degrades to one process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from medtl.errors import MedtlError
from medtl.tf import tf
from medtl.utils.log import set_primary

# Variables that horovodrun (Gloo) or an MPI launcher sets in every rank.
_LAUNCH_ENV = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


@dataclass(frozen=True)
class Context:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    hvd: Any = None  # the horovod.tensorflow module when distributed

    @property
    def primary(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.hvd is not None


_context: Context | None = None

# Seconds a rank may wait on a missing peer before Horovod shuts the job down (0 = never).
DEFAULT_STALL_SHUTDOWN_SECONDS = 120


def launched() -> bool:
    """True when a launcher started this process as one rank of several."""
    return any(name in os.environ for name in _LAUNCH_ENV)


def init(stall_shutdown_seconds: int = DEFAULT_STALL_SHUTDOWN_SECONDS) -> Context:
    """Initialise Horovod if launched by horovodrun/mpirun, pin one GPU per local rank.

    The stall shutdown is on by default: a dead or blocked rank ends the job with an
    error naming the missing ranks instead of hanging it.
    """
    global _context
    if _context is not None:
        return _context
    if not launched():
        _context = Context()
        set_primary(True)
        return _context
    os.environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", str(max(1, min(60, stall_shutdown_seconds // 2 or 60))))
    os.environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", str(stall_shutdown_seconds))
    try:
        import horovod.tensorflow as hvd
    except ImportError as exc:
        raise MedtlError(
            f"this process was started by a launcher (horovodrun/mpirun) but Horovod cannot be imported "
            f"({exc}); build it with `make horovod` or run without the launcher"
        ) from None
    hvd.init()
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        for gpu in gpus:
            tf.config.experimental.set_memory_growth(gpu, True)
        tf.config.set_visible_devices(gpus[hvd.local_rank() % len(gpus)], "GPU")
    _context = Context(rank=hvd.rank(), size=hvd.size(), local_rank=hvd.local_rank(), hvd=hvd)
    set_primary(_context.primary)
    if not _context.primary:  # other ranks print errors only
        import warnings

        warnings.simplefilter("ignore")
        tf.get_logger().setLevel("ERROR")
    return _context


def gradient_reducer(ctx: Context, fp16_compression: bool = False):
    """A function (list of gradients -> their average over ranks) for the train step.

    medtl averages gradients itself, in the train step and before the finite check,
    instead of wrapping the optimizer in hvd.DistributedOptimizer: under a
    LossScaleOptimizer that wrapper allreduces only when a rank's *own* gradients are
    finite, so a NaN on one rank would leave the others waiting in the collective.
    Averaged first, every rank takes (or skips) the same update.
    """
    if not ctx.distributed:
        return None
    hvd = ctx.hvd
    compression = hvd.Compression.fp16 if fp16_compression else hvd.Compression.none

    def reduce_fn(grads):
        return hvd.grouped_allreduce(list(grads), op=hvd.Average, compression=compression)

    return reduce_fn


def broadcast_variables(ctx: Context, variables) -> None:
    """Copy rank 0's values of `variables` (weights and optimizer state) to every rank."""
    if ctx.distributed:
        ctx.hvd.broadcast_variables(variables, root_rank=0)


def allgather(ctx: Context, array: np.ndarray) -> np.ndarray:
    """Concatenate each rank's rows (ranks may hold different counts) in rank order."""
    if not ctx.distributed:
        return array
    return ctx.hvd.allgather(tf.convert_to_tensor(array)).numpy()


def allreduce_mean(ctx: Context, value: float, name: str) -> float:
    """The mean of a scalar over ranks (Horovod's MetricAverageCallback is broken with tf-keras)."""
    if not ctx.distributed:
        return float(value)
    return float(ctx.hvd.allreduce(tf.constant(float(value), tf.float64), op=ctx.hvd.Average, name=name).numpy())


def broadcast_object(ctx: Context, obj: Any, name: str) -> Any:
    """Rank 0's Python object, on every rank."""
    if not ctx.distributed:
        return obj
    return ctx.hvd.broadcast_object(obj, root_rank=0, name=name)


def lr_scale(ctx: Context, policy: str) -> float:
    """Learning-rate multiplier for `ctx.size` ranks: linear (x size), sqrt, or none."""
    if policy == "linear":
        return float(ctx.size)
    if policy == "sqrt":
        return float(ctx.size) ** 0.5
    return 1.0


def fingerprints_agree(ctx: Context, fingerprint: float) -> list[float]:
    """Every rank's value of `fingerprint`, in rank order (to check that weights are in sync)."""
    return [float(v) for v in allgather(ctx, np.array([fingerprint], np.float64))]


def horovod_info() -> dict:
    """Horovod's version and the controllers/ops it was built with, or why it is unavailable."""
    try:
        import horovod
        import horovod.tensorflow as hvd_tf
    except ImportError as exc:
        return {"version": None, "error": str(exc)}
    return {
        "version": horovod.__version__,
        "gloo": bool(hvd_tf.gloo_built()),
        "mpi": bool(hvd_tf.mpi_built()),
        "nccl": bool(hvd_tf.nccl_built()),
    }
