"""End to end through the real CLI: `medtl demo` (what `make demo` runs) at a small size.

synth -> ingest -> train -> evaluate in one command; each step also has its own CLI
tests (test_cli, test_ingest, test_train_dist, test_evaluate_cli). The 2-rank
horovodrun run is tests/test_train_dist.py.
"""
import json
import os
import re

import pytest

from medtl.config import load_config
from medtl.data.manifest import read_manifest

from conftest import JOBS, run_cli

pytestmark = pytest.mark.slow


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = run_cli("demo", "--out", out, "--config", os.path.join(JOBS, "smoke.yaml"), "--n", 160, "--seed", 3,
                "--set", "train.batch_size=8", "--set", "evaluate.bootstrap=100")
    assert r.returncode == 0, r.stderr[-3000:]
    for step in ("demo 1/4: synthesising 160 studies", "demo 2/4: ingesting", "demo 3/4: training 2 phases",
                 "demo 4/4: evaluating the test split"):
        assert step in r.stderr
    records, run, report = out / "records", out / "run", out / "report"
    manifest = read_manifest(records)
    assert sum(split.records for split in manifest.splits.values()) == 160
    # The resolved config is in the run folder, overrides applied.
    cfg = load_config(str(run / "config.yaml"))
    assert cfg.train.batch_size == 8 and cfg.data.records == str(records) and cfg.seed == 3
    rows = [json.loads(line) for line in open(run / "history.jsonl")]
    assert [(row["phase"], row["epoch"]) for row in rows] == [("head", 0), ("top", 1)]
    for row in rows:
        assert 0.0 <= row["val_auroc"] <= 1.0 and row["loss"] > 0 and row["images_per_second"] > 0
        assert set(row["val_auroc_per_label"]) == set(manifest.labels)
    checkpoints = run / "checkpoints"
    assert {"best.weights.h5", "phase0-head.weights.h5", "phase1-top.weights.h5"} <= set(os.listdir(checkpoints))

    metrics = json.load(open(report / "metrics.json"))
    assert metrics["n"] == manifest.records("test")
    assert 0.0 <= metrics["macro"]["auroc"] <= 1.0 and 0.0 <= metrics["micro"]["auroc"] <= 1.0
    for row in metrics["labels"].values():
        assert row["auroc"] is None and row["note"].startswith("n/a") or 0.0 <= row["auroc"] <= 1.0
    page = (report / "report.html").read_text()
    assert "Macro AUROC" in page and "data:image/png;base64," in page and "Provenance" in page
    # The closing line a user reads: the figure it prints is the report's.
    final = re.search(r"medtl demo finished in [\d.]+ min: test macro AUROC ([\d.]+) \(95% CI", r.stdout)
    assert final and float(final.group(1)) == pytest.approx(metrics["macro"]["auroc"], abs=5e-4), r.stdout
    assert f"report: {os.path.abspath(report / 'report.html')}" in r.stdout

    r = run_cli("evaluate", "--workdir", run, "--split", "holdout", "--out", tmp_path / "other")
    assert r.returncode == 2 and "split 'holdout' is not in" in r.stderr
