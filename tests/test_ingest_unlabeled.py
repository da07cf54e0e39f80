"""`medtl ingest --unlabeled` (issue 18): a folder of images without labels becomes de-identified,
patient-split records; jobs that need labels refuse them in one line, image-only streams read them.

Patients come from the DICOM PatientID or a --patients CSV; an image without one is refused (never
made its own patient). Errors name files by salted study id, never by file name (PACS exports name
files by MRN/accession). Also: folders with no images, and records folders with no images.
"""
import csv
import json
import os
import shutil

import pytest

from conftest import REPO, assert_user_error, run_cli

TINY = os.path.join(REPO, "tests", "reliability", "tiny.yaml")
SALT = os.environ["MEDTL_ID_SALT"].encode()


def _rows(studies) -> list[dict]:
    with open(os.path.join(studies, "labels.csv"), newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def dicom_studies(tmp_path_factory) -> str:
    """24 synthetic DICOM studies (11 patients, PatientID set), half moved into a subfolder, plus a
    non-image file: the scan is recursive and skips what is not an image."""
    from medtl.data.synth import synthesize

    out = str(tmp_path_factory.mktemp("unlabeled-dicom"))
    synthesize(out, 24, seed=3, size=48, dicom=True)
    images = os.path.join(out, "images")
    os.makedirs(os.path.join(images, "sub"))
    for row in _rows(out)[::2]:
        shutil.move(os.path.join(images, row["Image Index"]), os.path.join(images, "sub", row["Image Index"]))
    with open(os.path.join(images, "notes.txt"), "w") as fh:
        fh.write("not an image\n")
    return out


@pytest.fixture(scope="module")
def png_studies(tmp_path_factory) -> str:
    """12 synthetic PNG studies of 6 patients; labels.csv has 'Image Index' and 'Patient ID'."""
    from medtl.data.synth import synthesize

    out = str(tmp_path_factory.mktemp("unlabeled-png"))
    synthesize(out, 12, seed=4, size=48)
    return out


def _ingest(images, out, *extra):
    return run_cli("ingest", "--images", images, "--unlabeled", "--out", out, "--image-size", 32, *extra)


def _records(folder) -> list[dict]:
    """Every record of every split: {split, key, patient, labels, mask, features}."""
    from medtl.tf import tf

    out = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".tfrecord"):
            for raw in tf.data.TFRecordDataset(os.path.join(folder, name)):
                f = tf.train.Example.FromString(raw.numpy()).features.feature
                out.append({"split": name.split("-")[0], "key": f["key"].bytes_list.value[0].decode(),
                            "patient": f["patient"].bytes_list.value[0].decode(),
                            "labels": list(f["labels"].int64_list.value), "mask": list(f["mask"].int64_list.value),
                            "features": set(f)})
    return out


def _assert_patient_split(records) -> None:
    splits = {}
    for r in records:
        splits.setdefault(r["patient"], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits.values()), splits


