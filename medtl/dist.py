"""Horovod, in one place: process layout, optimizer wrapping, broadcasts and reductions.

This is the only module that imports Horovod, and only when the process was
launched by horovodrun or mpirun. Otherwise everything degrades to one process.
"""
from __future__ import annotations

import os
import time
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
    error naming the missing ranks instead of hanging it (see StallWatchdog).
    """
    global _context
    if _context is not None:
        return _context
    if not launched():
        _context = Context()
        set_primary(True)
        return _context
    # Horovod's own stall check warns (and would shut down); StallWatchdog is what ends the job.
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


def primary_reports_agreed_stop(ctx: Context, grace_seconds: float = 10.0) -> None:
    """Before an error that every rank reached in the same step: let rank 0 be the one that reports it.

    A barrier, then the other ranks wait up to grace_seconds. Rank 0 raises at once, prints the error
    and exits, and the launcher ends the rest; so the user reads rank 0's line, and horovodrun names
    rank 0, not a rank that merely got there first, as the process that failed.
    """
    if not ctx.distributed:
        return
    allreduce_mean(ctx, 0.0, "agreed_stop")
    if not ctx.primary:
        time.sleep(grace_seconds)


def broadcast_object(ctx: Context, obj: Any, name: str) -> Any:
    """Rank 0's Python object, on every rank."""
    if not ctx.distributed:
        return obj
    return ctx.hvd.broadcast_object(obj, root_rank=0, name=name)


def allgather_objects(ctx: Context, obj: Any, name: str) -> list:
    """Every rank's Python object, in rank order, on every rank."""
    if not ctx.distributed:
        return [obj]
    return ctx.hvd.allgather_object(obj, name=name)


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


# --------------------------------------------------------------------------- stall watchdog

_HEARTBEAT_SCOPE = "medtl-heartbeat"


class StallWatchdog:
    """Ends a job whose ranks wait on each other for longer than `seconds`, naming the missing ranks.

    Horovod's own stall shutdown (HOROVOD_STALL_SHUTDOWN_TIME_SECONDS) did not fire under
    horovodrun --gloo here: a rank that stopped before an allreduce left the others waiting
    for good. So each rank records the training step it has reached; a thread publishes it to
    the launcher's rendezvous key-value store (Gloo) and, when this rank has been inside one
    step for `seconds`, reads the others', prints which ranks have not reached the step, and
    exits, so that the launcher stops the job.
    """

    EXIT_CODE = 1  # a runtime failure (medtl.errors.EXIT_RUNTIME): the Job may retry and resume

    def __init__(self, ctx: Context, seconds: float, poll_seconds: float | None = None):
        self.ctx, self.seconds = ctx, float(seconds)
        self.poll = poll_seconds or max(0.5, min(5.0, self.seconds / 8))
        self.step = -1            # the global step this rank is in (or last finished)
        self.in_step_since = None  # monotonic time the current step began; None between steps
        self.limit = self.seconds   # seconds the current step may take
        self._published = None
        self._stop = None
        addr, port = os.environ.get("HOROVOD_GLOO_RENDEZVOUS_ADDR"), os.environ.get("HOROVOD_GLOO_RENDEZVOUS_PORT")
        self.kv = (addr, int(port)) if addr and port else None

    # The first step of a phase also traces (and with XLA compiles) the train step: it may take longer.
    FIRST_STEP_FACTOR = 5

    def begin(self, step: int, first: bool = False) -> None:
        import time

        self.limit = self.seconds * (self.FIRST_STEP_FACTOR if first else 1)
        self.step, self.in_step_since = step, time.monotonic()

    def end(self) -> None:
        self.in_step_since = None

    def start(self) -> "StallWatchdog":
        import threading

        if not self.ctx.distributed or self.seconds <= 0:
            return self
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="medtl-stall-watchdog", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def _publish(self) -> None:
        if self.kv is None or self._published == self.step:
            return
        from horovod.runner.http.http_client import put_data_into_kvstore

        try:
            put_data_into_kvstore(*self.kv, _HEARTBEAT_SCOPE, str(self.ctx.rank), self.step)
            self._published = self.step
        except Exception:  # the store is advisory: a failed publish must not stop training
            pass

    def peers(self) -> dict[int, int | None]:
        """Every other rank's last published step (None when unknown)."""
        if self.kv is None:
            return {}
        from horovod.runner.http.http_client import read_data_from_kvstore

        steps = {}
        for rank in range(self.ctx.size):
            if rank == self.ctx.rank:
                continue
            try:
                steps[rank] = read_data_from_kvstore(*self.kv, _HEARTBEAT_SCOPE, str(rank))
            except Exception:
                steps[rank] = None
        return steps

    def message(self, waited: float) -> str:
        step = self.step
        peers = self.peers()
        behind = sorted(r for r, s in peers.items() if s is None or s < step)
        if behind:
            who = (f"rank(s) {', '.join(map(str, behind))} did not reach training step {step} (last seen at "
                   + ", ".join(f"rank {r}: {'no step' if peers[r] is None else f'step {peers[r]}'}" for r in behind)
                   + ")")
        elif peers:
            who = f"every rank reached training step {step} but it has not completed (a collective or a read is stuck)"
        else:
            who = f"training step {step} has not completed (the missing rank is unknown: no Gloo rendezvous store)"
        return (f"rank {self.ctx.rank} waited {waited:.0f} s for the other ranks: {who}; stopping the job after "
                f"train.stall_shutdown_seconds={self.seconds:g}{' (x5 for a first step)' if self.limit > self.seconds else ''}. Re-run the same command to resume from the last "
                "checkpoint.")

    def _run(self) -> None:
        import sys
        import time

        while not self._stop.wait(self.poll):
            self._publish()
            since = self.in_step_since
            if since is None:
                continue
            waited = time.monotonic() - since
            if waited >= self.limit:
                print(f"medtl: error: {self.message(waited)}", file=sys.stderr, flush=True)
                os._exit(self.EXIT_CODE)
