"""No name from the input leaves it: quarantine rows, part files and logs name studies by salted id; the
private map (the one way back) is written only where the user says, never into the records; DICOM's
BurnedInAnnotation quarantines a file unless allowed. (The byte search of every artefact of every
command is tests/reliability/test_leaks.py.)"""
import csv
import os
import re
import shutil

import pytest

from conftest import assert_user_error, cli_env, run_cli
from medtl.data.deid import load_salt, redact, salted_hash
from medtl.data.privatemap import read_private_map
from reliability.helpers import blobs_under, damage_two_studies, find_leaks, pacs_layout

DEBUG = {"MEDTL_LOG_LEVEL": "debug"}


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """12 DICOM studies as MRN/ACCESSION.dcm, with one truncated, one burned-in and one stray (not in the
    table) file; returns (folder, planted names, {case: relative path})."""
    from medtl.data.synth import synthesize

    flat = str(tmp_path_factory.mktemp("flat"))
    synthesize(flat, 12, seed=3, size=32, dicom=True)
    root = tmp_path_factory.mktemp("pacs")
    planted = pacs_layout(flat, str(root))
    images = root / "images"
    with open(root / "labels.csv", newline="") as fh:
        files = sorted(row["Image Index"] for row in csv.DictReader(fh))
    truncated, burned = damage_two_studies(images, files, cut=500)
    stray = os.path.join(os.path.dirname(files[2]), "ACC9999999999.dcm")  # beside listed files: ingest sees it
    shutil.copy(images / files[2], images / stray)
    cases = {"truncated": truncated, "burned": burned, "stray": stray}
    names = planted["folder name"] | planted["file name"] | {"ACC9999999999"}
    return root, names, cases


def _ingest(root, out, *extra, command="ingest"):
    return run_cli(command, "--images", root / "images", "--labels", root / "labels.csv", "--out", out,
                   "--image-size", 32, "--val-fraction", 0.2, "--test-fraction", 0.2, *extra, env=cli_env(**DEBUG))


def _quarantine(out) -> dict[str, str]:
    with open(out / "quarantine.csv", newline="") as fh:
        return {row["study"]: row["reason"] for row in csv.DictReader(fh)}


def test_quarantine_and_logs_name_studies_by_salted_id_only(pacs, tmp_path):
    root, names, cases = pacs
    salt = load_salt()
    ids = {case: salted_hash(salt, path) for case, path in cases.items()}
    # Too many bad files: the error names the first by its id; the private map is written all the same.
    r = _ingest(root, tmp_path / "r1", "--private-map", tmp_path / "private" / "map.csv")
    line = assert_user_error(r, "inputs quarantined", "study ")
    assert any(i in line for i in ids.values())
    out = tmp_path / "records"
    r = _ingest(root, out, "--max-bad-fraction", 0.5)
    assert r.returncode == 0, r.stderr
    assert "medtl: debug: ingest: study " in r.stderr  # the per-study debug lines ran
    assert _quarantine(out) == {ids["truncated"]: "truncated_pixel_data", ids["burned"]: "burned_in_annotation",
                                ids["stray"]: "not_in_labels"}
    blobs = blobs_under(out, tmp_path / "r1")
    blobs["logs"] = (r.stdout + r.stderr).encode()
    assert not find_leaks(names, blobs)
    # The map leads from every id back to its file, and lives only where it was asked for.
    mapped = read_private_map(str(tmp_path / "private" / "map.csv"))
    assert {mapped[i] for i in ids.values()} == {str(root / "images" / p) for p in cases.values()}
    assert len(mapped) == 13 and oct(os.stat(tmp_path / "private" / "map.csv").st_mode & 0o777) == "0o600"
    # Explicitly allowed, the burned-in file is kept.
    r = _ingest(root, tmp_path / "allowed", "--max-bad-fraction", 0.5, "--allow-burned-in")
    assert r.returncode == 0, r.stderr
    assert set(_quarantine(tmp_path / "allowed")) == {ids["truncated"], ids["stray"]}


def test_partitioned_ingest_keeps_names_out_of_parts_and_writes_the_map_at_finalize(pacs, tmp_path):
    root, names, cases = pacs
    out, private = tmp_path / "records", tmp_path / "map.csv"
    logs = {}
    for w in (0, 1):
        r = _ingest(root, out, "--worker-index", w, "--num-workers", 2, "--max-bad-fraction", 0.5,
                    "--private-map", private)
        assert r.returncode == 0, r.stderr
        logs[f"worker {w}"] = (r.stdout + r.stderr).encode()
    assert not private.exists(), "workers leave the map to finalize"
    parts = blobs_under(out / ".parts")
    assert sum(k.endswith("part.json") for k in parts) == 2
    assert not find_leaks(names, {**parts, **logs})
    r = _ingest(root, out, "--num-workers", 2, "--max-bad-fraction", 0.5, "--private-map", private,
                command="ingest-finalize")
    assert r.returncode == 0, r.stderr
    assert not find_leaks(names, {**blobs_under(out), "finalize": (r.stdout + r.stderr).encode()})
    salt = load_salt()
    assert read_private_map(str(private))[salted_hash(salt, cases["truncated"])] == str(
        root / "images" / cases["truncated"])
    assert salted_hash(salt, cases["burned"]) in _quarantine(out)


