"""medtl.api without the CLI: ingest -> train -> evaluate -> export -> predict in this process, typed results
that agree with the artefacts on disk, and the API's own errors. The CLI over it is tests/test_cli*.py."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest

from medtl import api
from medtl.config import load_config
from medtl.errors import MedtlError, RunFailure

from conftest import REPO

TINY = os.path.join(REPO, "tests", "reliability", "tiny.yaml")
# One epoch per phase and a short bootstrap: the API's plumbing is under test here, not learning.
FAST = ["phases.0.epochs=1", "phases.1.epochs=1", "evaluate.bootstrap=50"]


@pytest.fixture(scope="module")
def trained(records, tmp_path_factory):
    """A run of the tiny job, trained through api.train with a Config object."""
    cfg = load_config(TINY, [f"data.records={records}", *FAST])
    workdir = str(tmp_path_factory.mktemp("api-run"))
    return api.train(cfg, workdir)


def test_import_needs_neither_tensorflow_nor_horovod():
    code = ("import sys, medtl.api; loaded = [m for m in ('tensorflow', 'horovod') if m in sys.modules]; "
            "print(loaded)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_ingest_result_matches_the_manifest(studies, tmp_path):
    out = str(tmp_path / "records")
    result = api.ingest(api.IngestOptions(images=os.path.join(studies, "images"),
                                          labels=os.path.join(studies, "labels.csv"), out=out, image_size=48,
                                          shard_mb=0.05, progress=False))
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert result.records == out and result.manifest_path == os.path.join(out, "manifest.json")
    assert result.labels == tuple(manifest["labels"])
    assert result.split_records == {k: v["records"] for k, v in manifest["splits"].items()}
    assert result.split_patients == {k: v["patients"] for k, v in manifest["splits"].items()}
    assert result.num_records == 240 - result.quarantined and result.quarantined == manifest["quarantined"]


def test_train_result_and_log_copy(trained):
    assert trained.epochs == 2 and trained.ranks == 1 and trained.stopped_after_phase is None
    assert 0.0 <= trained.best_val_auroc <= 1.0
    assert set(trained.weights_fingerprints) == {"head", "top"}
    state = json.load(open(os.path.join(trained.workdir, "train_summary.json")))
    assert state["best_val_auroc"] == trained.best_val_auroc
    assert trained.log_path == os.path.join(trained.workdir, "medtl.log")
    lines = open(trained.log_path).read().splitlines()
    assert lines and all(line.split(" ", 1)[1].startswith("medtl: ") for line in lines), lines[:3]
    text = "\n".join(lines)
    assert "medtl: train: devices in use: CPU" in text and "phase 'top' done" in text


def test_train_again_is_nothing_to_do_and_appends_to_the_log(trained):
    before = len(open(trained.log_path).read().splitlines())
    again = api.train(os.path.join(trained.workdir, "config.yaml"), trained.workdir)
    assert again.epochs == 2 and again.best_val_auroc == trained.best_val_auroc
    after = open(trained.log_path).read()
    assert len(after.splitlines()) > before and "nothing to do" in after


def test_evaluate_export_predict(trained, studies, tmp_path):
    report = api.evaluate(trained.workdir, out=str(tmp_path / "report"))
    metrics = json.load(open(report.metrics_path))
    assert os.path.isfile(report.report_path) and report.split == "test"
    assert report.num_images == metrics["n"] and report.macro_auroc == metrics["macro"]["auroc"]
    assert report.macro_auroc_ci == tuple(metrics["macro"]["auroc_ci"])

    exported = api.export(trained.workdir, str(tmp_path / "model"))
    assert exported.label_names == tuple(metrics["labels"]) and exported.image_size == 64
    assert exported.thresholds == {n: row["threshold"] for n, row in metrics["labels"].items()}

    # The export's own check passed on its model (api.export ran it); it fails when the SavedModel is not the
    # Keras model's map: here the check is told of a calibration the SavedModel does not apply.
    from medtl.serve.export import _verify
    from medtl.serve.meta import read_meta
    from medtl.train.rundir import Calibration, load_run
    _, _, model = load_run(trained.workdir)
    meta = read_meta(exported.out)
    shifted = Calibration("platt", meta.tta, "val", 1,
                          {n: {"params": {"slope": 1.0, "intercept": 2.0}} for n in meta.label_names})
    with pytest.raises(RunFailure, match="does not reproduce the Keras model "):
        _verify(exported.out, model, dataclasses.replace(meta, calibration=shifted))

    # The export on the same records: same split, same images.
    records = load_config(os.path.join(trained.workdir, "config.yaml")).data.records
    again = api.evaluate(model=exported.out, records=records, out=str(tmp_path / "report-export"))
    assert again.num_images == report.num_images

    images = tmp_path / "images"
    images.mkdir()
    for name in sorted(os.listdir(os.path.join(studies, "images")))[:3]:
        shutil.copy(os.path.join(studies, "images", name), images / name)
    (images / "broken.png").write_bytes(b"not an image")
    predicted = api.predict(exported.out, str(images), str(tmp_path / "predictions.csv"), batch_size=2)
    assert (predicted.files, predicted.predicted, predicted.errors) == (4, 3, 1)
    rows = open(predicted.out).read().splitlines()
    assert len(rows) == 5 and rows[0].startswith("file,status,reason")


def test_search_writes_a_job_config_for_train(records, tmp_path):
    cfg = load_config(TINY, [f"data.records={records}"])
    result = api.search(cfg, os.path.join(REPO, "jobs", "search", "tiny.yaml"), 2, str(tmp_path / "search"))
    assert result.trials == 2 and result.spent_full_trainings == pytest.approx(2.0)
    assert 0.0 <= result.best_val_auroc <= 1.0 and result.best_head == result.summary["best"]["head"]
    best = load_config(result.best_config)
    assert best.data.records == records and best.model.backbone == "MobileNetV3Small"


def test_errors_name_the_argument(records, tmp_path):
    cfg = load_config(TINY)
    with pytest.raises(MedtlError, match="data.records is empty"):
        api.train(cfg, str(tmp_path / "run"))
    with pytest.raises(MedtlError, match="either a run folder"):
        api.evaluate(out=str(tmp_path / "report"))
    with pytest.raises(MedtlError, match="model needs records"):
        api.evaluate(model=str(tmp_path), out=str(tmp_path / "report"))
    with pytest.raises(MedtlError, match="batch_size must be >= 1"):
        api.predict(str(tmp_path), str(tmp_path), str(tmp_path / "p.csv"), batch_size=0)
    with pytest.raises(MedtlError, match=r"fractions \[0, 1\] must be fractions in \(0, 1\]"):
        api.search(cfg, os.path.join(REPO, "jobs", "search", "tiny.yaml"), 2, str(tmp_path / "s"), fractions=[0, 1])
    assert not os.path.exists(tmp_path / "run")


def test_mixed_float16_without_gpu_warns(capsys):
    api._log_devices("mixed_float16")
    err = capsys.readouterr().err
    assert "medtl: train: devices in use: CPU" in err
    assert "medtl: warning: train.precision is mixed_float16 but no GPU is visible" in err


def test_a_diverged_checkpoint_is_one_error_not_a_traceback(trained, tmp_path):
    """Weights that are not finite make NaN predictions: evaluate says so in one line naming the checkpoint
    (it used to end in scikit-learn's traceback from the calibration fit)."""
    import numpy as np

    from medtl.train.rundir import load_run

    workdir = tmp_path / "diverged"
    shutil.copytree(trained.workdir, workdir, ignore=shutil.ignore_patterns("reports", "thresholds.json",
                                                                            "calibration.json"))
    _, _, model = load_run(str(workdir))
    layer = model.get_layer("logits")
    layer.set_weights([np.full_like(w, np.nan) for w in layer.get_weights()])
    best = workdir / "checkpoints" / "best.weights.h5"
    model.save_weights(str(best))
    with pytest.raises(RunFailure, match=rf"^{best} predicts non-finite probabilities \(NaN or infinity\) for \d+ "
                                         r"of \d+ records of split 'val': its weights are not finite"):
        api.evaluate(str(workdir), out=str(tmp_path / "report"))
