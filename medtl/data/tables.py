"""Label tables in public dataset layouts, read into one list of studies.

  chestxray14  Data_Entry_2017.csv: `Image Index`, `Finding Labels` joined by `|`, `Patient ID`.
  chexpert     train.csv/valid.csv: `Path`, then one column per observation with 1, 0, -1
               (uncertain) or blank. Uncertain follows --uncertain (ones, zeros, ignore);
               ignored and blank entries are masked out of the loss (blank: --blank).
  multihot     any CSV with an image column, an optional patient column and one 0/1
               column per label (blank = unknown, masked).
  medmnist     a MedMNIST .npz (e.g. chestmnist.npz) with its own train/val/test split.
"""
from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field

import numpy as np

from medtl.data import fields as study_fields
from medtl.errors import MedtlError
from medtl.utils.log import log

NO_FINDING = "No Finding"
FORMATS = ("chestxray14", "chexpert", "multihot", "medmnist")
UNCERTAIN_POLICIES = ("ones", "zeros", "ignore")
BLANK_POLICIES = ("mask", "zeros")
CHEXPERT_META = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
# MedMNIST's ChestMNIST label order (ChestX-ray14 findings).
CHESTMNIST_LABELS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                     "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
                     "Hernia")


@dataclass(frozen=True)
class Study:
    # Key of the image: a path relative to the images folder, or "split/index" inside an .npz.
    file: str
    # The patient identifier from the table (hashed before it reaches any output).
    patient: str
    # (num_labels,) 0/1 per label.
    labels: tuple[int, ...]
    # (num_labels,) 1 where the label is known, 0 where it is uncertain or missing.
    mask: tuple[int, ...]
    # A split given by the dataset itself (MedMNIST) or by --split-file; "" to stratify.
    split: str = ""
    # Allow-listed fields from the table (medtl.data.fields: sex, age_band, view_position), if asked for
    # and known; the rest come from the DICOM header, if any.
    fields: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class LabelTable:
    label_names: tuple[str, ...]
    studies: tuple[Study, ...]
    # (file, reason, message) for rows that cannot be used (e.g. unknown label names).
    rejected: tuple[tuple[str, str, str], ...] = ()
    # In-memory images for array formats (MedMNIST), by Study.file.
    arrays: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class TableOptions:
    format: str = "chestxray14"
    # Labels to keep, in this order (default: all the table has).
    label_names: tuple[str, ...] | None = None
    uncertain: str = "ones"
    blank: str = "mask"
    image_column: str | None = None
    patient_column: str | None = None
    # Safe fields to keep from the table (names from medtl.data.fields.SAFE_FIELDS).
    keep_fields: tuple[str, ...] = ()


