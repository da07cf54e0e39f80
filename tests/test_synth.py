"""Synthetic studies: ChestX-ray14 layout, determinism, learnable imbalance, DICOM identifiers."""
import csv
import filecmp
import os

import numpy as np
import pydicom

from medtl.data.synth import CXR14_HEADER, FINDINGS, synthesize


def _rows(folder):
    with open(os.path.join(folder, "labels.csv"), newline="") as fh:
        return list(csv.reader(fh))


def test_layout_matches_chestxray14(tmp_path):
    synthesize(str(tmp_path), 60, seed=1, size=64)
    rows = _rows(tmp_path)
    assert rows[0] == CXR14_HEADER
    with open(tmp_path / "labels.csv", newline="") as fh:
        records = list(csv.DictReader(fh))
    assert len(records) == 60
    for r in records:
        assert os.path.isfile(tmp_path / "images" / r["Image Index"])
        findings = r["Finding Labels"].split("|")
        assert findings == ["No Finding"] or set(findings) <= set(FINDINGS)
        assert r["Image Index"].startswith(f"{int(r['Patient ID']):08d}_")
    per_patient = {}
    for r in records:
        per_patient.setdefault(r["Patient ID"], []).append(r)
    assert max(len(v) for v in per_patient.values()) > 1, "several images per patient expected"


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c = (str(tmp_path / x) for x in "abc")
    synthesize(a, 25, seed=3, size=64)
    synthesize(b, 25, seed=3, size=64)
    synthesize(c, 25, seed=4, size=64)
    names = sorted(os.listdir(os.path.join(a, "images")))
    assert names == sorted(os.listdir(os.path.join(b, "images")))
    match, mismatch, errors = filecmp.cmpfiles(os.path.join(a, "images"), os.path.join(b, "images"), names,
                                               shallow=False)
    assert match == names and not mismatch and not errors
    assert filecmp.cmp(os.path.join(a, "labels.csv"), os.path.join(b, "labels.csv"), shallow=False)
    assert not filecmp.cmp(os.path.join(a, "labels.csv"), os.path.join(c, "labels.csv"), shallow=False)


def test_imbalance_and_cooccurrence(tmp_path):
    info = synthesize(str(tmp_path), 1500, seed=0, size=32)
    prevalence = info["prevalence"]
    assert all(0.01 < p < 0.35 for p in prevalence.values()), prevalence
    assert max(prevalence.values()) / min(prevalence.values()) > 3, "rare and common findings expected"
    with open(tmp_path / "labels.csv", newline="") as fh:
        findings = [set(r["Finding Labels"].split("|")) for r in csv.DictReader(fh)]
    no_finding = np.mean([f == {"No Finding"} for f in findings])
    assert 0.35 < no_finding < 0.75
    cardio = np.array(["Cardiomegaly" in f for f in findings])
    effusion = np.array(["Effusion" in f for f in findings])
    # Effusion is more common with cardiomegaly (heart failure), as in real data.
    assert effusion[cardio].mean() > 2 * effusion[~cardio].mean()


def test_findings_change_pixels_where_expected(tmp_path):
    """Cardiomegaly widens the heart shadow: mean brightness of the lower-centre region rises."""
    from medtl.data.synth import Patient, render

    patient = Patient(1, 50, "M", 1.0, 1.0, frozenset())
    normal = render(np.random.default_rng(0), patient, set(), 128)
    big_heart = render(np.random.default_rng(0), patient, {"Cardiomegaly"}, 128)
    region = (slice(80, 110), slice(64, 110))
    assert big_heart[region].mean() > normal[region].mean() + 0.02
    assert normal.dtype == np.float32 and 0 <= normal.min() and normal.max() <= 1


def test_dicom_output_carries_fake_identifiers(tmp_path):
    synthesize(str(tmp_path), 6, seed=2, size=64, dicom=True)
    rows = _rows(tmp_path)[1:]
    ds = pydicom.dcmread(tmp_path / "images" / rows[0][0])
    assert ds.PatientID == rows[0][3] and ds.PatientID.startswith("MRN")
    assert str(ds.PatientName) and ds.PatientBirthDate and ds.AccessionNumber.startswith("ACC")
    assert ds.pixel_array.shape == (64, 64) and ds.pixel_array.dtype == np.uint16
    assert ds.BitsStored == 12 and ds.PhotometricInterpretation == "MONOCHROME2"
