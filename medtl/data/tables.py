"""Label tables in public dataset layouts, read into one list of studies.

`chestxray14`: Data_Entry_2017.csv (`Image Index`, `Finding Labels` joined by
`|`, `Patient ID`).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass

from medtl.errors import MedtlError

NO_FINDING = "No Finding"
FORMATS = ("chestxray14",)


@dataclass(frozen=True)
class Study:
    # Path of the image file relative to the images folder (never written to shards).
    file: str
    # The patient identifier from the table (hashed before it reaches any output).
    patient: str
    # (num_labels,) 0/1 per label.
    labels: tuple[int, ...]
    # (num_labels,) 1 where the label is known, 0 where it is uncertain or missing.
    mask: tuple[int, ...]


@dataclass(frozen=True)
class LabelTable:
    label_names: tuple[str, ...]
    studies: tuple[Study, ...]
    # (file, reason, message) for rows that cannot be used (e.g. unknown label names).
    rejected: tuple[tuple[str, str, str], ...] = ()


def _read_rows(path: str, required: tuple[str, ...]) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = reader.fieldnames or []
            missing = [c for c in required if c not in columns]
            if missing:
                raise MedtlError(
                    f"labels file {path} lacks column(s) {', '.join(repr(c) for c in missing)}; "
                    f"found {', '.join(repr(c) for c in columns if c) or 'no header'}. "
                    "Check --format (chestxray14 expects the Data_Entry_2017.csv header)."
                )
            return list(reader)
    except FileNotFoundError:
        raise MedtlError(f"labels file {path} does not exist; pass the CSV with --labels") from None
    except UnicodeDecodeError:
        raise MedtlError(f"labels file {path} is not UTF-8 text; is it really a CSV?") from None


def read_chestxray14(path: str, label_names: tuple[str, ...] | None = None) -> LabelTable:
    """Data_Entry_2017.csv. Label names are the sorted findings seen, unless given."""
    rows = _read_rows(path, ("Image Index", "Finding Labels", "Patient ID"))
    parsed = []
    for line, row in enumerate(rows, start=2):
        file = (row["Image Index"] or "").strip()
        patient = (row["Patient ID"] or "").strip()
        if not file or not patient:
            raise MedtlError(f"labels file {path} line {line}: empty 'Image Index' or 'Patient ID'")
        findings = [f.strip() for f in (row["Finding Labels"] or "").split("|") if f.strip()]
        parsed.append((file, patient, [f for f in findings if f != NO_FINDING]))
    if label_names is None:
        label_names = tuple(sorted({f for _, _, fs in parsed for f in fs}))
    if not label_names:
        raise MedtlError(f"labels file {path} has no findings other than '{NO_FINDING}'")
    index = {name: i for i, name in enumerate(label_names)}
    studies, rejected = [], []
    for file, patient, findings in parsed:
        unknown = [f for f in findings if f not in index]
        if unknown:
            rejected.append((file, "unknown_label", f"label(s) not in the label list: {', '.join(unknown)}"))
            continue
        vec = [0] * len(label_names)
        for f in findings:
            vec[index[f]] = 1
        studies.append(Study(file, patient, tuple(vec), (1,) * len(label_names)))
    return LabelTable(tuple(label_names), tuple(studies), tuple(rejected))


def read_table(path: str, fmt: str, label_names: tuple[str, ...] | None = None) -> LabelTable:
    if fmt == "chestxray14":
        return read_chestxray14(path, label_names)
    raise MedtlError(f"unknown --format {fmt!r}; choose one of: {', '.join(FORMATS)}")
