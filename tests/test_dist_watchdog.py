"""The stall watchdog without a launcher: positions, the heartbeat store mpirun uses, its messages and
the stall faults. The real 2-rank stalls (horovodrun and mpirun) are in tests/reliability/test_ranks.py."""
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from medtl import dist
from medtl.utils import faults

from conftest import REPO, cli_env


class FakeStore:
    """A HeartbeatStore in a dict (what the ranks would have published)."""

    server = None

    def __init__(self, **positions):
        self.values = dict(positions)

    def put(self, key, value):
        self.values[key] = value

    def get(self, key):
        return self.values.get(key)


class FakeHvd:
    def allgather(self, tensor):
        return tensor

    def allgather_object(self, obj, name=None):
        return [obj, obj]


def _dog(rank=0, size=2, store=None):
    return dist.StallWatchdog(dist.Context(rank=rank, size=size, hvd=FakeHvd()), 20, store=store)


def _walk(dog, steps):
    """The positions of a rank that ran `steps` training steps."""
    for step in range(steps):
        dog.begin(step, first=step == 0)
        dog.end()
    return {"count": dog.count, "where": dog.where}


def test_a_rank_missing_from_a_training_step_is_named_with_where_it_was_last_seen():
    rank1 = _walk(_dog(rank=1), 3)  # rank 1 finished step 2 and never began step 3
    dog = _dog(store=FakeStore(**{"1": rank1}))
    _walk(dog, 3)
    dog.begin(3)
    message = dog.message(21)
    assert "rank 0 waited 21 s" in message
    assert "rank(s) 1 did not reach training step 3 (last seen at rank 1: training step 2)" in message
    assert "train.stall_shutdown_seconds=20" in message and "x5" not in message


def test_a_rank_missing_from_a_validation_allgather_is_named():
    rank1 = _dog(rank=1)
    _walk(rank1, 2)
    rank1.enter("validation after epoch 1", timed=False)
    dog = _dog(store=FakeStore(**{"1": {"count": rank1.count, "where": rank1.where}}))
    _walk(dog, 2)
    dog.enter("validation after epoch 1", timed=False)
    assert dog.in_step_since is None  # reaching validation is not a wait
    dog.enter("the allgather of val_probs", timed=True)
    message = dog.message(20)
    assert ("rank(s) 1 did not reach the allgather of val_probs (last seen at rank 1: validation after epoch 1)"
            in message)


def test_no_rank_behind_and_no_store_give_their_own_messages():
    dog = _dog(store=FakeStore(**{"1": {"count": 5, "where": "training step 4"}}))
    _walk(dog, 5)
    assert "every rank reached training step 4 but it has not completed" in dog.message(20)
    silent = _dog(store=FakeStore())  # rank 1 never published
    _walk(silent, 1)
    assert "rank(s) 1 did not reach training step 0 (last seen at rank 1: no heartbeat)" in silent.message(20)
    unknown = _dog()
    _walk(unknown, 1)
    assert "the missing rank is unknown: no heartbeat store" in unknown.message(20)


def test_collectives_report_their_wait_to_the_running_watchdog():
    dog = _dog(store=FakeStore())
    ctx = dog.ctx
    dist._watchdog = dog
    try:
        seen = []
        real_enter = dog.enter
        dog.enter = lambda where, timed, factor=1: (seen.append((where, timed)), real_enter(where, timed, factor))
        dist.allgather(ctx, np.zeros((2, 3), np.float32), "val_probs")
        dist.allgather_objects(ctx, ["a"], "cache_files")
        dist.reached("validation after epoch 1")
    finally:
        dist._watchdog = None
    assert seen == [("the allgather of val_probs", True), ("the allgather of cache_files", True),
                    ("validation after epoch 1", False)]
    assert dog.in_step_since is None  # each wait ended with its collective


def test_the_store_rank_0_serves_under_mpirun_round_trips_and_misses_are_none():
    server, address = dist.HeartbeatStore._serve()
    assert server is not None, "Horovod's KVStoreServer did not start"
    store = dist.HeartbeatStore(*address, server=server)
    try:
        store.put("1", {"count": 7, "where": "training step 6"})
        assert store.get("1") == {"count": 7, "where": "training step 6"}
        assert store.get("0") is None
    finally:
        store.close()
    assert dist.HeartbeatStore("127.0.0.1", address[1]).get("1") is None  # closed: unknown, not a hang


def test_a_stall_ends_the_process_with_one_error_line_naming_the_rank():
    script = textwrap.dedent("""
        import time
        from medtl import dist
        from test_dist_watchdog import FakeStore
        ctx = dist.Context(rank=0, size=2, hvd=object())
        dog = dist.StallWatchdog(ctx, 1, poll_seconds=0.2,
                                 store=FakeStore(**{"1": {"count": 0, "where": "the start"}})).start()
        dog.begin(0)
        time.sleep(30)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO,
                       env=cli_env(PYTHONPATH=f"{REPO}:{REPO}/tests"))
    assert r.returncode == dist.StallWatchdog.EXIT_CODE, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("medtl: error:")]
    assert len(errors) == 1 and "rank(s) 1 did not reach training step 0 (last seen at rank 1: the start)" in errors[0]
    assert "(x5 for a first step)" not in errors[0]


def test_stall_faults_parse_and_a_collective_stalls_once(monkeypatch):
    monkeypatch.setenv(faults.ENV, "stall_validation:rank=1,epoch=0,seconds=0.2;"
                                   "stall_collective:rank=1,name=weights_fingerprint,seconds=0.2")
    kinds = {f.kind: f for f in faults.parse(os.environ[faults.ENV])}
    assert kinds["stall_validation"].epoch == 0 and kinds["stall_validation"].rank == 1
    assert kinds["stall_collective"].name == "weights_fingerprint" and kinds["stall_collective"].seconds == 0.2
    def took(fn, *args):
        start = time.monotonic()
        fn(*args)
        return time.monotonic() - start

    assert took(faults.in_validation, 0, 0) < 0.1  # another rank
    assert took(faults.in_validation, 1, 1) < 0.1  # another epoch
    assert took(faults.in_validation, 1, 0) >= 0.2
    assert took(faults.before_collective, 1, "val_probs") < 0.1
    assert took(faults.before_collective, 1, "weights_fingerprint") >= 0.2
    assert took(faults.before_collective, 1, "weights_fingerprint") < 0.1  # once: the next phase's gather runs


@pytest.fixture(autouse=True)
def _no_leftover_watchdog():
    yield
    dist._watchdog = None
