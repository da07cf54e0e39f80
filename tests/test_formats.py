"""Public dataset layouts: CheXpert (uncertainty policies, masks), multihot CSV, MedMNIST .npz, split files."""
import csv
import os

import cv2
import numpy as np
import pytest

from medtl.data.deid import load_salt, salted_hash
from medtl.data.manifest import read_manifest
from medtl.data.records import KEY, LABELS, MASK, feature_spec
from medtl.tf import tf

from conftest import assert_user_error, run_cli

CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
                   "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia",
                   "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"]


def _records(folder, num_labels):
    """{key hash: (labels, mask)} over every shard."""
    out = {}
    spec = feature_spec(num_labels)
    for shard in sorted(os.listdir(folder)):
        if shard.endswith(".tfrecord"):
            for r in tf.data.TFRecordDataset(os.path.join(folder, shard)):
                ex = tf.io.parse_single_example(r, spec)
                out[ex[KEY].numpy().decode()] = (ex[LABELS].numpy().tolist(), ex[MASK].numpy().tolist())
    return out


def _chexpert(tmp_path, rows):
    root = tmp_path / "chexpert"
    for row in rows:
        path = root / row[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), np.random.default_rng(len(str(path))).integers(0, 255, (40, 32), np.uint8))
    with open(root / "train.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CHEXPERT_HEADER)
        writer.writerows(rows)
    return root


def _chexpert_rows(n=30):
    rows = []
    rng = np.random.default_rng(1)
    choices = ["1.0", "0.0", "-1.0", ""]
    for i in range(n):
        path = f"CheXpert-v1.0-small/train/patient{i // 2:05d}/study{i % 2 + 1}/view1_frontal.jpg"
        values = [choices[int(v)] for v in rng.integers(0, 4, len(CHEXPERT_HEADER) - 5)]
        view = ["Lateral", ""] if i % 4 == 3 else ["Frontal", "AP" if i % 2 else "PA"]
        rows.append([path, ("Female", "Male", "Unknown")[i % 3], str(12 + 7 * i)] + view + values)
    return rows


@pytest.mark.parametrize("uncertain, blank", [("ones", "mask"), ("zeros", "mask"), ("ignore", "mask"),
                                              ("ignore", "zeros")])
def test_chexpert_uncertainty_and_blank_policies(tmp_path, uncertain, blank):
    rows = _chexpert_rows()
    root = _chexpert(tmp_path, rows)
    out = tmp_path / "records"
    r = run_cli("ingest", "--images", root, "--labels", root / "train.csv", "--format", "chexpert", "--out", out,
                "--image-size", 32, "--uncertain", uncertain, "--blank", blank, "--val-fraction", 0.2,
                "--test-fraction", 0.2)
    assert r.returncode == 0, r.stderr
    manifest = read_manifest(out)
    names = CHEXPERT_HEADER[5:]
    assert list(manifest.labels) == names and manifest.uncertain == uncertain
    records = _records(out, len(names))
    salt = load_salt()
    assert len(records) == len(rows)
    for row in rows:
        labels, mask = records[salted_hash(salt, row[0])]
        for value, y, m in zip(row[5:], labels, mask):
            if value == "1.0":
                assert (y, m) == (1, 1)
            elif value == "0.0":
                assert (y, m) == (0, 1)
            elif value == "-1.0":
                assert (y, m) == {"ones": (1, 1), "zeros": (0, 1), "ignore": (0, 0)}[uncertain]
            else:
                assert (y, m) == ((0, 0) if blank == "mask" else (0, 1))
    # Both studies of a patient land in one split.
    assert sum(manifest.splits[s].patients for s in ("train", "val", "test")) == len(rows) // 2


def test_chexpert_label_selection_and_bad_values(tmp_path):
    rows = _chexpert_rows(12)
    rows[3][7] = "maybe"
    root = _chexpert(tmp_path, rows)
    out = tmp_path / "records"
    r = run_cli("ingest", "--images", root, "--labels", root / "train.csv", "--format", "chexpert", "--out", out,
                "--image-size", 32, "--label-names", "Cardiomegaly,Edema", "--max-bad-fraction", 0.2,
                "--val-fraction", 0, "--test-fraction", 0, "--private-map", tmp_path / "map.csv",
                "--keep-fields", "sex,age_band,view_position", "--site", "site-b")
    assert r.returncode == 0, r.stderr
    assert read_manifest(out).labels == ("Cardiomegaly", "Edema")
    # Kept fields from CheXpert's columns: sex coded (Unknown: unknown), age as a band, laterals as LATERAL.
    from medtl.data.records import read_fields

    from conftest import age_band_by_hand

    fields = read_fields([str(out / f) for f in os.listdir(out) if f.endswith(".tfrecord")],
                         ("sex", "age_band", "view_position", "site"))
    salt = load_salt()
    for row in rows[:3] + rows[4:]:
        assert fields[salted_hash(salt, row[0])] == {
            "sex": {"Female": "F", "Male": "M"}.get(row[1], ""), "age_band": age_band_by_hand(int(row[2])),
            "view_position": "LATERAL" if row[3] == "Lateral" else row[4], "site": "site-b"}
    quarantine = (out / "quarantine.csv").read_text()
    study = salted_hash(load_salt(), rows[3][0])
    assert f"{study},bad_label_value" in quarantine and "Cardiomegaly='maybe'" in quarantine
    assert rows[3][0] not in quarantine and "patient" not in quarantine and "view1" not in quarantine
    with open(tmp_path / "map.csv", newline="") as fh:
        assert {"study": study, "path": os.path.join(str(root), rows[3][0])} in list(csv.DictReader(fh))
    r = run_cli("ingest", "--images", root, "--labels", root / "train.csv", "--format", "chexpert", "--out", out,
                "--label-names", "Cardiomegaly,Heartache")
    assert_user_error(r, "--label-names Heartache not in", "train.csv", "Pleural Effusion")
    r = run_cli("ingest", "--images", root, "--labels", root / "train.csv", "--format", "chexpert", "--out", out,
                "--site", "St Elsewhere Hospital")
    assert_user_error(r, "--site 'St Elsewhere Hospital' must be", "neutral label")


def test_multihot_csv_with_blank_as_mask(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    rows = []
    for i in range(24):
        cv2.imwrite(str(images / f"s{i}.png"), np.full((20, 20), i * 10, np.uint8))
        rows.append({"filename": f"s{i}.png", "patient_id": f"P{i // 3}", "a": str(i % 2), "b": "" if i % 5 == 0 else "1"})
    with open(tmp_path / "t.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["filename", "patient_id", "a", "b"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "records"
    r = run_cli("ingest", "--images", images, "--labels", tmp_path / "t.csv", "--format", "multihot",
                "--out", out, "--image-size", 32, "--val-fraction", 0.25, "--test-fraction", 0.25)
    assert r.returncode == 0, r.stderr
    records = _records(out, 2)
    salt = load_salt()
    for row in rows:
        labels, mask = records[salted_hash(salt, row["filename"])]
        assert labels[0] == int(row["a"]) and mask[0] == 1
        assert (labels[1], mask[1]) == ((0, 0) if row["b"] == "" else (1, 1))
    manifest = read_manifest(out)
    assert sum(info.patients for info in manifest.splits.values()) == 8
    assert sum(info.masked["b"] for info in manifest.splits.values()) == 5


def _medmnist(path, n=(30, 6, 9), classes=None):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        arrays[f"{split}_images"] = rng.integers(0, 255, (count, 28, 28), np.uint8)
        arrays[f"{split}_labels"] = (rng.integers(0, classes, (count, 1)) if classes
                                     else rng.integers(0, 2, (count, 14))).astype(np.uint8)
    np.savez_compressed(path, **arrays)
    return arrays


def test_medmnist_keeps_its_splits_and_labels(tmp_path):
    arrays = _medmnist(tmp_path / "chestmnist.npz")
    out = tmp_path / "records"
    r = run_cli("ingest", "--format", "medmnist", "--images", tmp_path / "chestmnist.npz", "--out", out,
                "--image-size", 32, "--bit-depth", 8)
    assert r.returncode == 0, r.stderr
    manifest = read_manifest(out)
    assert manifest.labels[:3] == ("Atelectasis", "Cardiomegaly", "Effusion") and manifest.num_labels == 14
    assert {s: manifest.records(s) for s in ("train", "val", "test")} == {"train": 30, "val": 6, "test": 9}
    assert manifest.split_source == "given"
    records = _records(out, 14)
    salt = load_salt()
    for i in range(9):
        labels, _ = records[salted_hash(salt, f"test/{i:06d}")]
        assert labels == arrays["test_labels"][i].tolist()


def test_medmnist_multiclass_becomes_one_hot(tmp_path):
    _medmnist(tmp_path / "pathmnist.npz", classes=4)
    out = tmp_path / "records"
    r = run_cli("ingest", "--format", "medmnist", "--images", tmp_path / "pathmnist.npz", "--out", out,
                "--image-size", 32, "--label-names", "a,b,c,d")
    assert r.returncode == 0, r.stderr
    records = _records(out, 4)
    assert all(sum(labels) == 1 for labels, _ in records.values())


def test_split_file_is_honoured_and_checked(studies, tmp_path):
    with open(os.path.join(studies, "labels.csv"), newline="") as fh:
        table = list(csv.DictReader(fh))
    patients = sorted({r["Patient ID"] for r in table}, key=int)
    with open(tmp_path / "splits.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["patient", "split"])
        for i, p in enumerate(patients):
            writer.writerow([p, ("train", "val", "test")[i % 3]])
    out = tmp_path / "records"
    r = run_cli("ingest", "--images", os.path.join(studies, "images"), "--labels", os.path.join(studies, "labels.csv"),
                "--out", out, "--image-size", 32, "--split-file", tmp_path / "splits.csv")
    assert r.returncode == 0, r.stderr
    manifest = read_manifest(out)
    expected = {s: sum(1 for r in table if ("train", "val", "test")[patients.index(r["Patient ID"]) % 3] == s)
                for s in ("train", "val", "test")}
    assert {s: manifest.records(s) for s in expected} == expected
    # A per-file split that separates a patient's images is refused.
    multi = next(p for p in patients if sum(r["Patient ID"] == p for r in table) > 1)
    first_patient = [r["Image Index"] for r in table if r["Patient ID"] == multi]
    with open(tmp_path / "bad.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "split"])
        for i, r in enumerate(table):
            writer.writerow([r["Image Index"], "test" if r["Image Index"] == first_patient[1] else "train"])
    r = run_cli("ingest", "--images", os.path.join(studies, "images"), "--labels", os.path.join(studies, "labels.csv"),
                "--out", tmp_path / "r2", "--split-file", tmp_path / "bad.csv")
    line = assert_user_error(r, "belong to the same patient", salted_hash(load_salt(), first_patient[1]))
    assert os.path.splitext(first_patient[1])[0] not in line


def test_label_names_keep_every_study_with_only_the_findings_listed(studies, tmp_path):
    out = tmp_path / "records"
    r = run_cli("ingest", "--images", os.path.join(studies, "images"), "--labels", os.path.join(studies, "labels.csv"),
                "--out", out, "--image-size", 32, "--label-names", "Effusion,Cardiomegaly")
    assert r.returncode == 0, r.stderr
    with open(os.path.join(studies, "labels.csv"), newline="") as fh:
        table = list(csv.DictReader(fh))
    manifest = read_manifest(str(out))
    assert manifest.labels == ("Effusion", "Cardiomegaly")  # in the order given
    assert sum(manifest.records(s) for s in manifest.splits) == len(table)  # nothing quarantined
    positives = {name: sum(name in row["Finding Labels"].split("|") for row in table)
                 for name in manifest.labels}
    assert {name: sum(manifest.splits[s].positives.get(name, 0) for s in manifest.splits)
            for name in manifest.labels} == positives
    assert "--label-names leaves out" in r.stderr and "Nodule (" in r.stderr
