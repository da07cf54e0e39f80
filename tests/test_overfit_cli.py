"""Overfitting you can see, through the CLI: a deliberately overfitting tiny run (a handful of train images,
no augmentation, no dropout, a linear probe on a frozen random base) logs train AUROC beside val's (history.jsonl, TensorBoard train/
and validation/), and `medtl evaluate` flags it and names the remedies it did not use. The healthy side (the
flag quiet) is checked on a run that learns, test_clinical_cli's."""
import json
import os

import pytest

from medtl.evaluate.curve import CurvePoint, LearningCurve, write_learning_curve

from conftest import JOBS, run_cli

pytestmark = pytest.mark.slow

SMOKE = os.path.join(JOBS, "smoke.yaml")
EPOCHS = 8


@pytest.fixture(scope="module")
def few_records(tmp_path_factory):
    """40 synthetic studies, ingested at 32 px with 40% of the patients in val: about 20 train images."""
    from medtl.data.ingest import IngestOptions, ingest
    from medtl.data.synth import synthesize

    root = tmp_path_factory.mktemp("few")
    synthesize(str(root / "studies"), 40, seed=11, size=64)
    ingest(IngestOptions(images=str(root / "studies" / "images"), labels=str(root / "studies" / "labels.csv"),
                         out=str(root / "records"), image_size=32, bit_depth=8, shard_mb=0.1, progress=False,
                         val_fraction=0.4, test_fraction=0.1))
    return str(root / "records")


def test_an_overfitting_run_is_flagged_with_the_remedies_it_did_not_use(few_records, tmp_path):
    from medtl.data.manifest import read_manifest

    run = tmp_path / "run"
    # A linear probe on a frozen random base memorises a handful of images: ResNet50V2's pooled features of
    # ~20 images, standardised by a BatchNorm in the head, are linearly separable, so train AUROC reaches ~1
    # within a few epochs while val AUROC stays near chance (measured: 1.0 against ~0.5 from epoch 2 on).
    phase = f"{{name: head, epochs: {EPOCHS}, learning_rate: 1.0e-2, trainable: none, schedule: constant}}"
    r = run_cli("train", "--config", SMOKE, "--workdir", run, "--set", f"data.records={few_records}",
                "--set", "data.image_size=32", "--set", "data.augment=[]", "--set", "model.backbone=ResNet50V2",
                "--set", "model.head={layers: [{global_pool: avg}, batch_norm]}",
                "--set", "train.batch_size=4", "--set", "train.keep_checkpoints=1", "--set", f"phases=[{phase}]")
    assert r.returncode == 0, r.stderr[-3000:]
    train_images = read_manifest(few_records).records("train")
    rows = [json.loads(line) for line in open(run / "history.jsonl")]
    assert len(rows) == EPOCHS
    for row in rows:  # train AUROC beside val AUROC, on the whole (small) train split, every epoch
        assert 0.0 <= row["train_auroc"] <= 1.0 and row["train_eval_images"] == train_images
        assert row["loss_name"] == "bce" and row["val_loss"] > 0
    assert rows[-1]["train_auroc"] - rows[-1]["val_auroc"] > 0.1, [(r["train_auroc"], r["val_auroc"]) for r in rows]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for kind in ("train", "validation"):
        events = EventAccumulator(str(run / "tensorboard" / kind), size_guidance={"tensors": 0})  # keep all
        events.Reload()
        assert {"epoch_loss", "epoch_auroc"} <= set(events.Tags()["tensors"]), kind
        assert len(events.Tensors("epoch_auroc")) == EPOCHS

    # A learning curve still rising at 100%: the advice says more data is likely to help.
    curve = tmp_path / "curve"
    curve.mkdir()
    path = write_learning_curve(str(curve), LearningCurve("h", 5, (CurvePoint(0.5, 10, 5, 0.60),
                                                                   CurvePoint(1.0, 20, 10, 0.65))))
    out = tmp_path / "report"
    r = run_cli("evaluate", "--workdir", run, "--split", "val", "--out", out, "--set", "evaluate.bootstrap=0",
                "--set", f"evaluate.learning_curve={path}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "warning: the run overfits: train macro AUROC exceeds val by" in r.stderr
    found = json.load(open(out / "metrics.json"))["overfitting"]
    assert found["flagged"] and found["gap_at_last"] == pytest.approx(rows[-1]["train_auroc"] - rows[-1]["val_auroc"])
    assert [x.split(":")[0] for x in found["remedies"]] == ["more data", "dropout", "augmentation", "weight decay",
                                                            "early stopping"]
    assert "still rising at 100%" in found["remedies"][0] and "more data is likely to help" in found["remedies"][0]
    page = (out / "report.html").read_text()
    assert "The run overfits." in page and "Remedies this run did not use" in page

    r = run_cli("evaluate", "--workdir", run, "--split", "val", "--out", tmp_path / "bad", "--set",
                f"evaluate.learning_curve={tmp_path / 'none.json'}")
    assert r.returncode == 2 and "evaluate.learning_curve" in r.stderr and "does not exist" in r.stderr
    assert "predicting split" not in r.stderr  # stopped before the work
