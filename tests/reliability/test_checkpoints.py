"""A kill while a checkpoint is written; two seeded deterministic runs; what each rank reads per epoch."""
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from reliability.helpers import REPO, TINY, env, history, report


class PointerWatch:
    """Polls checkpoints/state.json while a run is going: the file it names must always exist."""

    def __init__(self, run):
        self.state = os.path.join(run, "checkpoints", "state.json")
        self.looks = 0
        self.broken: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            try:
                name = json.load(open(self.state))["checkpoint"]
            except (OSError, ValueError, KeyError):
                name = None  # not written yet (it is replaced atomically, never half-written)
            if name:
                self.looks += 1
                if not os.path.exists(os.path.join(os.path.dirname(self.state), name)):
                    self.broken.append(name)
            time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _train_cmd(records, run, *sets):
    args = [sys.executable, "-m", "medtl", "train", "--config", TINY, "--workdir", str(run), "--set",
            f"data.records={records}"]
    for s in sets:
        args += ["--set", s]
    return args


@pytest.mark.slow
def test_kill_during_checkpoint_save_resumes_from_the_previous_one(records, tmp_path):
    run = tmp_path / "run"
    with PointerWatch(run) as watch:
        killed = subprocess.run(_train_cmd(records, run), env=env(MEDTL_FAULTS="kill_in_checkpoint:epoch=1"),
                                capture_output=True, text=True, cwd=REPO, timeout=600)
        assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL between the weights and the pointer
        state = json.load(open(run / "checkpoints" / "state.json"))
        assert state["epochs_done"] == 1 and state["checkpoint"] == "epoch-0000.weights.h5"
        assert len(history(run)) == 1  # killed before epoch 2's history row
        resumed = subprocess.run(_train_cmd(records, run), env=env(), capture_output=True, text=True, cwd=REPO,
                                 timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "after epoch 1" in resumed.stderr and "checkpoint epoch-0000.weights.h5" in resumed.stderr
    rows = history(run)
    assert [row["epoch"] for row in rows] == [0, 1, 2, 3]
    assert not watch.broken, f"state.json named missing files: {watch.broken}"
    assert watch.looks > 10
    report("3. Kill during checkpoint save", "SIGKILL after epoch 2's weights were written, before the pointer",
           f"the re-run resumed from epoch-0000 (the previous complete checkpoint); state.json, read {watch.looks} "
           "times during both runs, never named a missing file", processes_killed=1)


def _weights(path):
    import h5py

    found = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: found.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return found


TIMING = ("seconds", "images_per_second", "images_per_second_per_rank")


@pytest.mark.slow
def test_two_seeded_deterministic_runs_are_identical(records, tmp_path):
    runs = []
    for name in ("a", "b"):
        run = tmp_path / name
        r = subprocess.run(_train_cmd(records, run, "data.deterministic=true", "phases.0.epochs=1",
                                                         "phases.1.epochs=1"), env=env(),
                           capture_output=True, text=True, cwd=REPO, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        runs.append(run)
    a, b = (_weights(run / "checkpoints" / "epoch-0001.weights.h5") for run in runs)
    assert a.keys() == b.keys() and len(a) > 20
    different = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not different, different[:5]
    rows_a, rows_b = ([{k: v for k, v in row.items() if k not in TIMING} for row in history(run)] for run in runs)
    assert rows_a == rows_b
    first = _weights(runs[0] / "checkpoints" / "epoch-0000.weights.h5")  # training moved the weights
    assert any(k in first and first[k].shape == a[k].shape and not np.array_equal(a[k], first[k]) for k in a)
    report("10a. Determinism", "two runs with seed 0 and data.deterministic: true (augmentation on, 2 phases)",
           f"final weights ({len(a)} arrays, optimizer state included) and every history metric identical",
           training_runs=2)


def test_each_rank_reads_a_disjoint_part_and_together_the_whole_split(records):
    from medtl.config import load_config
    from medtl.data.manifest import read_manifest
    from medtl.data.pipeline import build_dataset, build_decoded

    manifest = read_manifest(records)
    cfg = load_config(TINY, [f"data.records={records}", "data.deterministic=true"])

    def keys(ds):  # batched (eval) or single records (the stream before batching)
        import numpy as np

        return [k.decode() for *_, key in ds.as_numpy_iterator() for k in np.atleast_1d(key)]

    checked = 0
    for split in ("train", "val"):
        every = keys(build_dataset(cfg, split, training=False, with_ids=True, manifest=manifest))
        assert len(every) == len(set(every)) == manifest.records(split)
        # train: 12 shards for 2 ranks (by file); val: 2 shards for 3 ranks (by record, every rank reads all).
        for ranks in ((2, 3) if split == "train" else (3,)):
            for epoch in (0, 1):
                parts = [keys(build_decoded(cfg, manifest, split, rank, ranks, True, False, epoch, with_ids=True))
                         for rank in range(ranks)]
                union = [k for part in parts for k in part]
                assert len(union) == len(set(union)), f"{split}, {ranks} ranks, epoch {epoch}: a record read twice"
                assert set(union) == set(every), f"{split}, {ranks} ranks, epoch {epoch}: records missed"
                checked += len(union)
    report("10b. Coverage", "the training stream's record keys per rank, one pass, epochs 1 and 2, 2 and 3 ranks "
           "(file and record sharding)", "ranks' keys disjoint; together exactly the split",
           record_keys_checked=checked)
