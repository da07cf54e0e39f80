"""End to end through the real CLI: `medtl demo` (what `make demo` runs) at a small size.

synth -> ingest -> pretrain -> train (and the random-base control) -> evaluate in one command; each step also has its own CLI
tests (test_cli, test_ingest, test_train_dist, test_evaluate_cli). The 2-rank
horovodrun run is tests/test_train_dist.py.
"""
import json
import os
import re

import numpy as np
import pytest

from medtl.config import load_config
from medtl.data.manifest import read_manifest

from conftest import JOBS, REPO, run_cli

pytestmark = pytest.mark.slow


def test_demo_end_to_end(tmp_path):
    from medtl.demo import ARCHIVE_FINDINGS, TARGET_FINDINGS
    from medtl.models.basefile import read_meta

    out = tmp_path / "demo"
    # The reliability suite's tiny job (MobileNetV3Small at 64 px): the demo's plumbing is under test here.
    tiny = os.path.join(REPO, "tests", "reliability", "tiny.yaml")
    r = run_cli("demo", "--out", out, "--config", tiny, "--pretrain-config", tiny, "--n", 160, "--archive-n", 120,
                "--seed", 3, "--set", "train.batch_size=8", "--set", "evaluate.bootstrap=100",
                "--set", "phases.0.epochs=1", "--set", "phases.1.epochs=1",
                "--set", "pretrain.method=supervised", "--set", "evaluate.calibration=platt")
    assert r.returncode == 0, r.stderr[-3000:]
    for step in ("demo 1-2/6: synthesising an archive of 120 studies and a target set of 160 studies",
                 "demo 1-2/6: ingesting", "demo 3/6: pretraining", "demo 4/6: the control: phase 'head'",
                 "demo 5/6: training the target job's 2 phases from the pretrained base",
                 "demo 6/6: evaluating the test split"):
        assert step in r.stderr
    archive, records = read_manifest(out / "records" / "archive"), read_manifest(out / "records" / "target")
    assert archive.labels == ARCHIVE_FINDINGS and records.labels == TARGET_FINDINGS
    assert sum(split.records for split in records.splits.values()) == 160
    assert sum(split.records for split in archive.splits.values()) == 120 and archive.records("test") == 0
    base = out / "base" / "base.weights.h5"
    assert read_meta(str(base)).records_digest == archive.digest()
    run, report = out / "run", out / "report"
    # The resolved config is in the run folder, overrides applied, the base file as its weights.
    cfg = load_config(str(run / "config.yaml"))
    assert cfg.train.batch_size == 8 and cfg.data.records == str(out / "records" / "target") and cfg.seed == 3
    assert cfg.model.weights == str(base)
    assert load_config(str(out / "control" / "config.yaml")).model.weights == "none"
    rows = [json.loads(line) for line in open(run / "history.jsonl")]
    assert [(row["phase"], row["epoch"]) for row in rows] == [("head", 0), ("top", 1)]
    for row in rows:
        assert 0.0 <= row["val_auroc"] <= 1.0 and row["loss"] > 0 and row["images_per_second"] > 0
        assert set(row["val_auroc_per_label"]) == set(records.labels)
    control = [json.loads(line) for line in open(out / "control" / "history.jsonl")]
    assert [row["phase"] for row in control] == ["head"]  # the control stops after the head phase
    checkpoints = run / "checkpoints"
    assert {"best.weights.h5", "phase0-head.weights.h5", "phase1-top.weights.h5"} <= set(os.listdir(checkpoints))

    metrics = json.load(open(report / "metrics.json"))
    assert metrics["n"] == records.records("test")
    assert 0.0 <= metrics["macro"]["auroc"] <= 1.0 and 0.0 <= metrics["micro"]["auroc"] <= 1.0
    for row in metrics["labels"].values():
        assert row["auroc"] is None and row["note"].startswith("n/a") or 0.0 <= row["auroc"] <= 1.0
    page = (report / "report.html").read_text()
    assert "Macro AUROC" in page and "data:image/png;base64," in page and "Provenance" in page
    # The closing lines a user reads: the figures they print are the run's and the report's.
    head = re.search(r"head-only phase 'head' \(frozen base\): val macro AUROC ([\d.]+) on the pretrained base, "
                     r"([\d.]+) on a random base", r.stdout)
    assert head, r.stdout
    assert float(head.group(1)) == pytest.approx(rows[0]["val_auroc"], abs=5e-4)
    assert float(head.group(2)) == pytest.approx(control[0]["val_auroc"], abs=5e-4)
    final = re.search(r"after all phases: test macro AUROC ([\d.]+) \(95% CI", r.stdout)
    assert final and float(final.group(1)) == pytest.approx(metrics["macro"]["auroc"], abs=5e-4), r.stdout
    assert f"report: {os.path.abspath(report / 'report.html')}" in r.stdout
    # Calibrated (Platt, on val, as jobs/demo.yaml sets it): the demo prints the pooled test ECE before and
    # after, recomputed here from the report's own predictions.
    assert load_config(os.path.join(JOBS, "demo.yaml")).evaluate.calibration == "platt"
    ece = re.search(r"calibration \(platt, fitted on val\): test ECE ([\d.]+) before, ([\d.]+) after", r.stdout)
    assert ece, r.stdout
    from test_evaluate_cli import _ece

    preds = np.load(report / "predictions.npz")
    keep = preds["mask"] > 0
    y, p = preds["labels"][keep], preds["probs"][keep]
    assert float(ece.group(2)) == pytest.approx(_ece(y, p, metrics["calibration_bins"]), abs=5e-4)
    worst = re.search(r"worst label after: (.+?) ([\d.]+)$", r.stdout, re.M)
    assert worst, r.stdout
    per_label = {}
    for i, name in enumerate(preds["label_names"]):
        k = preds["mask"][:, i] > 0
        per_label[str(name)] = _ece(preds["labels"][k, i], preds["probs"][k, i], metrics["calibration_bins"])
    assert worst.group(1) == max(per_label, key=per_label.get)
    assert float(worst.group(2)) == pytest.approx(per_label[worst.group(1)], abs=5e-4)

    r = run_cli("evaluate", "--workdir", run, "--split", "holdout", "--out", tmp_path / "other")
    assert r.returncode == 2 and "split 'holdout' is not in" in r.stderr


def test_demo_refuses_too_few_studies(tmp_path):
    r = run_cli("demo", "--out", tmp_path / "demo", "--archive-n", 5)
    assert r.returncode == 2 and "--archive-n must be >= 20" in r.stderr
