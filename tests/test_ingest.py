"""Ingest: patient-level split, manifest counts, determinism, quarantine of unusable inputs."""
import csv
import hashlib
import os
import shutil

import numpy as np
import pytest

from medtl.data.deid import load_salt, salted_hash
from medtl.data.ingest import IngestOptions, ingest
from medtl.data.privatemap import read_private_map
from medtl.data.manifest import read_manifest
from medtl.data.records import KEY, LABELS, PATIENT, feature_spec
from medtl.errors import MedtlError
from medtl.tf import tf

from conftest import assert_user_error, run_cli


def _read(path, num_labels):
    spec = feature_spec(num_labels)
    return [tf.io.parse_single_example(r, spec) for r in tf.data.TFRecordDataset(path)]


def test_no_patient_in_two_splits(records):
    manifest = read_manifest(records)
    patients = {}
    for split, info in manifest.splits.items():
        patients[split] = set()
        for shard in info.shards:
            for ex in _read(os.path.join(records, shard.file), manifest.num_labels):
                patients[split].add(ex[PATIENT].numpy())
        assert len(patients[split]) == info.patients
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]


def test_manifest_lists_every_shard_with_true_counts(records):
    manifest = read_manifest(records)
    on_disk = sorted(f for f in os.listdir(records) if f.endswith(".tfrecord"))
    listed = sorted(s.file for info in manifest.splits.values() for s in info.shards)
    assert on_disk == listed
    total = 0
    for split, info in manifest.splits.items():
        assert len(info.shards) > 1, "small --shard-mb should give several shards"
        for i, shard in enumerate(info.shards):
            assert shard.file == f"{split}-{i:05d}-of-{len(info.shards):05d}.tfrecord"
            path = os.path.join(records, shard.file)
            examples = _read(path, manifest.num_labels)
            assert len(examples) == shard.records
            assert os.path.getsize(path) == shard.bytes
            assert hashlib.sha256(open(path, "rb").read()).hexdigest() == shard.sha256
        assert sum(s.records for s in info.shards) == info.records
        total += info.records
    assert total == 240
    assert list(manifest.labels) == sorted(manifest.labels)
    assert manifest.stored_image_size == 64 and manifest.bit_depth == 16


def test_prevalence_matches_the_records(records):
    manifest = read_manifest(records)
    names = manifest.labels
    for split, info in manifest.splits.items():
        labels = np.array([ex[LABELS].numpy() for s in info.shards
                           for ex in _read(os.path.join(records, s.file), len(names))])
        for i, name in enumerate(names):
            assert info.positives[name] == int(labels[:, i].sum())
            assert info.prevalence[name] == pytest.approx(labels[:, i].mean(), abs=1e-5)


def test_identifiers_are_salted_hashes(records, studies):
    manifest = read_manifest(records)
    with open(os.path.join(studies, "labels.csv"), newline="") as fh:
        ids = {r["Patient ID"] for r in csv.DictReader(fh)}
    shard = manifest.splits["train"].shards[0]
    for ex in _read(os.path.join(records, shard.file), manifest.num_labels):
        patient = ex[PATIENT].numpy().decode()
        assert len(patient) == 20 and patient not in ids
        assert not ex[KEY].numpy().decode().endswith(".png")


def test_kept_fields_are_coded_values_and_bands(records, studies):
    """sex, age band and view come from the table's columns; the manifest counts records and patients by value."""
    from medtl.data.records import read_fields

    from conftest import KEPT_FIELDS, age_band_by_hand

    manifest = read_manifest(records)
    assert manifest.fields == tuple(sorted(KEPT_FIELDS))
    salt = load_salt()
    with open(os.path.join(studies, "labels.csv"), newline="") as fh:
        rows = {salted_hash(salt, r["Image Index"]): r for r in csv.DictReader(fh)}
    for split, info in manifest.splits.items():
        found = read_fields([os.path.join(records, s.file) for s in info.shards], KEPT_FIELDS)
        expected = {k: {"sex": rows[k]["Patient Gender"], "age_band": age_band_by_hand(int(rows[k]["Patient Age"])),
                        "view_position": "PA"} for k in found}
        assert found == expected and len(found) == info.records
        for field in KEPT_FIELDS:
            counts = {}
            for key, values in found.items():
                entry = counts.setdefault(values[field], [0, set()])
                entry[0] += 1
                entry[1].add(rows[key]["Patient ID"])
            assert info.field_counts[field] == {v: {"records": n, "patients": len(p)} for v, (n, p) in counts.items()}