def read_rows(path: str, required: tuple[str, ...], hint: str,
               what: str = "labels file", option: str = "--labels") -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows) of a CSV; `what` and `option` name it in errors (a labels table, or ingest's --patients)."""
    if os.path.isdir(path):
        raise MedtlError(f"{what} {path} is a folder; pass the CSV file with {option}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c for c in (reader.fieldnames or [])]
            missing = [c for c in required if c not in columns]
            if missing:
                raise MedtlError(
                    f"{what} {path} lacks column(s) {', '.join(repr(c) for c in missing)}; "
                    f"found {', '.join(repr(c) for c in columns if c) or 'no header'}. {hint}"
                )
            return columns, list(reader)
    except FileNotFoundError:
        raise MedtlError(f"{what} {path} does not exist; pass the CSV with {option}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise MedtlError(f"{what} {path} is not a readable UTF-8 CSV ({exc})") from None


def check_unique_images(path: str, files: list[str], what: str = "labels file",
                         fix: str = "list each image once, with all its labels on one row") -> None:
    """files[i] is the image on row i + 2 (row 1: the header). One image on two rows would become two
    records, or two contradicting ones: refused, never de-duplicated behind the user's back."""
    rows: dict[str, list[int]] = {}
    for row, file in enumerate(files, start=2):
        if file:
            rows.setdefault(os.path.normpath(file), []).append(row)
    repeated = [r for r in rows.values() if len(r) > 1]
    if repeated:
        more = f" ({len(repeated) - 1} more image(s) are listed more than once too)" if len(repeated) > 1 else ""
        raise MedtlError(f"{what} {path} lists the same image on rows {', '.join(map(str, repeated[0]))}{more}; "
                         f"{fix}")


def _label_key(name: str) -> str:
    """A label name without case, spaces, underscores or hyphens: names with one key are one label misspelt."""
    return re.sub(r"[\s_\-]+", "", name).casefold()


def _check_spellings(path: str, names: list[tuple[str, str]]) -> None:
    """names: (label name, where it was seen), in file order. Two spellings of one label would become
    two labels, each missing the other's positives, so they are refused."""
    first: dict[str, tuple[str, str]] = {}
    for name, where in names:
        other, other_where = first.setdefault(_label_key(name), (name, where))
        if other != name:
            raise MedtlError(f"labels file {path} spells one label two ways, {other!r} ({other_where}) and {name!r} "
                             f"({where}); labels must match exactly: use one spelling")


def _select(all_names: list[str], wanted: tuple[str, ...] | None, path: str) -> tuple[str, ...]:
    if wanted is None:
        return tuple(all_names)
    unknown = [n for n in wanted if n not in all_names]
    if unknown:
        near = {_label_key(n): n for n in all_names}
        hints = [f"{n!r} differs from {near[_label_key(n)]!r} only by case or spacing" for n in unknown
                 if _label_key(n) in near]
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise MedtlError(f"--label-names {', '.join(unknown)} not in {path}{hint}; it has: {', '.join(all_names)}")
    return tuple(wanted)


def read_chestxray14(path: str, opt: TableOptions) -> LabelTable:
    """Data_Entry_2017.csv. Label names are the sorted findings seen, unless given."""
    _, rows = read_rows(path, ("Image Index", "Finding Labels", "Patient ID"),
                         "Check --format (chestxray14 expects the Data_Entry_2017.csv header).")
    check_unique_images(path, [(row["Image Index"] or "").strip() for row in rows])
    parsed, spellings = [], [(NO_FINDING, "the no-finding marker")]
    for line, row in enumerate(rows, start=2):
        file = (row["Image Index"] or "").strip()
        patient = (row["Patient ID"] or "").strip()
        if not file or not patient:
            raise MedtlError(f"labels file {path} line {line}: empty 'Image Index' or 'Patient ID'")
        findings = [f.strip() for f in (row["Finding Labels"] or "").split("|") if f.strip()]
        spellings += [(f, f"first on row {line}") for f in findings]
        fields = study_fields.from_table(row.get("Patient Gender"), row.get("Patient Age"), row.get("View Position"))
        parsed.append((file, patient, [f for f in findings if f != NO_FINDING], fields))
    _check_spellings(path, [(n, "--label-names") for n in opt.label_names or ()] + spellings)
    label_names = opt.label_names or tuple(sorted({f for _, _, fs, _ in parsed for f in fs}))
    if not label_names:
        raise MedtlError(f"labels file {path} has no findings other than '{NO_FINDING}'")
    index = {name: i for i, name in enumerate(label_names)}
    studies, dropped = [], {}
    for file, patient, findings, fields in parsed:
        vec = [0] * len(label_names)
        for f in findings:
            if f in index:
                vec[index[f]] = 1
            else:  # --label-names leaves it out: the study stays, as a negative for the labels kept
                dropped[f] = dropped.get(f, 0) + 1
        studies.append(Study(file, patient, tuple(vec), (1,) * len(label_names), fields=_kept(fields, opt)))
    if dropped:
        log("ingest: --label-names leaves out " + ", ".join(f"{name} ({count} row(s))" for name, count
                                                            in sorted(dropped.items()))
            + "; those rows are kept, with only the findings listed")
    return LabelTable(tuple(label_names), tuple(studies))


def _kept(fields: dict[str, str], opt: TableOptions) -> tuple[tuple[str, str], ...]:
    """The asked-for fields the row knows (an empty value is left to the DICOM header, if any)."""
    return tuple((k, v) for k, v in fields.items() if k in opt.keep_fields and v)


def _chexpert_patient(path_value: str) -> str:
    match = re.search(r"(patient\d+)", path_value)
    return match.group(1) if match else os.path.dirname(os.path.dirname(path_value)) or path_value


def read_chexpert(path: str, opt: TableOptions) -> LabelTable:
    """CheXpert train.csv / valid.csv, with the uncertainty and blank policies."""
    columns, rows = read_rows(path, ("Path",), "Check --format (chexpert expects CheXpert's train.csv header).")
    _check_spellings(path, [(c, f"column {i}") for i, c in enumerate(columns, start=1) if c])
    check_unique_images(path, [(row["Path"] or "").strip() for row in rows])
    available = [c for c in columns if c and c not in CHEXPERT_META]
    label_names = _select(available, opt.label_names, path)
    if not label_names:
        raise MedtlError(f"labels file {path} has no observation columns after {', '.join(CHEXPERT_META)}")
    studies, rejected = [], []
    for row in rows:
        file = (row["Path"] or "").strip()
        vec, mask, bad = [], [], []
        for name in label_names:
            raw = (row.get(name) or "").strip()
            try:
                value = float(raw) if raw else None
            except ValueError:
                value = float("nan")
            if value is None:
                vec.append(0)
                mask.append(0 if opt.blank == "mask" else 1)
            elif value == 1.0 or value == 0.0:
                vec.append(int(value))
                mask.append(1)
            elif value == -1.0:
                vec.append(1 if opt.uncertain == "ones" else 0)
                mask.append(0 if opt.uncertain == "ignore" else 1)
            else:
                bad.append(f"{name}={raw!r}")
        if bad:
            rejected.append((file, "bad_label_value", f"values must be 1, 0, -1 or blank: {', '.join(bad)}"))
            continue
        # Laterals have no AP/PA: their view is the Frontal/Lateral column's.
        lateral = (row.get("Frontal/Lateral") or "").strip().lower() == "lateral"
        fields = study_fields.from_table(row.get("Sex"), row.get("Age"), "LATERAL" if lateral else row.get("AP/PA"))
        studies.append(Study(file, _chexpert_patient(file), tuple(vec), tuple(mask), fields=_kept(fields, opt)))
    return LabelTable(label_names, tuple(studies), tuple(rejected))


def read_multihot(path: str, opt: TableOptions) -> LabelTable:
    """A generic CSV: an image column, an optional patient column, one 0/1 column per label."""
    with open(path, newline="", encoding="utf-8-sig") if os.path.isfile(path) else _missing(path) as fh:
        columns = next(csv.reader(fh), [])
    image_col = opt.image_column or next((c for c in columns if c.lower() in
                                          ("image", "path", "file", "filename", "image index")), None)
    if image_col is None:
        raise MedtlError(f"labels file {path}: no image column found among {', '.join(columns)}; "
                         "name it with --image-column")
    patient_col = opt.patient_column or next((c for c in columns if c.lower() in
                                              ("patient", "patient_id", "patient id", "patientid")), None)
    required = (image_col,) + ((patient_col,) if opt.patient_column else ())
    _, rows = read_rows(path, required, "Check --image-column / --patient-column.")
    _check_spellings(path, [(c, f"column {i}") for i, c in enumerate(columns, start=1) if c])
    check_unique_images(path, [(row[image_col] or "").strip() for row in rows])
    available = [c for c in columns if c and c not in (image_col, patient_col)]
    label_names = _select(available, opt.label_names, path)
    if not label_names:
        raise MedtlError(f"labels file {path} has no label columns besides {image_col!r}")
    if patient_col is None:
        from medtl.utils.log import log

        log(f"warning: {path} has no patient column; every image counts as its own patient, so images "
            "of one patient may land in different splits. Name the column with --patient-column.")
    studies, rejected = [], []
    for row in rows:
        file = (row[image_col] or "").strip()
        vec, mask, bad = [], [], []
        for name in label_names:
            raw = (row.get(name) or "").strip()
            if raw in ("1", "1.0"):
                vec.append(1), mask.append(1)
            elif raw in ("0", "0.0"):
                vec.append(0), mask.append(1)
            elif raw == "":
                vec.append(0), mask.append(0)
            else:
                bad.append(f"{name}={raw!r}")
        if bad:
            rejected.append((file, "bad_label_value", f"values must be 0, 1 or blank: {', '.join(bad)}"))
            continue
        patient = (row[patient_col] or "").strip() if patient_col else file
        studies.append(Study(file, patient or file, tuple(vec), tuple(mask)))
    return LabelTable(label_names, tuple(studies), tuple(rejected))


def _missing(path):
    raise MedtlError(f"labels file {path} does not exist; pass the CSV with --labels")


def read_medmnist(npz_path: str, opt: TableOptions) -> LabelTable:
    """A MedMNIST .npz: {train,val,test}_{images,labels}. Multi-label (ChestMNIST) or one-hot classes."""
    try:
        data = np.load(npz_path)
    except FileNotFoundError:
        raise MedtlError(f"MedMNIST file {npz_path} does not exist; pass the .npz with --images") from None
    except (ValueError, OSError) as exc:
        raise MedtlError(f"{npz_path} is not a readable .npz file ({str(exc)[:100]})") from None
    splits = [s for s in ("train", "val", "test") if f"{s}_images" in data and f"{s}_labels" in data]
    if not splits:
        raise MedtlError(f"{npz_path} has none of train_images/train_labels, val_..., test_...; "
                         f"keys are: {', '.join(data.files)}")
    first = data[f"{splits[0]}_labels"]
    multilabel = first.ndim == 2 and first.shape[1] > 1
    if multilabel:
        width = first.shape[1]
        default = CHESTMNIST_LABELS if width == len(CHESTMNIST_LABELS) else tuple(f"label_{i}" for i in range(width))
    else:
        width = int(max(int(np.max(data[f"{s}_labels"])) for s in splits)) + 1
        default = tuple(f"class_{i}" for i in range(width))
    names = opt.label_names or default
    if len(names) != width:
        raise MedtlError(f"--label-names gives {len(names)} names but {npz_path} has {width} labels")
    studies, arrays = [], {}
    for split in splits:
        images, labels = data[f"{split}_images"], data[f"{split}_labels"]
        if len(images) != len(labels):
            raise MedtlError(f"{npz_path}: {split}_images has {len(images)} rows but {split}_labels {len(labels)}")
        for i in range(len(images)):
            if multilabel:
                vec = tuple(int(v) for v in labels[i])
            else:
                vec = tuple(int(c == int(np.ravel(labels[i])[0])) for c in range(width))
            key = f"{split}/{i:06d}"
            arrays[key] = images[i]
            # MedMNIST ships no patient IDs; its own splits are already patient-disjoint.
            studies.append(Study(key, key, vec, (1,) * width, split=split))
    return LabelTable(tuple(names), tuple(studies), (), arrays)


def read_table(path: str | None, images: str, opt: TableOptions) -> LabelTable:
    if opt.format not in FORMATS:
        raise MedtlError(f"unknown --format {opt.format!r}; choose one of: {', '.join(FORMATS)}")
    if opt.uncertain not in UNCERTAIN_POLICIES:
        raise MedtlError(f"--uncertain must be one of {', '.join(UNCERTAIN_POLICIES)}, got {opt.uncertain!r}")
    if opt.format == "medmnist":
        return read_medmnist(images, opt)
    if not path:
        raise MedtlError(f"--format {opt.format} needs the labels table: pass --labels CSV")
    reader = {"chestxray14": read_chestxray14, "chexpert": read_chexpert, "multihot": read_multihot}[opt.format]
    return reader(path, opt)


def read_split_file(path: str) -> dict[str, str]:
    """A user-provided split list: CSV with columns (patient or file) and split (train/val/test)."""
    columns, rows = read_rows(path, ("split",), "A split file needs a 'split' column and 'patient' or 'file'.")
    key = "patient" if "patient" in columns else "file" if "file" in columns else None
    if key is None:
        raise MedtlError(f"split file {path} needs a 'patient' or 'file' column next to 'split'")
    out = {}
    for line, row in enumerate(rows, start=2):
        split = (row["split"] or "").strip()
        if split not in ("train", "val", "test"):
            raise MedtlError(f"split file {path} line {line}: split must be train, val or test, got {split!r}")
        out[f"{key}:{(row[key] or '').strip()}"] = split
    return out
