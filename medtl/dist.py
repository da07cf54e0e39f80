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
    hvd: Any = None  # horovod.tensorflow.keras when distributed

    @property
    def primary(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.hvd is not None


_context: Context | None = None


def launched() -> bool:
    """True when a launcher started this process as one rank of several."""
    return any(name in os.environ for name in _LAUNCH_ENV)


def init() -> Context:
    """Initialise Horovod if launched by horovodrun/mpirun, pin one GPU per local rank."""
    global _context
    if _context is not None:
        return _context
    if not launched():
        _context = Context()
        set_primary(True)
        return _context
    try:
        import horovod.tensorflow.keras as hvd
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
    return _context


def wrap_optimizer(ctx: Context, optimizer, fp16_compression: bool = False):
    """Average gradients across ranks. Wrap the plain optimizer: Keras adds loss scaling itself
    for mixed_float16 at compile time (wrapping a LossScaleOptimizer fails, see docs/stack.md)."""
    if not ctx.distributed:
        return optimizer
    compression = ctx.hvd.Compression.fp16 if fp16_compression else ctx.hvd.Compression.none
    return ctx.hvd.DistributedOptimizer(optimizer, compression=compression)


def broadcast_callbacks(ctx: Context) -> list:
    """Keras callbacks that copy rank 0's initial weights and optimizer state to every rank."""
    if not ctx.distributed:
        return []
    return [ctx.hvd.callbacks.BroadcastGlobalVariablesCallback(0)]


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
    # horovod.tensorflow.keras does not re-export broadcast_object; the TF module has it.
    import horovod.tensorflow as hvd_tf

    return hvd_tf.broadcast_object(obj, root_rank=0, name=name)


def lr_scale(ctx: Context, policy: str) -> float:
    return float(ctx.size) if policy == "linear" else 1.0


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