def test_dicom_folder_becomes_patient_split_records_without_labels(dicom_studies, tmp_path):
    from medtl.data.deid import salted_hash
    from medtl.data.manifest import read_manifest
    from medtl.data.records import ALLOWED_FEATURES
    from medtl.errors import MedtlError

    images, out = os.path.join(dicom_studies, "images"), tmp_path / "records"
    r = _ingest(images, out, "--private-map", tmp_path / "map.csv", "--keep-fields", "view_position")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "1 file(s) under --images are not DICOM, PNG or JPEG" in r.stderr

    manifest = read_manifest(str(out), unlabeled_ok=True)
    assert not manifest.labeled and manifest.labels == () and manifest.format == "unlabeled"
    assert manifest.split_source == "random" and all(manifest.records(s) for s in ("train", "val", "test"))
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["labels"] == [] and raw["splits"]["train"]["positives"] == {}  # the on-disk format, labels empty

    rows = _rows(dicom_studies)
    files = {salted_hash(SALT, os.path.join("sub", row["Image Index"]) if i % 2 == 0 else row["Image Index"]): row
             for i, row in enumerate(rows)}
    records = _records(out)
    assert sorted(r["key"] for r in records) == sorted(files)
    for rec in records:  # the patient is the DICOM PatientID, salted; no label vector
        assert rec["patient"] == salted_hash(SALT, files[rec["key"]]["Patient ID"])
        assert rec["labels"] == [] and rec["mask"] == [] and rec["features"] <= set(ALLOWED_FEATURES)
    assert len({rec["patient"] for rec in records}) == len({row["Patient ID"] for row in rows}) < len(rows)
    _assert_patient_split(records)
    assert sum(manifest.splits[s].patients for s in manifest.splits) == len({row["Patient ID"] for row in rows})

    shared = r.stdout + r.stderr + (out / "manifest.json").read_text() + (out / "quarantine.csv").read_text()
    for row in rows:  # neither file names nor planted identifiers leave the input
        assert row["Image Index"] not in shared and row["Patient ID"] not in shared
    with open(tmp_path / "map.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == len(rows)

    assert run_cli("verify", out).returncode == 0
    with pytest.raises(MedtlError, match="pretrain.method: simclr"):
        read_manifest(str(out))  # the one check every labeled job passes through
    r = run_cli("train", "--config", TINY, "--workdir", tmp_path / "run", "--set", f"data.records={out}")
    assert_user_error(r, f"records folder {out} is unlabeled", "--labels CSV", "pretrain.method: simclr",
                      exit_code=2)


def test_image_only_stream_reads_unlabeled_records(dicom_studies, tmp_path):
    """What a self-supervised pretrain reads: build_dataset(..., image_only=True) gives image batches.
    The records come from a partitioned ingest (2 workers + finalize), split as a whole one is."""
    import dataclasses

    from medtl import api
    from medtl.data.ingest import IngestOptions, finalize, ingest, ingest_part
    from medtl.data.pipeline import build_dataset
    from medtl.errors import MedtlError

    out = str(tmp_path / "records")
    opt = IngestOptions(images=os.path.join(dicom_studies, "images"), labels=None, out=out, unlabeled=True,
                        image_size=32, progress=False)
    for worker in (0, 1):
        ingest_part(opt, worker, 2)
    with pytest.raises(MedtlError, match="not written without --unlabeled"):
        finalize(dataclasses.replace(opt, unlabeled=False), 2)  # the workers' options, or refused
    parted = finalize(opt, 2)
    whole = ingest(dataclasses.replace(opt, out=str(tmp_path / "whole")))
    counts = lambda m: {s: (i.records, i.patients) for s, i in m.splits.items()}  # noqa: E731
    assert counts(parted) == counts(whole) and not parted.labeled and parted.format == "unlabeled"
    cfg = api.load_job_config(TINY, [f"data.records={out}", "data.image_size=32", "train.batch_size=4"])
    batch = next(iter(build_dataset(cfg, "train", image_only=True)))
    assert tuple(batch.shape) == (4, 32, 32, cfg.data.channels)
    assert sum(int(b.shape[0]) for b in build_dataset(cfg, "test", image_only=True)) > 0


def test_png_patients_from_csv_and_images_without_one(png_studies, tmp_path):
    from medtl.data.deid import salted_hash

    images, rows = os.path.join(png_studies, "images"), _rows(png_studies)
    first = salted_hash(SALT, sorted(row["Image Index"] for row in rows)[0])
    # PNG carries no patient: refused in one line with the count and the first salted id, not each its own patient.
    r = _ingest(images, tmp_path / "r0")
    line = assert_user_error(r, f"12 of 12 images under --images {images} have no patient id", f"study {first}",
                             "--patients CSV")
    assert not (tmp_path / "r0" / "manifest.json").exists()

    # A CSV missing rows for two images: the count and the first one's salted id, never its file name.
    missing = sorted(rows, key=lambda row: row["Image Index"])[3:5]
    partial = tmp_path / "patients-partial.csv"
    with open(partial, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "patient"])
        writer.writerows([row["Image Index"], row["Patient ID"]] for row in rows if row not in missing)
    r = _ingest(images, tmp_path / "r1", "--patients", partial)
    line = assert_user_error(r, f"--patients {partial} has no row with a patient for 2 of 12 images",
                             f"study {salted_hash(SALT, missing[0]['Image Index'])}", "Add a row")
    assert all(row["Image Index"] not in line for row in rows)

    # The synth table's own columns ('Image Index', 'Patient ID') are found without --image-column.
    out = tmp_path / "records"
    r = _ingest(images, out, "--patients", os.path.join(png_studies, "labels.csv"), "--val-fraction", 0.2)
    assert r.returncode == 0, r.stderr[-3000:]
    records = _records(out)
    patient_of = {salted_hash(SALT, row["Image Index"]): salted_hash(SALT, row["Patient ID"]) for row in rows}
    assert {rec["key"]: rec["patient"] for rec in records} == patient_of
    _assert_patient_split(records)


