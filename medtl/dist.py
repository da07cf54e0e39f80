"""Horovod, in one place: process layout, optimizer wrapping, broadcasts and reductions.

This is the only module that imports Horovod, and only when the process was
launched by horovodrun or mpirun. Otherwise everything degrades to one process.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from medtl.errors import MedtlError, RunFailure
from medtl.tf import tf
from medtl.utils import faults
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
    # Horovod's own stall check warns; StallWatchdog is what ends the job, naming the missing rank.
    # Horovod's shutdown (it fires under mpirun, not under horovodrun --gloo) is only a backstop, set
    # past the watchdog's longest limit: at the same limit it raced the watchdog and could win, leaving
    # "Horovod has been shut down" where the line naming the stalled rank should be.
    os.environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", str(max(1, min(60, stall_shutdown_seconds // 2 or 60))))
    if stall_shutdown_seconds > 0:
        backstop = StallWatchdog.FIRST_STEP_FACTOR * stall_shutdown_seconds + 60
        os.environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", str(backstop))
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


def rows_gatherer(ctx: Context, name: str):
    """A function for a train step: (n, d) rows of this rank -> (ranks * n, d) every rank's rows in rank
    order, differentiable; None on one process. Every rank must pass the same n (drop_remainder batches).

    Its gradient sums the upstream gradients over ranks and keeps this rank's rows. With each rank's loss
    a mean over its own anchors and the gradients then averaged (gradient_reducer), that is the gradient of
    the mean over all anchors. Horovod's own allgather gradient averages instead, which would shrink the
    part flowing through other ranks' negatives by 1/ranks.
    """
    if not ctx.distributed:
        return None
    hvd, rank = ctx.hvd, ctx.rank

    @tf.custom_gradient
    def gather_fn(rows):
        gathered = hvd.allgather(rows, name=name)

        def grad_fn(upstream):  # (ranks * n, d) -> (n, d)
            total = hvd.allreduce(upstream, op=hvd.Sum, name=f"{name}_grad")
            n = tf.shape(rows)[0]
            return total[rank * n:(rank + 1) * n]

        return gathered, grad_fn

    return gather_fn


def broadcast_variables(ctx: Context, variables) -> None:
    """Copy rank 0's values of `variables` (weights and optimizer state) to every rank."""
    if ctx.distributed:
        ctx.hvd.broadcast_variables(variables, root_rank=0)


def allgather(ctx: Context, array: np.ndarray, name: str = "allgather") -> np.ndarray:
    """Concatenate each rank's rows (ranks may hold different counts) in rank order."""
    if not ctx.distributed:
        return array
    with _collective(ctx, f"the allgather of {name}", name):
        return ctx.hvd.allgather(tf.convert_to_tensor(array)).numpy()


def allreduce_mean(ctx: Context, value: float, name: str) -> float:
    """The mean of a scalar over ranks (Horovod's MetricAverageCallback is broken with tf-keras)."""
    if not ctx.distributed:
        return float(value)
    with _collective(ctx, f"the allreduce of {name}", name):
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


def average_variables(ctx: Context, variables, name: str) -> None:
    """Set each variable to its mean over ranks: for state each rank updates from its own batches, such as
    the moving statistics of BatchNorm layers that train (their weights get averaged gradients; these do not)."""
    if not ctx.distributed or not variables:
        return
    with _collective(ctx, f"the allreduce of {name}", name):
        means = ctx.hvd.grouped_allreduce([v.read_value() for v in variables], op=ctx.hvd.Average, name=name)
    for variable, mean in zip(variables, means):
        variable.assign(mean)


def broadcast_object(ctx: Context, obj: Any, name: str) -> Any:
    """Rank 0's Python object, on every rank."""
    if not ctx.distributed:
        return obj
    return ctx.hvd.broadcast_object(obj, root_rank=0, name=name)


def allgather_objects(ctx: Context, obj: Any, name: str) -> list:
    """Every rank's Python object, in rank order, on every rank."""
    if not ctx.distributed:
        return [obj]
    with _collective(ctx, f"the allgather of {name}", name):
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
    return [float(v) for v in allgather(ctx, np.array([fingerprint], np.float64), "weights_fingerprint")]


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
_watchdog: "StallWatchdog | None" = None  # the running one, which the collectives above report to