def test_private_map_is_refused_inside_the_records_or_the_input(pacs, tmp_path):
    root, _, _ = pacs
    out = tmp_path / "records"
    for command, extra in (("ingest", ()), ("ingest-finalize", ("--num-workers", 2))):
        r = _ingest(root, out, "--private-map", out / "map.csv", *extra, command=command)
        assert_user_error(r, "--private-map", "inside the records folder")
    r = _ingest(root, out, "--private-map", root / "images" / "map.csv")
    assert_user_error(r, "--private-map", "inside the input folder")
    assert not out.exists()


def test_redact_removes_every_name_of_a_study_path():
    text = "PermissionError: [Errno 13] Permission denied: '/data/MRN0000001/ACC0000000042.dcm' (ACC0000000042)"
    clean = redact(text, "MRN0000001/ACC0000000042.dcm", "/data")
    assert "MRN0000001" not in clean and "ACC0000000042" not in clean and "Permission denied" in clean
    assert redact("expected 1024 bytes", "12/1.dcm", "/x") == "expected 1024 bytes"  # short names stay


def test_record_allow_list_holds_no_date_uid_or_identity_tag():
    """The fields records may keep (--keep-fields) copy only coded, non-patient tags; age becomes a band and the
    institution a salted id, so a header full of identifiers and dates gives none of them; the rest of a record
    is the image (PNG or raw pixels), labels, mask and two salted hashes."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataset import Dataset

    from medtl.data.fields import AGE_BANDS, SAFE_FIELDS, from_dicom
    from medtl.data.records import ALLOWED_FEATURES, FIELD_PREFIX, IMAGE, IMAGE_RAW, KEY, LABELS, MASK, PATIENT

    assert set(ALLOWED_FEATURES) == ({IMAGE, IMAGE_RAW, LABELS, MASK, PATIENT, KEY}
                                     | {FIELD_PREFIX + f for f in SAFE_FIELDS})
    for keyword in ("PatientSex", "ViewPosition", "Modality"):  # copied as they are: code strings
        assert dictionary_VR(tag_for_keyword(keyword)) == "CS", keyword
    ds = Dataset()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.StudyDate = "DOE^JANE", "MRN0012345", "19581107", "20240305"
    ds.InstitutionName, ds.AccessionNumber, ds.StudyInstanceUID = "ST ELSEWHERE CLINIC", "ACC0099887", "1.2.3.4.5.6"
    ds.PatientSex, ds.ViewPosition, ds.Modality, ds.Manufacturer = "F", "PA", "DX", "Acme Imaging"
    salt = b"s" * 32
    values = from_dicom(ds, SAFE_FIELDS, salt)
    assert values["age_band"] == "60-79"  # 65 at the study, from the two dates; neither is kept
    assert values["site"] == from_dicom(ds, ("site",), salt)["site"] != from_dicom(ds, ("site",), b"t" * 32)["site"]
    assert values == {"sex": "F", "age_band": "60-79", "view_position": "PA", "modality": "DX",
                      "manufacturer": "ACME IMAGING", "site": values["site"]} and values["site"].startswith("site-")
    assert re.fullmatch(r"site-[0-9a-f]{10}", values["site"])
    text = " ".join(v for k, v in values.items() if k != "site")
    for planted in ("DOE", "JANE", "MRN0012345", "1958", "20240305", "ELSEWHERE", "ACC0099887", "1.2.3", "65"):
        assert planted not in text, planted
    ds.PatientAge = "089Y"  # the header's own age wins, as a band
    assert from_dicom(ds, ("age_band",), salt) == {"age_band": "80+"} and AGE_BANDS[-1][1] == "80+"


def test_an_unreadable_file_is_quarantined_by_reason_without_its_path():
    """An OS read error's own text quotes the path; the quarantine reason must not. /proc/self/mem exists
    and opens, but reading its first bytes fails with EIO, for root as for anyone (chmod would not stop root)."""
    from medtl.data.decode import to_stored_png

    png, reason, message = to_stored_png("/proc/self/mem", 32, 8, "pad")
    assert png is None and reason == "unreadable_file", (reason, message)
    assert "proc" not in message and "mem" not in message, message
