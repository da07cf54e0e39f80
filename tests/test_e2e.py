"""End to end through the real CLI: synth -> ingest -> train -> evaluate, and a 2-rank horovodrun."""
import json
import os
import sys

import pytest

from medtl.config import load_config

from conftest import JOBS, run_cli

pytestmark = pytest.mark.slow

HOROVODRUN = os.path.join(os.path.dirname(sys.executable), "horovodrun")


def _history(run):
    with open(os.path.join(run, "history.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def test_cli_end_to_end(tmp_path):
    studies, records, run, report = (tmp_path / x for x in ("studies", "records", "run", "report"))
    r = run_cli("synth", "--out", studies, "--n", 200, "--seed", 3, "--size", 96)
    assert r.returncode == 0, r.stderr
    r = run_cli("ingest", "--images", studies / "images", "--labels", studies / "labels.csv", "--out", records,
                "--image-size", 64, "--shard-mb", 0.2)
    assert r.returncode == 0, r.stderr
    assert "quarantined 0" in r.stderr
    r = run_cli("train", "--config", os.path.join(JOBS, "smoke.yaml"), "--workdir", run,
                "--set", f"data.records={records}", "--set", "train.batch_size=8")
    assert r.returncode == 0, r.stderr
    # The resolved config is in the run folder, overrides applied.
    cfg = load_config(str(run / "config.yaml"))
    assert cfg.train.batch_size == 8 and cfg.data.records == str(records)
    rows = _history(run)
    assert [(row["phase"], row["epoch"]) for row in rows] == [("head", 0), ("top", 1)]
    for row in rows:
        assert 0.0 <= row["val_auroc"] <= 1.0 and row["loss"] > 0 and row["images_per_second"] > 0
        assert set(row["val_auroc_per_label"]) == set(json.load(open(records / "manifest.json"))["labels"])
    assert (run / "checkpoints" / "best.weights.h5").is_file()
    assert (run / "checkpoints" / "phase0-head.weights.h5").is_file() and (run / "checkpoints" / "phase1-top.weights.h5").is_file()

    r = run_cli("evaluate", "--workdir", run, "--split", "test", "--out", report)
    assert r.returncode == 0, r.stderr
    metrics = json.load(open(report / "metrics.json"))
    manifest = json.load(open(records / "manifest.json"))
    assert metrics["n"] == manifest["splits"]["test"]["records"]
    assert 0.0 <= metrics["macro"]["auroc"] <= 1.0 and 0.0 <= metrics["micro"]["auroc"] <= 1.0
    for name, row in metrics["labels"].items():
        assert row["auroc"] is None and row["note"].startswith("n/a") or 0.0 <= row["auroc"] <= 1.0
    page = (report / "report.html").read_text()
    assert "Macro AUROC" in page and "data:image/png;base64," in page and "Provenance" in page

    r = run_cli("evaluate", "--workdir", run, "--split", "holdout", "--out", report)
    assert r.returncode == 2 and "split 'holdout' is not in" in r.stderr


def test_horovodrun_two_ranks(records, tmp_path):
    run = tmp_path / "run"
    r = run_cli("train", "--config", os.path.join(JOBS, "smoke.yaml"), "--workdir", run,
                "--set", f"data.records={records}", "--set", "train.batch_size=8",
                launcher=[HOROVODRUN, "-np", "2", "-H", "localhost:2", "--gloo"], timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = _history(run)
    assert [row["phase"] for row in rows] == ["head", "top"]
    assert all(row["ranks"] == 2 for row in rows)
    assert "2 rank(s), global batch 16" in r.stdout + r.stderr
    assert (run / "checkpoints" / "best.weights.h5").is_file()