def test_rerun_is_byte_identical(studies, tmp_path):
    outs = []
    for name in ("a", "b"):
        out = str(tmp_path / name)
        ingest(IngestOptions(images=os.path.join(studies, "images"), labels=os.path.join(studies, "labels.csv"),
                             out=out, image_size=48, bit_depth=8, shard_mb=0.05, seed=5, progress=False))
        outs.append(out)
    files = sorted(os.listdir(outs[0]))
    assert files == sorted(os.listdir(outs[1]))
    for f in files:
        assert open(os.path.join(outs[0], f), "rb").read() == open(os.path.join(outs[1], f), "rb").read(), f


def test_split_seed_changes_assignment(studies, tmp_path):
    counts = []
    for seed in (1, 2):
        m = ingest(IngestOptions(images=os.path.join(studies, "images"), labels=os.path.join(studies, "labels.csv"),
                                 out=str(tmp_path / str(seed)), image_size=32, seed=seed, progress=False))
        counts.append({k: v.records for k, v in m.splits.items()})
    assert sum(counts[0].values()) == sum(counts[1].values()) == 240


def _copy_studies(studies, tmp_path):
    dst = tmp_path / "studies"
    shutil.copytree(studies, dst)
    return str(dst)


def test_missing_image_is_quarantined_and_fails_above_the_threshold(studies, tmp_path):
    src = _copy_studies(studies, tmp_path)
    with open(os.path.join(src, "labels.csv"), newline="") as fh:
        first = list(csv.DictReader(fh))[0]["Image Index"]
    os.remove(os.path.join(src, "images", first))
    opts = dict(images=os.path.join(src, "images"), labels=os.path.join(src, "labels.csv"),
                image_size=32, progress=False)
    study = salted_hash(load_salt(), first)
    with pytest.raises(MedtlError) as err:
        ingest(IngestOptions(out=str(tmp_path / "r1"), max_bad_fraction=0.0, private_map=str(tmp_path / "map1.csv"),
                             **opts))
    # The error names the study by its salted id, never by its file name; the private map has the name.
    assert study in str(err.value) and "missing_file" in str(err.value)
    assert first not in str(err.value) and os.path.splitext(first)[0] not in str(err.value)
    assert read_private_map(str(tmp_path / "map1.csv"))[study] == os.path.join(opts["images"], first)
    # Allowed: the study is listed in quarantine.csv by its id with its reason, the rest is written.
    manifest = ingest(IngestOptions(out=str(tmp_path / "r2"), max_bad_fraction=0.05, **opts))
    with open(tmp_path / "r2" / "quarantine.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows == [{"study": study, "reason": "missing_file",
                     "message": "listed in the labels table but not found on disk"}]
    assert os.path.splitext(first)[0] not in (tmp_path / "r2" / "quarantine.csv").read_text()
    assert manifest.quarantined == 1
    assert sum(s.records for s in manifest.splits.values()) == 239


def test_image_on_disk_but_not_in_table_is_quarantined(studies, tmp_path):
    src = _copy_studies(studies, tmp_path)
    shutil.copy(os.path.join(src, "images", sorted(os.listdir(os.path.join(src, "images")))[0]),
                os.path.join(src, "images", "stray.png"))
    ingest(IngestOptions(images=os.path.join(src, "images"), labels=os.path.join(src, "labels.csv"),
                         out=str(tmp_path / "r"), image_size=32, max_bad_fraction=0.05, progress=False,
                         private_map=str(tmp_path / "private" / "map.csv")))
    text = (tmp_path / "r" / "quarantine.csv").read_text()
    study = salted_hash(load_salt(), "stray.png")
    assert f"{study},not_in_labels" in text and "stray" not in text
    assert read_private_map(str(tmp_path / "private" / "map.csv"))[study] == os.path.join(src, "images", "stray.png")


def test_cli_ingest_errors(studies, tmp_path):
    r = run_cli("ingest", "--images", tmp_path / "nope", "--labels", os.path.join(studies, "labels.csv"),
                "--out", tmp_path / "r")
    assert_user_error(r, "images folder", "nope", "does not exist")
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("Image,Labels\na.png,Nodule\n")
    r = run_cli("ingest", "--images", os.path.join(studies, "images"), "--labels", bad_csv, "--out", tmp_path / "r")
    assert_user_error(r, "bad.csv", "'Image Index'", "'Finding Labels'", "'Patient ID'")
    r = run_cli("ingest", "--images", os.path.join(studies, "images"), "--labels", tmp_path / "absent.csv",
                "--out", tmp_path / "r")
    assert_user_error(r, "absent.csv", "does not exist")