def test_option_conflicts_are_one_line(png_studies, tmp_path):
    images, labels = os.path.join(png_studies, "images"), os.path.join(png_studies, "labels.csv")
    r = _ingest(images, tmp_path / "r", "--labels", labels)
    assert_user_error(r, "--unlabeled", f"--labels {labels}", "drop --labels")
    r = run_cli("ingest", "--images", images, "--labels", labels, "--patients", labels, "--out", tmp_path / "r")
    assert_user_error(r, f"--patients {labels} goes with --unlabeled")


def test_folders_without_images(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(_ingest(empty, tmp_path / "r0"), f"no DICOM, PNG or JPEG files under --images {empty}")
    (empty / "readme.txt").write_text("no studies here\n")
    assert_user_error(_ingest(empty, tmp_path / "r0"), f"under --images {empty} (1 other file(s) there)")

    # Files that look like images but none decodes: quarantined, then one line naming the folder.
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("a.png", "b.jpg", "c.dcm"):
        (broken / name).write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10 if name.endswith(".png") else b"garbage")
    out = tmp_path / "records"
    r = _ingest(broken, out, "--patients", _patients_csv(tmp_path, ["a.png", "b.jpg", "c.dcm"]))
    line = assert_user_error(r, f"none of the 3 image files under --images {broken} could be read",
                             "quarantine.csv")
    assert "a.png" not in line and "c.dcm" not in line
    # The records folder it leaves holds no images: verify says so, naming the folder.
    assert_user_error(run_cli("verify", out), f"records folder {out} holds no images at all")


def _patients_csv(tmp_path, files) -> str:
    path = tmp_path / "patients.csv"
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([["image", "patient"]] + [[f, f"p{i}"] for i, f in enumerate(files)])
    return str(path)


def test_records_without_train_images_are_refused(tmp_path):
    """A labeled manifest whose train split is empty: train and (supervised) pretrain name the folder."""
    from medtl.data.manifest import Manifest, SplitInfo, write_manifest

    out = tmp_path / "records"
    out.mkdir()
    write_manifest(str(out), Manifest(labels=("Mass",), stored_image_size=32, bit_depth=8,
                                      splits={s: SplitInfo() for s in ("train", "val", "test")}))
    assert_user_error(run_cli("verify", out), f"records folder {out} holds no images at all")
    r = run_cli("train", "--config", TINY, "--workdir", tmp_path / "run", "--set", f"data.records={out}")
    assert_user_error(r, f"records folder {out} holds no images", "re-run `medtl ingest`")
    r = run_cli("pretrain", "--config", TINY, "--workdir", tmp_path / "pre", "--set", f"data.records={out}",
                "--set", "pretrain.method=supervised", "--set",
                "phases=[{name: all, epochs: 1, learning_rate: 0.001, trainable: all}]")
    assert_user_error(r, f"records folder {out} holds no images")
