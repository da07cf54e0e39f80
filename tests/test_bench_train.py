"""`medtl bench train` end to end, scaling included, on the shared tiny records (no figure is judged here).

It times the reliability suite's job (MobileNetV3Small), the smallest backbone, to keep four trainings short."""
import os
import re
import subprocess
import sys

import pytest

from conftest import JOBS, REPO, assert_user_error, run_cli

TINY = os.path.join(REPO, "tests", "reliability", "tiny.yaml")


@pytest.mark.slow
def test_bench_train_prints_both_ratios(records, tmp_path):
    keep = tmp_path / "bench"
    r = run_cli("bench", "train", "--config", TINY, "--records", records,
                "--epochs", 2, "--phase", 0, "--scaling", "--keep", keep, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    ratio = re.search(r"ratio medtl / plain: ([\d.]+) \(goal >= 0.90\)", r.stdout)
    scaling = re.search(r"scaling 2 ranks / 1 rank: ([\d.]+)x \(goal >= 1.80x\)", r.stdout)
    bare = re.search(r"ratio medtl without augmentation / plain: ([\d.]+) \(the 1 augmentation transform", r.stdout)
    assert ratio and float(ratio.group(1)) > 0 and scaling and float(scaling.group(1)) > 0, r.stdout
    assert bare and float(bare.group(1)) > 0, r.stdout  # tiny.yaml augments, so the split is printed
    assert "MobileNetV3Small 64 px, batch 8, phase 'head'" in r.stdout and "1 thread and 1 core per rank" in r.stdout
    # Both single-process runs keep their own folder (augmentation on and off).
    assert (keep / "medtl-run" / "history.jsonl").exists() and (keep / "medtl-run-augment-off" / "history.jsonl").exists()
    # The horovodrun runs really had 1 and 2 ranks (their run folders are kept).
    for ranks in (1, 2):
        assert f'"ranks": {ranks}' in (keep / f"scaling-{ranks}" / "history.jsonl").read_text()


def test_bench_train_user_errors(tmp_path):
    smoke = os.path.join(JOBS, "smoke.yaml")
    assert_user_error(run_cli("bench", "train", "--config", smoke, "--epochs", 1), "--epochs must be >= 2")
    assert_user_error(run_cli("bench", "train", "--config", smoke, "--phase", 5), "--phase 5: the config has 2 phase(s)")


def test_pinned_runs_each_local_rank_on_its_own_core():
    cores = sorted(os.sched_getaffinity(0))
    probe = [sys.executable, "-m", "medtl.bench.pinned", sys.executable, "-c",
             "import os; print(sorted(os.sched_getaffinity(0)))"]
    for rank in range(3):
        done = subprocess.run(probe, capture_output=True, text=True, check=True,
                              env=dict(os.environ, HOROVOD_LOCAL_RANK=str(rank)))
        assert done.stdout.strip() == str([cores[rank % len(cores)]])
