"""Unlabeled studies (`medtl ingest --unlabeled`): every image under a folder, with its patient.

The patient comes from a --patients CSV (an image and a patient column) when it has the image, else from
the DICOM PatientID. The result is a tables.LabelTable without label names (each study's labels and mask
are empty), so ingest splits it by patient, de-identifies and shards it as it does a labeled table.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from medtl.data import decode, tables
from medtl.errors import MedtlError

IMAGE_KINDS = ("dicom", "png", "jpeg")
# DICOM media files that index a DICOM export and hold no image.
INDEX_FILES = ("DICOMDIR",)
IMAGE_COLUMNS = ("image", "path", "file", "filename", "image index")
PATIENT_COLUMNS = ("patient", "patient_id", "patient id", "patientid")


@dataclass(frozen=True)
class UnlabeledScan:
    table: tables.LabelTable   # label_names (); studies with a patient; rejected: unreadable DICOM headers
    images: int                # image files found under the folder
    skipped: int               # other files found there (not DICOM, PNG or JPEG)
    no_patient: tuple[str, ...] = ()  # images with no patient id (a PNG/JPEG without a --patients row, say)
    unused_rows: tuple[int, ...] = ()  # --patients rows naming no image found (row 1: the header)


def _is_image(path: str, name: str) -> bool:
    """By suffix, or (PACS exports name files by UID or number, without a suffix) by the first bytes."""
    if name.lower().endswith(decode.IMAGE_EXTENSIONS):
        return True
    try:
        return decode.sniff(path) in IMAGE_KINDS
    except OSError:
        return False


def find_images(images: str) -> tuple[list[str], int]:
    """(image paths relative to `images`, sorted; number of other files), searched recursively.
    Hidden files and folders and DICOMDIR index files are not studies."""
    def refuse(exc: OSError):  # the folder's name may be an MRN: name only the --images root
        raise MedtlError(f"a folder under --images {images} cannot be listed ({exc.strerror}); make the "
                         "input tree readable by this user") from None

    found, skipped = [], 0
    for root, dirs, files in os.walk(images, onerror=refuse):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith(".") or name.upper() in INDEX_FILES:
                continue
            path = os.path.join(root, name)
            if _is_image(path, name):
                found.append(os.path.relpath(path, images))
            else:
                skipped += 1
    return sorted(found), skipped


def read_patients(path: str, image_column: str | None, patient_column: str | None) -> dict[str, tuple[int, str]]:
    """{normalised image path: (row, patient)} from a --patients CSV; a row with an empty patient gives none."""
    what = "--patients file"
    columns, rows = tables.read_rows(path, (), "", what, "--patients")
    lowered = {c.lower(): c for c in columns if c}
    image_col = image_column or next((lowered[c] for c in IMAGE_COLUMNS if c in lowered), None)
    patient_col = patient_column or next((lowered[c] for c in PATIENT_COLUMNS if c in lowered), None)
    hint = "Name the columns with --image-column and --patient-column."
    missing = [c for c in (image_col, patient_col) if c is not None and c not in columns]
    if image_col is None or patient_col is None or missing:
        found = ", ".join(repr(c) for c in columns if c) or "no header"
        raise MedtlError(f"{what} {path} needs an image and a patient column; found {found}. {hint}")
    tables.check_unique_images(path, [(row[image_col] or "").strip() for row in rows], what,
                                "list each image once, on the row of its patient")
    out = {}
    for line, row in enumerate(rows, start=2):
        image, patient = (row[image_col] or "").strip(), (row[patient_col] or "").strip()
        if image and patient:
            out[os.path.normpath(image)] = (line, patient)
    return out


def _patient_of(images: str, file: str, given: dict[str, tuple[int, str]]) -> str:
    """The --patients row's patient, else a DICOM's PatientID, else "". Raises decode.DecodeError."""
    row = given.get(os.path.normpath(file))
    if row:
        return row[1]
    path = os.path.join(images, file)
    try:
        kind = decode.sniff(path)
    except OSError:
        kind = "unknown"
    if kind in ("png", "jpeg"):
        return ""
    return decode.dicom_patient_id(path)


def scan(images: str, patients: str | None, image_column: str | None = None,
         patient_column: str | None = None) -> UnlabeledScan:
    """Every image under `images` as a study without labels, with its patient where one is known."""
    files, skipped = find_images(images)
    if not files:
        others = f" ({skipped} other file(s) there)" if skipped else ""
        raise MedtlError(f"no DICOM, PNG or JPEG files under --images {images}{others}; point --images at the "
                         "folder holding the studies")
    given = read_patients(patients, image_column, patient_column) if patients else {}
    studies, rejected, no_patient = [], [], []
    for file in files:
        try:
            patient = _patient_of(images, file, given)
        except decode.DecodeError as exc:  # quarantined as today: the worker's decode would fail the same way
            rejected.append((file, exc.reason, exc.message))
            continue
        if patient:
            studies.append(tables.Study(file, patient, (), ()))
        else:
            no_patient.append(file)
    on_disk = {os.path.normpath(f) for f in files}
    unused = sorted(row for image, (row, _) in given.items() if image not in on_disk)
    table = tables.LabelTable((), tuple(studies), tuple(rejected))
    return UnlabeledScan(table, len(files), skipped, tuple(no_patient), tuple(unused))
