"""De-identification: planted DICOM identifiers never reach shards, manifest, quarantine or logs."""
import csv
import os

import pydicom

from medtl.data.records import ALLOWED_FEATURES
from medtl.tf import tf

from conftest import cli_env, run_cli


def _planted(images):
    """Every identifying value in the DICOM headers (and the CSV's patient IDs are the same MRNs)."""
    values = set()
    for name in os.listdir(images):
        ds = pydicom.dcmread(os.path.join(images, name))
        values.update({str(ds.PatientName), str(ds.PatientName.family_name), str(ds.PatientID),
                       ds.PatientBirthDate, ds.AccessionNumber, ds.InstitutionName,
                       ds[0x0011, 0x1001].value, ds.StudyInstanceUID, ds.SOPInstanceUID})
    return {v for v in values if v}


def test_no_identifier_reaches_any_output(tmp_path):
    studies = tmp_path / "studies"
    assert run_cli("synth", "--out", studies, "--n", 40, "--seed", 9, "--size", 64, "--dicom").returncode == 0
    images = studies / "images"
    planted = _planted(images)
    assert len(planted) > 100
    # One damaged study: it is quarantined, and its identifiers must not leak through the quarantine file.
    victim = sorted(os.listdir(images))[0]
    data = (images / victim).read_bytes()
    (images / victim).write_bytes(data[: len(data) - 2000])
    salt = "planted-salt-value-0123456789"
    out = tmp_path / "records"
    r = run_cli("ingest", "--images", images, "--labels", studies / "labels.csv", "--out", out, "--image-size", 32,
                "--keep-fields", "view_position,modality,sex", "--max-bad-fraction", 0.1,
                env=cli_env(MEDTL_ID_SALT=salt))
    assert r.returncode == 0, r.stderr
    assert f"{victim},truncated_pixel_data" in (out / "quarantine.csv").read_text()

    blobs = {"stdout": r.stdout.encode(), "stderr": r.stderr.encode()}
    for root, _, files in os.walk(out):
        for name in files:
            blobs[os.path.join(root, name)] = open(os.path.join(root, name), "rb").read()
    searched = sum(len(b) for b in blobs.values())
    assert searched > 50_000
    for value in sorted(planted) + [salt]:
        needle = value.encode()
        leaks = [where for where, blob in blobs.items() if needle in blob]
        assert not leaks, f"{value!r} found in {leaks}"

    # Records hold only allow-listed features.
    shard = next(f for f in os.listdir(out) if f.startswith("train-"))
    for record in tf.data.TFRecordDataset(str(out / shard)).take(3):
        example = tf.train.Example.FromString(record.numpy())
        assert set(example.features.feature) <= set(ALLOWED_FEATURES)
        assert example.features.feature["field/modality"].bytes_list.value == [b"DX"]


def test_hash_is_keyed_by_the_secret_salt():
    from medtl.data.deid import salted_hash

    a, b = salted_hash(b"salt-one-0123456789", "MRN0000001"), salted_hash(b"salt-two-0123456789", "MRN0000001")
    assert a != b and len(a) == 20 and "MRN" not in a


def test_salt_file_created_private(tmp_path, monkeypatch):
    from medtl.data import deid

    monkeypatch.delenv("MEDTL_ID_SALT", raising=False)
    monkeypatch.setattr(deid, "DEFAULT_SALT_FILE", str(tmp_path / "cfg" / "id_salt"))
    salt = deid.load_salt()
    assert len(salt) >= 32 and deid.load_salt() == salt
    assert oct(os.stat(tmp_path / "cfg" / "id_salt").st_mode & 0o777) == "0o600"