@contextlib.contextmanager
def _collective(ctx: Context, what: str, name: str):
    """A collective that waits on every rank: timed by the running StallWatchdog, if any.

    A scheduled `stall_collective` fault sleeps before this rank reports that it has arrived, as a
    rank held up just before the collective would.
    """
    faults.before_collective(ctx.rank, name)
    dog = _watchdog
    if dog is None:
        yield
        return
    dog.enter(what, timed=True)
    try:
        yield
    except Exception as exc:
        if "Horovod has been shut down" not in str(exc):
            raise
        raise RunFailure(
            f"rank {ctx.rank}: Horovod shut down while this rank waited in {what}: another rank failed or "
            "stalled (its error is above). Re-run the same command to resume from the last checkpoint."
        ) from None
    finally:
        dog.end()


def reached(what: str) -> None:
    """Tell the running StallWatchdog that this rank has reached `what` (a stage between collectives,
    such as validation): named as a rank's last position when it goes missing there."""
    if _watchdog is not None:
        _watchdog.enter(what, timed=False)


class HeartbeatStore:
    """A key-value store over HTTP that every rank reaches, for the ranks' positions.

    Under horovodrun --gloo it is the launcher's rendezvous store. mpirun has none, so there rank 0
    serves one (Horovod's KVStoreServer) and broadcasts its address at start, while every rank is
    still in step. Requests time out: a missing rank must not block the watchdog that reports it.
    """

    TIMEOUT_SECONDS = 3.0

    def __init__(self, addr: str, port: int, server=None):
        self.addr, self.port, self.server = addr, int(port), server

    @classmethod
    def for_context(cls, ctx: Context) -> "HeartbeatStore | None":
        addr, port = os.environ.get("HOROVOD_GLOO_RENDEZVOUS_ADDR"), os.environ.get("HOROVOD_GLOO_RENDEZVOUS_PORT")
        if addr and port:
            return cls(addr, int(port))
        server, address = None, None
        if ctx.primary:
            server, address = cls._serve()
        address = broadcast_object(ctx, address, "medtl_heartbeat_store")
        return cls(*address, server=server) if address else None

    @staticmethod
    def _serve() -> tuple:
        """(server, (address, port)) of a store served by this process, or (None, None) if it cannot be."""
        from horovod.runner.http.http_server import KVStoreServer

        try:
            server = KVStoreServer(verbose=0)
            port = server.start_server()
        except Exception:  # no store: the watchdog still stops the job, without naming the rank
            return None, None
        return server, (_own_address(), port)

    def _url(self, key: str) -> str:
        return f"http://{self.addr}:{self.port}/{_HEARTBEAT_SCOPE}/{key}"

    @staticmethod
    def _open(request):
        from urllib.request import ProxyHandler, build_opener

        # Direct: an http_proxy set for downloads must not carry the ranks' own traffic.
        return build_opener(ProxyHandler({})).open(request, timeout=HeartbeatStore.TIMEOUT_SECONDS)

    def put(self, key: str, value: dict) -> None:
        from urllib.request import Request

        self._open(Request(self._url(key), data=json.dumps(value).encode(), method="PUT")).close()

    def get(self, key: str) -> dict | None:
        """The value under `key`, or None if it was never put (or the store cannot be read)."""
        try:
            with self._open(self._url(key)) as response:
                return json.loads(response.read())
        except Exception:
            return None

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown_server()


def _own_address() -> str:
    """An address of this host that the other ranks can reach: the host name's (a pod's IP in a
    cluster) unless that is loopback (Debian maps it to 127.0.1.1), then the outgoing interface's."""
    try:
        addr = socket.gethostbyname(socket.gethostname())
    except OSError:
        addr = "127.0.0.1"
    if not addr.startswith("127."):
        return addr
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("10.255.255.255", 1))  # UDP: picks a route, sends nothing
            return probe.getsockname()[0]
    except OSError:
        return addr  # one host only: loopback is right


