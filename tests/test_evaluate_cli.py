"""evaluate, compare, export and predict through the real CLI, on a tiny trained run.

One run (smoke job, in-process) is shared; every feature is then exercised the way
a user runs it: `python -m medtl ...` in a fresh process.
"""
import csv
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest

from medtl.data.manifest import read_manifest
from medtl.train.rundir import RunDir

from conftest import JOBS, assert_user_error, chromium_flags, chromium_probe, run_cli

pytestmark = pytest.mark.slow

HOROVODRUN = os.path.join(os.path.dirname(sys.executable), "horovodrun")
SECTIONS = ("summary", "provenance", "auroc", "prevalence", "roc", "pr", "calibration", "training")


@pytest.fixture(scope="module")
def run(records, tmp_path_factory):
    """A trained run (smoke job: EfficientNetB0, 64 px, two 1-epoch phases) with 200 bootstrap resamples."""
    from medtl.config import load_job_config
    from medtl.train.loop import train

    workdir = str(tmp_path_factory.mktemp("run"))
    cfg = load_job_config(os.path.join(JOBS, "smoke.yaml"),
                          [f"data.records={records}", "evaluate.bootstrap=200"])
    train(cfg, workdir)
    return workdir


@pytest.fixture(scope="module")
def report(run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("report"))
    r = run_cli("evaluate", "--workdir", run, "--split", "test", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "tuning thresholds on val (youden)" in r.stderr
    return out


@pytest.fixture(scope="module")
def exported(run, report, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("export") / "model")
    r = run_cli("export", "--workdir", run, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "tuning thresholds" not in r.stderr  # evaluate saved them; export reuses them
    return out


def _metrics(folder):
    with open(os.path.join(folder, "metrics.json")) as fh:
        return json.load(fh)


def _raw_patient_ids(studies):
    with open(os.path.join(studies, "labels.csv"), newline="") as fh:
        return {row["Patient ID"] for row in csv.DictReader(fh)}


def test_report_has_every_section_and_consistent_numbers(report, run, records, studies):
    from sklearn.metrics import roc_auc_score

    from medtl.evaluate.report import read_predictions

    m = _metrics(report)
    manifest = read_manifest(records)
    labels = list(manifest.labels)
    assert m["n"] == manifest.records("test") and m["split"] == "test"
    assert m["patients"] == manifest.splits["test"].patients
    assert m["bootstrap"] == {"resamples": 200, "seed": 0, "confidence": 0.95, "unit": "patient"}
    saved = RunDir(run).read_thresholds()
    assert saved.policy == "youden" and saved.tuned_on == "val"
    assert saved.val_records == manifest.records("val")
    preds = read_predictions(report)
    assert list(preds["label_names"]) == labels and preds["probs"].shape == (m["n"], len(labels))
    for i, name in enumerate(labels):
        row = m["labels"][name]
        assert row["threshold"] == saved.labels[name]["threshold"]  # test scored at val's thresholds
        if row["auroc"] is None:
            assert row["note"].startswith("n/a") and row["auroc_ci"] is None
            continue
        assert row["auroc"] == pytest.approx(roc_auc_score(preds["labels"][:, i], preds["probs"][:, i]))
        assert row["auroc_ci"][0] <= row["auroc"] <= row["auroc_ci"][1]
        predicted = preds["probs"][:, i] >= row["threshold"]
        assert row["tp"] == int((predicted & (preds["labels"][:, i] == 1)).sum())
    assert m["macro"]["auroc_ci"][0] <= m["macro"]["auroc"] <= m["macro"]["auroc_ci"][1]
    for key in ("ece", "sensitivity", "f1"):
        assert key in m["macro"]
    # Salted hashes only: 20 hex characters, none of them a raw patient ID.
    assert all(re.fullmatch(r"[0-9a-f]{20}", p) for p in preds["patient"])
    assert not _raw_patient_ids(studies) & set(preds["patient"])
    with open(os.path.join(report, "per_label.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["label"] for r in rows] == labels and "auroc_ci_low" in rows[0] and "npv" in rows[0]

    page = open(os.path.join(report, "report.html")).read()
    positions = [page.index(f'<section id="{s}">') for s in SECTIONS]
    assert positions == sorted(positions)  # summary and provenance first
    assert page.count("data:image/png;base64,") == len(SECTIONS) - 2  # one figure per plot section
    for text in ("macro average", "micro average", "data manifest sha256", "medtl version", "checkpoints/best",
                 "resolved config", "youden", "val"):
        assert text in page, text


def test_threshold_policy_is_tuned_on_val_and_reaches_its_target(run, tmp_path):
    run_copy = tmp_path / "run"
    shutil.copytree(run, run_copy)
    r = run_cli("evaluate", "--workdir", run_copy, "--split", "val", "--out", tmp_path / "val",
                "--set", "evaluate.threshold_policy=sensitivity", "--set", "evaluate.target=0.8")
    assert r.returncode == 0, r.stderr
    assert "tuning thresholds on val (sensitivity, target 0.8)" in r.stderr
    assert "thresholds were tuned on val" in r.stderr  # the optimism warning
    saved = RunDir(str(run_copy)).read_thresholds()
    assert (saved.policy, saved.target) == ("sensitivity", 0.8)
    m = _metrics(tmp_path / "val")
    for row in m["labels"].values():
        if row["positives"]:
            assert row["sensitivity"] >= 0.8


def test_compare_two_reports(report, run, tmp_path):
    flip, run_copy = tmp_path / "flip", tmp_path / "run"
    shutil.copytree(run, run_copy)  # re-tuning for TTA rewrites thresholds.json; keep the shared run's
    r = run_cli("evaluate", "--workdir", run_copy, "--out", flip, "--set", "evaluate.tta=flip")
    assert r.returncode == 0, r.stderr
    assert "tuning thresholds on val" in r.stderr  # TTA changes the probabilities, so thresholds re-tune
    assert _metrics(flip)["provenance"]["test-time augmentation"] == "flip"
    r = run_cli("compare", report, flip, "--out", tmp_path / "cmp.csv")
    assert r.returncode == 0, r.stderr
    labels = list(_metrics(report)["labels"])
    for name in labels + ["macro"]:
        assert re.search(rf"^{name}\s+\d\.\d{{3}}\s+\d\.\d{{3}}\s+[+-]\d\.\d{{3}}", r.stdout, re.M), r.stdout
    assert "paired patient-level bootstrap, 200 resamples" in r.stdout
    rows = list(csv.DictReader(open(tmp_path / "cmp.csv")))
    assert len(rows) == 2 * (len(labels) + 1) and {"p_value", "ci_low", "significant"} <= set(rows[0])
    # A report against itself: every difference is exactly 0, none significant.
    r = run_cli("compare", report, report)
    assert r.returncode == 0 and " *" not in r.stdout
    assert len(re.findall(r"\+0\.000\s+\[\+0\.000, \+0\.000\]\s+1\.000", r.stdout)) == len(labels) + 1


def test_export_round_trip_matches_keras_and_training_pipeline(exported, run, records):
    from medtl.data.pipeline import build_dataset
    from medtl.data.records import IMAGE, feature_spec
    from medtl.tf import tf
    from medtl.train.rundir import load_run

    cfg, manifest, model = load_run(run)
    saved = RunDir(run).read_thresholds()
    loaded = tf.saved_model.load(exported)
    meta = loaded.signatures["metadata"]()
    assert [n.decode() for n in meta["label_names"].numpy()] == list(manifest.labels)
    thresholds = np.array(saved.values(manifest.labels), np.float32)
    np.testing.assert_array_equal(meta["thresholds"].numpy(), thresholds)
    assert int(meta["bit_depth"]) == manifest.bit_depth and meta["aspect"].numpy().decode() == manifest.aspect

    images, _, _ = next(iter(build_dataset(cfg, "test", manifest=manifest, training=False)))
    want = tf.sigmoid(model(images, training=False)).numpy()
    out = loaded.signatures["predict_images"](images=images)
    np.testing.assert_allclose(out["probabilities"].numpy(), want, atol=1e-6)
    decisions, probs = out["decisions"].numpy(), out["probabilities"].numpy()
    np.testing.assert_array_equal(decisions, (probs >= thresholds).astype(np.int32))
    clear = np.abs(want - thresholds) > 1e-5  # a barely trained model sits close to its thresholds
    np.testing.assert_array_equal(decisions[clear], (want >= thresholds)[clear])
    # The stored PNG bytes through the bytes signature give what the training pipeline gives.
    files = sorted(f for f in os.listdir(records) if f.startswith("test-"))
    raw = next(iter(tf.data.TFRecordDataset([os.path.join(records, f) for f in files]).batch(len(images))))
    pngs = [tf.io.parse_single_example(r, feature_spec(manifest.num_labels))[IMAGE] for r in raw]
    by_bytes = loaded.signatures["predict_bytes"](image_bytes=tf.stack(pngs))["probabilities"].numpy()
    np.testing.assert_allclose(by_bytes, want, atol=1e-6)


def test_predict_png_dicom_and_bad_files(exported, studies, tmp_path):
    from medtl.data.decode import to_stored_png
    from medtl.serve.meta import read_meta
    from medtl.serve.predict import prepare

    folder = tmp_path / "new"
    os.makedirs(folder / "sub")
    pngs = sorted(os.listdir(os.path.join(studies, "images")))[:3]
    for name in pngs:
        shutil.copy(os.path.join(studies, "images", name), folder / name)
    r = run_cli("synth", "--out", tmp_path / "dcm", "--n", 3, "--seed", 4, "--size", 80, "--dicom")
    assert r.returncode == 0, r.stderr
    dicoms = sorted(os.listdir(tmp_path / "dcm" / "images"))
    for name in dicoms:
        shutil.copy(tmp_path / "dcm" / "images" / name, folder / "sub" / name)
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)

    r = run_cli("predict", "--model", exported, "--images", folder, "--out", tmp_path / "preds.csv")
    assert r.returncode == 0, r.stderr
    assert "predict: 6 of 8 files predicted, 2 could not be decoded" in r.stderr
    rows = {row["file"]: row for row in csv.DictReader(open(tmp_path / "preds.csv"))}
    assert len(rows) == 8
    assert rows["notes.txt"]["status"] == "error" and rows["notes.txt"]["reason"].startswith("not_dicom")
    assert rows["broken.png"]["reason"].startswith("unreadable_image")
    meta = read_meta(exported)
    for name in pngs + [f"sub/{d}" for d in dicoms]:
        row = rows[name]
        assert row["status"] == "ok"
        for label, threshold in zip(meta.label_names, meta.threshold_values):
            p = float(row[f"{label}_probability"])
            assert 0 <= p <= 1
            if abs(p - threshold) > 1e-6:  # the CSV rounds to 8 decimals
                assert int(row[f"{label}_decision"]) == int(p >= threshold)
    # predict decodes exactly as ingest does.
    path = str(folder / "sub" / dicoms[0])
    stored = to_stored_png(path, meta.stored_image_size, meta.bit_depth, meta.aspect)[0]
    assert prepare(path, meta)[0] == stored
    # No identifier planted in the DICOMs (names, MRNs) reaches the output or the log.
    text = open(tmp_path / "preds.csv").read() + r.stderr
    assert "MRN" not in text and "SYNTHWELL" not in text and "FAKESON" not in text

    listing = tmp_path / "list.csv"
    listing.write_text("path\n" + "".join(f"new/{n}\n" for n in pngs[:2]))
    r = run_cli("predict", "--model", exported, "--images", listing, "--out", tmp_path / "p2.csv")
    assert r.returncode == 0, r.stderr
    again = list(csv.DictReader(open(tmp_path / "p2.csv")))
    label = meta.label_names[0]
    assert [row[f"{label}_probability"] for row in again] == [rows[n][f"{label}_probability"] for n in pngs[:2]]


def test_evaluate_an_exported_model_on_records(exported, report, records, tmp_path):
    r = run_cli("evaluate", "--model", exported, "--records", records, "--out", tmp_path / "rep")
    assert r.returncode == 0, r.stderr
    m, base = _metrics(tmp_path / "rep"), _metrics(report)
    for name, row in base["labels"].items():
        assert m["labels"][name]["auroc"] == pytest.approx(row["auroc"], abs=1e-6)
        assert m["labels"][name]["threshold"] == row["threshold"]
    assert "exported model" in m["provenance"]
    assert "training" in open(tmp_path / "rep" / "report.html").read()


def test_report_renders_in_headless_chromium(report, tmp_path):
    """The page loads without errors, every plot decodes, and the screenshot shows the plots."""
    import subprocess

    import cv2

    probe = chromium_probe(os.path.join(report, "report.html"), tmp_path)
    assert {k: probe[k] for k in ("images", "decoded", "errors")} == {"images": 6, "decoded": 6, "errors": []}
    assert set(probe["sections"]) == set(SECTIONS) and min(probe["sections"].values()) > 0

    shot = tmp_path / "shot.png"
    r = subprocess.run(chromium_flags(tmp_path / "profile") + [
        f"--screenshot={shot}", "--window-size=1280,3000", "file://" + os.path.abspath(os.path.join(report, "report.html"))],
        capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    image = cv2.imread(str(shot))
    assert image.shape[:2] == (3000, 1280)
    assert (image.min(axis=2) < 200).mean() > 0.02  # far from blank
    plot_blue = np.abs(image.astype(int) - np.array([168, 95, 31])).sum(axis=2) < 40  # BGR of #1f5fa8
    assert plot_blue.sum() > 2000  # the bar charts and curves are drawn


def test_horovodrun_two_ranks_evaluate_like_one(report, run, tmp_path):
    r = run_cli("evaluate", "--workdir", run, "--out", tmp_path / "hvd",
                launcher=[HOROVODRUN, "-np", "2", "-H", "localhost:2", "--gloo"], timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "on 2 rank(s)" in r.stdout + r.stderr
    one, two = _metrics(report), _metrics(tmp_path / "hvd")
    assert two["n"] == one["n"]
    for name, row in one["labels"].items():
        assert two["labels"][name]["auroc"] == pytest.approx(row["auroc"], abs=1e-6)
        assert two["labels"][name]["auroc_ci"] == pytest.approx(row["auroc_ci"], abs=1e-6) if row["auroc_ci"] \
            else two["labels"][name]["auroc_ci"] is None


# --------------------------------------------------------------------------- bad input


def test_evaluate_bad_input(run, exported, studies, tmp_path):
    r = run_cli("evaluate", "--workdir", run, "--split", "holdout", "--out", tmp_path / "x")
    assert_user_error(r, "split 'holdout' is not in", "test, train, val")

    bare = tmp_path / "bare"
    os.makedirs(bare)
    shutil.copy(os.path.join(run, "config.yaml"), bare / "config.yaml")
    r = run_cli("evaluate", "--workdir", bare, "--out", tmp_path / "x")
    assert_user_error(r, f"run folder {bare} has no checkpoint", "medtl train")

    # A damaged best checkpoint is a runtime failure (exit 1: the folder, not the command, is wrong).
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    best = damaged / "checkpoints" / "best.weights.h5"
    best.write_bytes(best.read_bytes()[:4096])
    r = run_cli("evaluate", "--workdir", damaged, "--out", tmp_path / "x")
    assert_user_error(r, f"checkpoint {best} is damaged or unreadable", exit_code=1)

    r = run_cli("evaluate", "--workdir", run, "--out", tmp_path / "x", "--set", "data.image_size=32")
    assert_user_error(r, "only evaluate.* keys")

    # The records for the two checks below are built in this process (what is under test is evaluate).
    from medtl.data.ingest import IngestOptions, ingest
    from medtl.data.synth import synthesize

    # Records with other labels: 6 studies carry only some of the 8 findings.
    synthesize(str(tmp_path / "few"), 6, seed=1, size=64)
    ingest(IngestOptions(images=str(tmp_path / "few" / "images"), labels=str(tmp_path / "few" / "labels.csv"),
                         out=str(tmp_path / "few_records"), image_size=64, progress=False))
    r = run_cli("evaluate", "--model", exported, "--records", tmp_path / "few_records", "--out", tmp_path / "x")
    assert_user_error(r, f"model {exported} was exported with labels", "same labels")

    # Same labels, but no test split.
    ingest(IngestOptions(images=os.path.join(studies, "images"), labels=os.path.join(studies, "labels.csv"),
                         out=str(tmp_path / "no_test"), image_size=64, test_fraction=0.0, progress=False))
    r = run_cli("evaluate", "--model", exported, "--records", tmp_path / "no_test", "--out", tmp_path / "x")
    assert_user_error(r, "split 'test' of", "is empty (0 records)")

    r = run_cli("evaluate", "--model", exported, "--out", tmp_path / "x")
    assert_user_error(r, "--model needs --records")


def test_export_predict_compare_bad_input(run, exported, report, tmp_path):
    r = run_cli("export", "--workdir", run, "--out", exported)
    assert_user_error(r, "already exists and is not empty")
    r = run_cli("predict", "--model", run, "--images", tmp_path, "--out", tmp_path / "p.csv")
    assert_user_error(r, "is not a model written by `medtl export`")
    (tmp_path / "list.csv").write_text("file\na.png\n")
    r = run_cli("predict", "--model", exported, "--images", tmp_path / "list.csv", "--out", tmp_path / "p.csv")
    assert_user_error(r, "needs a 'path' column")
    r = run_cli("compare", report, tmp_path)
    assert_user_error(r, "is not a report folder")