class StallWatchdog:
    """Ends a job whose ranks wait on each other for longer than `seconds`, naming the missing ranks.

    Horovod's own stall shutdown (HOROVOD_STALL_SHUTDOWN_TIME_SECONDS) did not fire under
    horovodrun --gloo here: a rank that stopped before an allreduce left the others waiting
    for good. So each rank records its position: the training step it is in, the stage it has
    reached (validation), the collective it waits in (dist.allgather, allgather_objects,
    allreduce_mean). Every rank passes the same positions in the same order, so a count of them
    orders the ranks. A thread publishes the position to a HeartbeatStore and, when this rank has
    waited in one step or collective for `seconds`, reads the others', prints which ranks have not
    reached its position and where they were last seen, and exits, so that the launcher (horovodrun
    or mpirun) stops the job.
    """

    EXIT_CODE = 1  # a runtime failure (medtl.errors.EXIT_RUNTIME): the Job may retry and resume
    # The first step of a phase also traces (and with XLA compiles) the train step: it may take longer.
    FIRST_STEP_FACTOR = 5

    def __init__(self, ctx: Context, seconds: float, poll_seconds: float | None = None, store=None):
        self.ctx, self.seconds = ctx, float(seconds)
        self.poll = poll_seconds or max(0.5, min(5.0, self.seconds / 8))
        self.count = 0               # positions passed (the same sequence on every rank)
        self.where = "the start"     # this rank's position
        self.in_step_since = None    # monotonic time the current timed wait began; None when not waiting
        self.limit = self.seconds    # seconds the current wait may take
        self.store = store
        self._published = None
        self._stop = None

    def begin(self, step: int, first: bool = False) -> None:
        """This rank starts global training step `step` (`first`: the first of a phase)."""
        self.enter(f"training step {step}", timed=True, factor=self.FIRST_STEP_FACTOR if first else 1)

    def enter(self, where: str, timed: bool, factor: float = 1) -> None:
        """This rank reaches `where`; `timed`: it is a wait that must end within the limit."""
        self.count += 1
        self.where, self.limit = where, self.seconds * factor
        self.in_step_since = time.monotonic() if timed else None

    def end(self) -> None:
        self.in_step_since = None

    def start(self) -> "StallWatchdog":
        """Start watching (on every rank at the same point: under mpirun this broadcasts the store)."""
        import threading

        global _watchdog
        if not self.ctx.distributed or self.seconds <= 0:
            return self
        if self.store is None:
            self.store = HeartbeatStore.for_context(self.ctx)
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="medtl-stall-watchdog", daemon=True).start()
        _watchdog = self
        return self

    def stop(self) -> None:
        global _watchdog
        if self._stop is not None:
            self._stop.set()
        if _watchdog is self:
            _watchdog = None
        if self.store is not None and self.store.server is not None:
            self.store.close()

    def _publish(self) -> None:
        position = {"count": self.count, "where": self.where}
        if self.store is None or self._published == position:
            return
        try:
            self.store.put(str(self.ctx.rank), position)
            self._published = position
        except Exception:  # the store is advisory: a failed publish must not stop training
            pass

    def peers(self) -> dict[int, dict | None]:
        """Every other rank's last published position (None when unknown)."""
        if self.store is None:
            return {}
        return {rank: self.store.get(str(rank)) for rank in range(self.ctx.size) if rank != self.ctx.rank}

    def message(self, waited: float) -> str:
        where = self.where
        peers = self.peers()
        behind = sorted(r for r, p in peers.items() if p is None or p.get("count", -1) < self.count)
        if behind:
            seen = ", ".join(f"rank {r}: {peers[r]['where'] if peers[r] else 'no heartbeat'}" for r in behind)
            who = f"rank(s) {', '.join(map(str, behind))} did not reach {where} (last seen at {seen})"
        elif peers:
            who = f"every rank reached {where} but it has not completed (a collective or a read is stuck)"
        else:
            who = f"{where} has not completed (the missing rank is unknown: no heartbeat store)"
        first = " (x5 for a first step)" if self.limit > self.seconds else ""
        return (f"rank {self.ctx.rank} waited {waited:.0f} s for the other ranks: {who}; stopping the job after "
                f"train.stall_shutdown_seconds={self.seconds:g}{first}. Re-run the same command to resume from "
                "the last checkpoint.")

    def _run(self) -> None:
        import sys

        while not self._stop.wait(self.poll):
            self._publish()
            since = self.in_step_since
            if since is None:
                continue
            waited = time.monotonic() - since
            if waited >= self.limit:
                print(f"medtl: error: {self.message(waited)}", file=sys.stderr, flush=True)
                os._exit(self.EXIT_CODE)
