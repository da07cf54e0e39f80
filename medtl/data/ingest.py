"""Ingest: study files + a labels table -> de-identified, patient-split, sharded TFRecords.

With --unlabeled there is no table: every image under --images becomes a study without labels, its
patient taken from a --patients CSV or the DICOM PatientID (medtl.data.unlabeled).

Outputs in the records folder (local path, s3:// or gs://):
  {train,val,test}-NNNNN-of-MMMMM.tfrecord   shards
  manifest.json                              labels, counts, prevalence, shard sizes and SHA-256
  quarantine.csv                             every input that could not be used, with a reason

No name from the input (file or folder) leaves it: quarantine rows, part files and log
lines name a study by its salted id, the records' key hash. Only --private-map PATH, a
file the user names outside the records, maps the ids back to input paths.

Every ingest runs as k worker parts (k=1 locally; k pods in a Kubernetes Indexed
Job with --worker-index/--num-workers) and a finalize step. Parts write shards
under .parts/ with temporary names; finalize gives them their final names and
writes the manifest last, so a killed ingest never leaves a partial shard under
a final name, and a folder without manifest.json is never mistaken for records.
"""
from __future__ import annotations

import concurrent.futures as futures
import contextlib
import csv
import io
import json
import multiprocessing
import os
import re
from dataclasses import dataclass

import numpy as np

import medtl
from medtl.data import decode, deid, privatemap, splits, tables, unlabeled
from medtl.data.fields import SAFE_FIELDS, SITE_LABEL
from medtl.data.manifest import (MANIFEST_FILE, PARTS_DIR, Manifest, Shard, SplitInfo, read_manifest, remove_manifest,
                                 write_manifest)
from medtl.errors import MedtlError
from medtl.utils import faults, fs
from medtl.utils.log import debug, log
from medtl.utils.progress import Progress

SPLITS = ("train", "val", "test")
QUARANTINE = "quarantine.csv"
FINAL_SHARD = re.compile(r"^(train|val|test)-\d{5}-of-\d{5}\.tfrecord$")
# In .parts/ once the manifest is written and checked: the parts are only being removed.
FINALIZED = "FINALIZED"


@dataclass(frozen=True)
class IngestOptions:
    images: str
    labels: str | None
    out: str
    format: str = "chestxray14"
    image_size: int = 512
    bit_depth: int = 16
    aspect: str = "pad"
    frame: str = "middle"
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0
    shard_mb: float = 150.0
    workers: int = 1
    max_bad_fraction: float = 0.01
    salt_file: str | None = None
    label_names: tuple[str, ...] | None = None
    uncertain: str = "ones"
    blank: str = "mask"
    image_column: str | None = None
    patient_column: str | None = None
    split_file: str | None = None
    keep_fields: tuple[str, ...] = ()
    progress: bool = True
    # Where to write the map from salted study id back to input path (never inside the records).
    private_map: str | None = None
    # Keep DICOM files whose BurnedInAnnotation is YES (quarantined otherwise).
    allow_burned_in: bool = False
    # No labels table: every image under `images` is a study without labels (for self-supervised pretraining).
    unlabeled: bool = False
    # With `unlabeled`: a CSV naming each image's patient (image_column, patient_column); else DICOM PatientID.
    patients: str | None = None
    # How shards store each image (decode.ENCODINGS): png (smaller, decoded every epoch) or raw pixels.
    encoding: str = "png"
    # A site label stored as every study's `site` field (implies keeping it); else DICOM InstitutionName, salted.
    site: str | None = None

    @property
    def kept_fields(self) -> tuple[str, ...]:
        """The fields every record carries (medtl.data.fields), in allow-list order."""
        asked = set(self.keep_fields) | ({"site"} if self.site else set())
        return tuple(f for f in SAFE_FIELDS if f in asked)


# ----------------------------------------------------------------------------- decoding (worker processes)


def _decode_one(job: tuple) -> tuple[bytes | None, dict, str, str]:
    """(stored image bytes, fields, reason, message) for one study; runs in worker processes, so no TensorFlow here."""
    source, size, bit_depth, aspect, frame, field_names, allow_burned_in, encoding, salt = job
    image, reason, message = decode.to_stored(source, size, bit_depth, aspect, frame, allow_burned_in, encoding)
    fields = {}
    if image is not None and field_names and not isinstance(source, np.ndarray) and decode.sniff(source) == "dicom":
        fields = decode.dicom_fields(source, field_names, salt)
    return image, fields, reason, message


class _Pool:
    """Local decode processes (spawned: no TensorFlow state is forked). Order is preserved."""

    def __init__(self, workers: int):
        self.workers = workers
        self.executor = None

    def __enter__(self):
        if self.workers > 1:
            self.executor = futures.ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self

    def map(self, jobs):
        if self.executor is None:
            return map(_decode_one, jobs)
        return self.executor.map(_decode_one, jobs, chunksize=4)

    def __exit__(self, *exc):
        if self.executor is not None:
            self.executor.shutdown(cancel_futures=True)
        return False


# ----------------------------------------------------------------------------- shards


class _ShardWriter:
    """Records of one split into shards of about `target_bytes`: written as .tmp, renamed when closed."""

    def __init__(self, folder: str, split: str, target_bytes: int):
        self.folder, self.split, self.target = folder, split, target_bytes
        self.shards: list[dict] = []
        self._writer = None
        self._renamer = contextlib.ExitStack()  # gives the open shard its name when closed
        self._count = self._bytes = 0

    def _path(self, index: int) -> str:
        return fs.join(self.folder, f"{self.split}-{index:05d}.tfrecord")

    def write(self, record: bytes) -> None:
        from medtl.tf import tf

        if self._writer is None:
            tmp = self._renamer.enter_context(fs.atomic_path(self._path(len(self.shards))))
            self._writer = tf.io.TFRecordWriter(tmp)
            self._count = self._bytes = 0
        self._writer.write(record)
        self._count += 1
        self._bytes += len(record) + 16  # TFRecord framing: length, two CRCs
        if self._bytes >= self.target:
            self._close()

    def _close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        self._renamer.close()
        path = self._path(len(self.shards))
        self.shards.append({"part_file": os.path.basename(path), "records": self._count,
                            "bytes": fs.size(path), "sha256": fs.sha256(path)})
        # The shard's own name only: the folder is the user's --out, already named once at the start.
        debug(f"ingest: wrote shard {os.path.basename(path)} ({self._count} records, "
              f"{self.shards[-1]['bytes']} bytes, sha256 {self.shards[-1]['sha256'][:16]})")

    def finish(self) -> list[dict]:
        self._close()
        return self.shards


# ----------------------------------------------------------------------------- planning


def _check_unlabeled_options(opt: IngestOptions) -> None:
    if opt.unlabeled and opt.labels:
        raise MedtlError(f"--unlabeled ingests images without a labels table, but --labels {opt.labels} was given "
                         "too; drop --labels for unlabeled records, or --unlabeled to ingest the labels")
    if opt.unlabeled and opt.format == "medmnist":
        raise MedtlError("--unlabeled reads a folder of DICOM/PNG/JPEG files, not a MedMNIST .npz; drop "
                         "--format medmnist")
    if opt.patients and not opt.unlabeled:
        raise MedtlError(f"--patients {opt.patients} goes with --unlabeled; a labels table names each image's "
                         "patient itself (--patient-column)")


def _check_options(opt: IngestOptions) -> None:
    _check_unlabeled_options(opt)
    if opt.format == "medmnist" and not opt.unlabeled:
        if not os.path.isfile(opt.images):
            raise MedtlError(f"MedMNIST file {opt.images} does not exist; pass the .npz file with --images")
    elif not os.path.isdir(opt.images):
        raise MedtlError(f"images folder {opt.images} does not exist; pass the folder holding the studies with --images")
    _check_out_outside_input(opt)
    if opt.private_map:
        privatemap.check_location(opt.private_map, opt.out, opt.images)
    if opt.bit_depth not in (8, 16):
        raise MedtlError(f"--bit-depth must be 8 or 16, got {opt.bit_depth}")
    if opt.encoding not in decode.ENCODINGS:
        raise MedtlError(f"--encoding must be one of {', '.join(decode.ENCODINGS)}, got {opt.encoding}")
    if opt.image_size < 32:
        raise MedtlError(f"--image-size must be >= 32, got {opt.image_size}")
    if opt.aspect not in decode.ASPECT_POLICIES:
        raise MedtlError(f"--aspect must be one of {', '.join(decode.ASPECT_POLICIES)}, got {opt.aspect}")
    if opt.frame not in decode.FRAME_POLICIES:
        raise MedtlError(f"--frame must be one of {', '.join(decode.FRAME_POLICIES)}, got {opt.frame}")
    if opt.blank not in tables.BLANK_POLICIES:
        raise MedtlError(f"--blank must be one of {', '.join(tables.BLANK_POLICIES)}, got {opt.blank}")
    unknown = [f for f in opt.keep_fields if f not in SAFE_FIELDS]
    if unknown:
        raise MedtlError(f"--keep-fields {', '.join(unknown)} not allowed; safe fields are: "
                         f"{', '.join(SAFE_FIELDS)}")
    if opt.site is not None and not SITE_LABEL.match(opt.site):
        raise MedtlError(f"--site {opt.site!r} must be 1-32 letters, digits, '.', '_' or '-' (it is stored in clear "
                         "in every record: a neutral label such as site-a, not the hospital's name)")
    if not 0 <= opt.max_bad_fraction <= 1:
        raise MedtlError(f"--max-bad-fraction must be in [0, 1], got {opt.max_bad_fraction}")
    if opt.workers < 1:
        raise MedtlError(f"--workers must be >= 1, got {opt.workers}")
    if opt.shard_mb <= 0:
        raise MedtlError(f"--shard-mb must be > 0, got {opt.shard_mb}")


def _check_out_outside_input(opt: IngestOptions) -> None:
    """Studies are read-only input: records are never written into (or over) the input folder."""
    if fs.is_remote(opt.out):
        return
    # A folder of studies, or one file (a MedMNIST .npz): records may sit beside the file, not over it.
    images = os.path.realpath(opt.images)
    out = os.path.realpath(opt.out)
    if out == images or (os.path.isdir(images) and out.startswith(images + os.sep)):
        raise MedtlError(f"--out {opt.out} is inside the input folder {images}; input studies are "
                         "read-only to medtl: write the records to a folder outside it")


def _files_on_disk(images: str, listed: set[str]) -> set[str]:
    """Image files in the folders the table points into (so CheXpert's valid/ is not 'extra' for train.csv)."""
    folders = {os.path.dirname(f) for f in listed}
    found = set()
    for folder in folders:
        full = os.path.join(images, folder)
        if not os.path.isdir(full):
            continue
        try:
            names = os.listdir(full)
        except OSError as exc:  # the folder's name may be an MRN: name only the --images root
            raise MedtlError(f"a folder under --images {images} cannot be listed ({exc.strerror}); make the "
                             "input tree readable by this user") from None
        for name in names:
            if name.lower().endswith(decode.IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(full, name)):
                found.add(os.path.join(folder, name) if folder else name)
    return found


def _table_options(opt: IngestOptions) -> tables.TableOptions:
    return tables.TableOptions(format=opt.format, label_names=opt.label_names, uncertain=opt.uncertain,
                               blank=opt.blank, image_column=opt.image_column, patient_column=opt.patient_column,
                               keep_fields=opt.keep_fields)


def _assign_splits(table: tables.LabelTable, opt: IngestOptions) -> tuple[dict[str, str], list]:
    """{study file: split}, plus quarantine rows for studies a split file does not mention."""
    rejected = []
    if opt.split_file:
        given = tables.read_split_file(opt.split_file)
        out = {}
        for s in table.studies:
            split = given.get(f"patient:{s.patient}") or given.get(f"file:{s.file}")
            if split is None:
                rejected.append((s.file, "not_in_split_file", "not listed in the split file"))
            else:
                out[s.file] = split
        _check_patient_disjoint(table, out, deid.load_salt(opt.salt_file))
        return out, rejected
    if all(s.split for s in table.studies):
        return {s.file: s.split for s in table.studies}, rejected
    union: dict[str, np.ndarray] = {}
    for s in table.studies:
        union.setdefault(s.patient, np.zeros(len(table.label_names), int))
        union[s.patient] |= np.array(s.labels, int) * np.array(s.mask, int)
    by_patient = splits.split_patients(union, opt.val_fraction, opt.test_fraction, opt.seed)
    return {s.file: by_patient[s.patient] for s in table.studies}, rejected


def _check_patient_disjoint(table: tables.LabelTable, assignment: dict[str, str], salt: bytes) -> None:
    seen: dict[str, tuple[str, str]] = {}
    for s in table.studies:
        split = assignment.get(s.file)
        if split is None:
            continue
        if s.patient in seen and seen[s.patient][1] != split:
            other = seen[s.patient][0]
            raise MedtlError(f"split file puts study {_study_id(salt, other)} in {seen[s.patient][1]} and study "
                             f"{_study_id(salt, s.file)} in {split}, but they belong to the same patient; assign "
                             "splits per patient (--private-map PATH names the files behind study ids)")
        seen.setdefault(s.patient, (s.file, split))


@dataclass
class _Plan:
    table: tables.LabelTable
    order: dict[str, list]          # split -> studies, seeded order
    table_rejects: list             # (file, reason, message) decided before decoding


def _read_unlabeled(opt: IngestOptions) -> tables.LabelTable:
    """The studies of an --unlabeled ingest; refused when an image has no patient (every image its own
    patient would put one patient's images in several splits)."""
    found = unlabeled.scan(opt.images, opt.patients, opt.image_column, opt.patient_column)
    if found.skipped:
        log(f"ingest: {found.skipped} file(s) under --images are not DICOM, PNG or JPEG files and are not ingested")
    if found.unused_rows:
        log(f"warning: --patients {opt.patients}: {len(found.unused_rows)} row(s) name no image found under --images "
            f"(first: row {found.unused_rows[0]}); they are ignored")
    if found.no_patient:
        salt = deid.load_salt(opt.salt_file)
        first = _study_id(salt, found.no_patient[0])
        if opt.private_map:  # the one way from the id to the file; written now, as no finalize will run
            _write_private_map(opt)
        where = (f" (the private map {opt.private_map} names its file)" if opt.private_map
                 else " (--private-map PATH writes a file naming it)")
        count = f"{len(found.no_patient)} of {found.images} images under --images {opt.images}"
        if opt.patients:
            raise MedtlError(f"--patients {opt.patients} has no row with a patient for {count}, and they carry no "
                             f"DICOM PatientID; first: study {first}{where}. Add a row for each image")
        raise MedtlError(f"{count} have no patient id (PNG and JPEG files carry none; a DICOM's PatientID can be "
                         f"empty); first: study {first}{where}. Pass --patients CSV with an image and a patient "
                         "column, so that each patient's images stay in one split")
    return found.table


def _plan(opt: IngestOptions) -> _Plan:
    """Everything every worker computes identically: the table, the split and the record order."""
    table = _read_unlabeled(opt) if opt.unlabeled else tables.read_table(opt.labels, opt.images, _table_options(opt))
    rejects = list(table.rejected)
    assignment, split_rejects = _assign_splits(table, opt)
    rejects += split_rejects
    if opt.format != "medmnist" and not opt.unlabeled:
        listed = {s.file for s in table.studies} | {f for f, _, _ in table.rejected}
        for extra in sorted(_files_on_disk(opt.images, listed) - listed):
            rejects.append((extra, "not_in_labels", "image file on disk but not in the labels table"))
    order = {split: [] for split in SPLITS}
    for s in sorted(table.studies, key=lambda s: s.file):
        if s.file in assignment:
            order[assignment[s.file]].append(s)
    rng = np.random.default_rng(opt.seed)
    for split in SPLITS:  # seeded record order, so shards are already mixed for streaming
        rng.shuffle(order[split])
    return _Plan(table, order, rejects)


# ----------------------------------------------------------------------------- names outside the input


def _study_id(salt: bytes, file: str) -> str:
    """A study's only name outside the input: the salted key hash its record carries."""
    return deid.salted_hash(salt, file)


def _quarantine_row(salt: bytes, opt: IngestOptions, file: str, reason: str, message: str) -> tuple[str, str, str]:
    """(study id, reason, message), the message cleared of the names in the study's path."""
    return _study_id(salt, file), reason, deid.redact(message, file, opt.images)


def _write_private_map(opt: IngestOptions) -> None:
    """Study id -> input path for every input this ingest considered, into the file the user named.
    Recomputed from the inputs here, at finalize, because no part file may hold a path."""
    if not opt.private_map:
        return
    salt = deid.load_salt(opt.salt_file)
    if opt.unlabeled:
        files = set(unlabeled.find_images(opt.images)[0])
    else:
        table = tables.read_table(opt.labels, opt.images, _table_options(opt))
        files = {s.file for s in table.studies} | {f for f, _, _ in table.rejected}
        if opt.format != "medmnist":
            files |= _files_on_disk(opt.images, files)
    rows = {_study_id(salt, f): f if opt.format == "medmnist" else os.path.join(opt.images, f) for f in files}
    privatemap.write_private_map(opt.private_map, rows)
    log(f"ingest: private map of {len(rows)} study ids -> {opt.private_map} (it names input files: keep it private)")


# ----------------------------------------------------------------------------- kept fields


def _header_fields(opt: IngestOptions, study: tables.Study) -> tuple[str, ...]:
    """The kept fields the DICOM header is read for: those the table did not give (and no --site)."""
    given = dict(study.fields)
    return tuple(f for f in opt.kept_fields if f not in given and not (f == "site" and opt.site))


def _record_fields(opt: IngestOptions, study: tables.Study, header: dict[str, str]) -> dict[str, str]:
    """Every kept field of a record: the table's, else the header's, else "" (unknown)."""
    out = {name: "" for name in opt.kept_fields}
    out.update(header)
    out.update({k: v for k, v in study.fields if k in out})
    if opt.site:
        out["site"] = opt.site
    return out


class _FieldCounts:
    """Per kept field and value: records and patients of one split in this part (a patient is in one part)."""

    def __init__(self, names: tuple[str, ...]):
        self.records = {name: {} for name in names}
        self.patients = {name: {} for name in names}

    def add(self, values: dict[str, str], patient: str) -> None:
        for name, value in values.items():
            self.records[name][value] = self.records[name].get(value, 0) + 1
            self.patients[name].setdefault(value, set()).add(patient)

    def to_dict(self) -> dict:
        return {name: {value: [count, len(self.patients[name][value])] for value, count in sorted(values.items())}
                for name, values in self.records.items()}


def _merge_field_counts(parts: list[dict], split: str) -> dict:
    """{field: {value: {"records", "patients"}}} over the parts (patients add up: each is in one part)."""
    merged: dict = {}
    for p in parts:
        for name, values in p["splits"][split].get("field_counts", {}).items():
            for value, (records, patients) in values.items():
                entry = merged.setdefault(name, {}).setdefault(value, {"records": 0, "patients": 0})
                entry["records"] += records
                entry["patients"] += patients
    return {name: dict(sorted(values.items())) for name, values in sorted(merged.items())}


# ----------------------------------------------------------------------------- one worker's part


def _part_dir(out: str, worker_index: int, num_workers: int) -> str:
    return fs.join(out, PARTS_DIR, f"worker-{worker_index:05d}-of-{num_workers:05d}")


def ingest_part(opt: IngestOptions, worker_index: int = 0, num_workers: int = 1) -> dict:
    """Decode and write this worker's patients (every num_workers-th, in sorted patient order)."""
    if not 0 <= worker_index < num_workers:
        raise MedtlError(f"--worker-index must be in [0, {num_workers}), got {worker_index}")
    _check_options(opt)
    plan = _plan(opt)
    salt = deid.load_salt(opt.salt_file)
    names = plan.table.label_names
    patients = sorted({s.patient for studies in plan.order.values() for s in studies})
    mine = {p for i, p in enumerate(patients) if i % num_workers == worker_index}
    folder = _part_dir(opt.out, worker_index, num_workers)
    fs.remove(folder)  # a re-run starts this part from scratch
    fs.remove(fs.join(opt.out, PARTS_DIR, FINALIZED))  # a new ingest: an earlier finalize's leftovers are stale
    fs.makedirs(folder)
    from medtl.data.records import encode_example

    quarantine = [_quarantine_row(salt, opt, *row) for row in plan.table_rejects] if worker_index == 0 else []
    part = {"worker_index": worker_index, "num_workers": num_workers, "labels": list(names), "splits": {},
            "unlabeled": opt.unlabeled, "stored": _stored_form(opt)}
    total = sum(sum(1 for s in v if s.patient in mine) for v in plan.order.values())
    target = int(opt.shard_mb * 1024 * 1024)
    where = f" (worker {worker_index + 1}/{num_workers})" if num_workers > 1 else ""
    log(f"ingest{where}: {total} images of {len(mine)} patients, {len(names)} labels -> {opt.out} "
        f"({opt.image_size} px, {opt.bit_depth}-bit {opt.encoding})")
    with Progress(total, "ingest", enabled=opt.progress) as bar, _Pool(opt.workers) as pool:
        for split in SPLITS:
            studies = [s for s in plan.order[split] if s.patient in mine]
            writer = _ShardWriter(folder, split, target)
            jobs = [(plan.table.arrays[s.file] if plan.table.arrays else os.path.join(opt.images, s.file),
                     opt.image_size, opt.bit_depth, opt.aspect, opt.frame, _header_fields(opt, s),
                     opt.allow_burned_in, opt.encoding, salt)
                    for s in studies]
            positives, known = np.zeros(len(names), int), np.zeros(len(names), int)
            patients_written = set()
            counts = _FieldCounts(opt.kept_fields)
            for study, (image, fields, reason, message) in zip(studies, pool.map(jobs)):
                bar(1)
                if image is None:
                    quarantine.append(_quarantine_row(salt, opt, study.file, reason, message))
                    debug(f"ingest: quarantined study {quarantine[-1][0]}: {reason}: {quarantine[-1][2]}")
                    continue
                key = _study_id(salt, study.file)
                debug(f"ingest: study {key} -> {split}")
                keep = _record_fields(opt, study, fields)
                writer.write(encode_example(image, study.labels, study.mask, deid.salted_hash(salt, study.patient),
                                            key, keep, opt.encoding))
                positives += np.array(study.labels, int) * np.array(study.mask, int)
                known += np.array(study.mask, int)
                patients_written.add(study.patient)
                counts.add(keep, study.patient)
            shards = writer.finish()
            part["splits"][split] = {"records": sum(s["records"] for s in shards), "shards": shards,
                                     "patients": len(patients_written), "positives": positives.tolist(),
                                     "known": known.tolist(), "field_counts": counts.to_dict()}
    part["considered"] = total + (len(plan.table_rejects) if worker_index == 0 else 0)
    part["quarantine"] = sorted(quarantine)
    fs.write_text_atomic(fs.join(folder, "part.json"), json.dumps(part, sort_keys=True))
    return part


# ----------------------------------------------------------------------------- finalize


def finalize(opt: IngestOptions, num_workers: int) -> Manifest:
    """Merge the k parts: final shard names, manifest.json (written last) and quarantine.csv.

    Idempotent: a finalize killed at any point re-runs with the same options to the same bytes. Shards
    already moved are recognised by their SHA-256, and the parts are removed only after a FINALIZED
    marker says the manifest is complete and its checks passed."""
    if _cleanup_pending(opt.out):
        _remove_parts(opt.out)
        log(f"ingest: {opt.out} was already finalized; removed the parts an interrupted finalize left")
        return read_manifest(opt.out, unlabeled_ok=True)
    if opt.private_map:
        privatemap.check_location(opt.private_map, opt.out, opt.images)
    parts = _read_parts(opt.out, num_workers)
    labels = parts[0]["labels"]
    if any(p["labels"] != labels for p in parts):
        raise MedtlError(f"ingest parts in {opt.out} disagree on the label list; re-run all workers with the same inputs")
    if any(p.get("unlabeled", False) != opt.unlabeled for p in parts):
        given = "with" if opt.unlabeled else "without"
        raise MedtlError(f"ingest parts in {opt.out} were not written {given} --unlabeled; pass the workers' options to "
                         "`medtl ingest-finalize`")
    _check_stored_form(opt, parts)
    remove_manifest(opt.out)  # no manifest while shards are being renamed
    manifest_splits = {}
    final_names = set()
    renamed = 0
    for split in SPLITS:
        shards = [(p, s) for p in parts for s in p["splits"][split]["shards"]]
        entries = []
        from medtl.data.records import shard_name

        for i, (p, shard) in enumerate(shards):
            faults.in_finalize("kill_in_finalize", renamed)
            name = shard_name(split, i, len(shards))
            _move_shard(opt.out, p, shard, name, num_workers)
            renamed += 1
            final_names.add(name)
            entries.append(Shard(file=name, records=shard["records"], bytes=shard["bytes"], sha256=shard["sha256"]))
        positives = np.sum([p["splits"][split]["positives"] for p in parts], axis=0)
        known = np.sum([p["splits"][split]["known"] for p in parts], axis=0)
        records = sum(e.records for e in entries)
        manifest_splits[split] = SplitInfo(
            records=records,
            patients=sum(p["splits"][split]["patients"] for p in parts),
            positives=dict(zip(labels, map(int, positives))),
            masked={n: records - int(k) for n, k in zip(labels, known)},
            prevalence={n: round(int(pos) / int(k), 6) if k else None for n, pos, k in zip(labels, positives, known)},
            shards=tuple(entries),
            field_counts=_merge_field_counts(parts, split),
        )
    for stale in fs.listdir(opt.out):  # shards of an earlier ingest that this one does not list
        if FINAL_SHARD.match(stale) and stale not in final_names:
            fs.remove(fs.join(opt.out, stale))
    faults.in_finalize("kill_in_finalize", renamed)
    quarantine = sorted(q for p in parts for q in p["quarantine"])
    manifest = Manifest(
        medtl_version=medtl.__version__,
        format="unlabeled" if opt.unlabeled else opt.format,
        labels=tuple(labels),
        stored_image_size=opt.image_size,
        bit_depth=opt.bit_depth,
        channels=1,
        aspect=opt.aspect,
        frame=opt.frame,
        uncertain=opt.uncertain if opt.format == "chexpert" and not opt.unlabeled else None,
        blank=opt.blank if opt.format in ("chexpert", "multihot") and not opt.unlabeled else None,
        fields=tuple(sorted(opt.kept_fields)),
        split_seed=opt.seed,
        split_source=_split_source(opt),
        val_fraction=opt.val_fraction,
        test_fraction=opt.test_fraction,
        quarantined=len(quarantine),
        splits=manifest_splits,
        encoding=opt.encoding,
    )
    _write_quarantine(fs.join(opt.out, QUARANTINE), quarantine)
    write_manifest(opt.out, manifest)
    _write_private_map(opt)  # before the bad-fraction check: that is when the map is needed

    considered = sum(p["considered"] for p in parts)
    kept = sum(s.records for s in manifest_splits.values())
    log(f"ingest: wrote {kept} records ("
        + ", ".join(f"{k} {v.records} in {len(v.shards)} shard(s)" for k, v in manifest_splits.items())
        + f"); quarantined {len(quarantine)} of {considered} inputs (see {fs.join(opt.out, QUARANTINE)})")
    _warn_empty_splits(opt, manifest)
    if opt.unlabeled and kept == 0:
        first = f" (first: study {': '.join(quarantine[0])})" if quarantine else ""
        raise MedtlError(f"none of the {considered} image files under --images {opt.images} could be read{first}; "
                         f"see {fs.join(opt.out, QUARANTINE)}, and point --images at readable DICOM, PNG or JPEG "
                         "studies")
    bad_fraction = len(quarantine) / max(considered, 1)
    if bad_fraction > opt.max_bad_fraction:
        first = quarantine[0]
        raise MedtlError(
            f"{len(quarantine)} of {considered} inputs quarantined ({bad_fraction:.1%} > --max-bad-fraction "
            f"{opt.max_bad_fraction:.1%}); first: study {first[0]}: {first[1]}: {first[2]}. Fix the inputs listed "
            f"in {fs.join(opt.out, QUARANTINE)} (--private-map PATH names the file behind each study id) or raise "
            "--max-bad-fraction."
        )
    if kept == 0:
        raise MedtlError(f"no records were written to {opt.out}; see {fs.join(opt.out, QUARANTINE)}")
    # The parts go only now, so a finalize that failed a check above can be re-run (e.g. with a higher
    # --max-bad-fraction) without re-running the workers.
    # Not empty: tensorflow-io's S3 filesystem cannot rename an empty object (the atomic write renames).
    fs.write_text_atomic(fs.join(opt.out, PARTS_DIR, FINALIZED), "finalized\n")
    _remove_parts(opt.out)
    return manifest


def _stored_form(opt: IngestOptions) -> dict:
    """What a part's shards hold, which the manifest written by finalize states: size, bit depth, encoding."""
    return {"image_size": opt.image_size, "bit_depth": opt.bit_depth, "encoding": opt.encoding}


def _check_stored_form(opt: IngestOptions, parts: list[dict]) -> None:
    """Finalize's options must describe the shards the workers wrote, or the manifest would misstate them."""
    want = _stored_form(opt)
    flags = {"image_size": "--image-size", "bit_depth": "--bit-depth", "encoding": "--encoding"}
    for part in parts:
        stored = part.get("stored", want)  # parts of an older medtl did not record it
        for key, flag in flags.items():
            if stored[key] != want[key]:
                raise MedtlError(f"ingest part {part['worker_index']} in {opt.out} was written with {flag} "
                                 f"{stored[key]} but finalize was given {flag} {want[key]}; pass the workers' "
                                 "options to `medtl ingest-finalize`")


def _split_source(opt: IngestOptions) -> str:
    """How patients were assigned: a split file, the dataset's own split, stratified on labels, or (no labels) at random."""
    if opt.split_file:
        return "file"
    if opt.format == "medmnist" and not opt.unlabeled:
        return "given"
    return "random" if opt.unlabeled else "stratified"


def _read_parts(out: str, num_workers: int) -> list[dict]:
    """Every worker's part.json, or an error naming the missing workers."""
    parts, missing = [], []
    for w in range(num_workers):
        path = fs.join(_part_dir(out, w, num_workers), "part.json")
        if not fs.exists(path):
            missing.append(w)
        else:
            parts.append(json.loads(fs.read_text(path)))
    if missing:
        others = sorted({m.group(1) for name in fs.listdir(fs.join(out, PARTS_DIR))
                         if (m := re.match(r"worker-\d{5}-of-(\d{5})$", name)) and int(m.group(1)) != num_workers})
        hint = f" (parts of a {int(others[0])}-worker ingest are there: pass --num-workers {int(others[0])})" if others else ""
        raise MedtlError(f"ingest parts {', '.join(map(str, missing))} of {num_workers} are missing or unfinished in "
                         f"{fs.join(out, PARTS_DIR)}{hint}; re-run those workers "
                         f"(--worker-index N --num-workers {num_workers})")
    return parts


def _move_shard(out: str, part: dict, shard: dict, name: str, num_workers: int) -> None:
    """Give a part's shard its final name; a shard an earlier (killed) finalize moved is recognised by its hash."""
    src = fs.join(_part_dir(out, part["worker_index"], num_workers), shard["part_file"])
    dst = fs.join(out, name)
    if fs.exists(src):
        fs.rename(src, dst)
    elif not (fs.exists(dst) and fs.size(dst) == shard["bytes"] and fs.sha256(dst) == shard["sha256"]):
        raise MedtlError(f"shard {shard['part_file']} of ingest part {part['worker_index']} is neither in its part "
                         f"folder nor at {dst}; re-run that worker (--worker-index {part['worker_index']} "
                         f"--num-workers {num_workers}), then finalize")


def _cleanup_pending(out: str) -> bool:
    """True when a finalize got as far as removing the parts: its marker is there, or (the marker's
    removal being the last step but one) an empty .parts/ beside the manifest."""
    parts_dir = fs.join(out, PARTS_DIR)
    if fs.exists(fs.join(parts_dir, FINALIZED)):
        return True
    return fs.exists(parts_dir) and not fs.listdir(parts_dir) and fs.exists(fs.join(out, MANIFEST_FILE))


def _remove_parts(out: str) -> None:
    """Remove the parts of a finalized ingest, the FINALIZED marker last."""
    parts_dir = fs.join(out, PARTS_DIR)
    folders = sorted(n for n in fs.listdir(parts_dir) if n != FINALIZED)
    for done, name in enumerate(folders):
        faults.in_finalize("kill_in_cleanup", done)
        fs.remove(fs.join(parts_dir, name))
    fs.remove(parts_dir)


def _warn_empty_splits(opt: IngestOptions, manifest: Manifest) -> None:
    """An empty val or test split is legal (records only to evaluate, say) but rarely meant: say so now."""
    for split, fraction, needed_by in (("val", opt.val_fraction, "`medtl train`"),
                                       ("test", opt.test_fraction, "`medtl evaluate` on the test split")):
        if manifest.records(split) or not manifest.records("train"):
            continue
        fix = {"file": f"give some patients the split {split!r} in --split-file",
               "given": f"use a dataset file with a {split} split"}.get(
            manifest.split_source, f"ingest more patients or raise --{split}-fraction")
        if manifest.split_source in ("file", "given") or fraction > 0:  # a fraction of 0 asked for it
            log(f"warning: the {split} split of {opt.out} is empty (0 records) and {needed_by} needs one; {fix}")


def image_size_from_job(path: str) -> int:
    """The stored size that matches a job: its model input, data.image_size (`medtl ingest --size-from`)."""
    from medtl.config import load_job_config

    size = load_job_config(path).data.image_size  # >= 32, as every backbone needs (Config.check)
    log(f"ingest: storing images at {size} px, the data.image_size of {path}")
    return size


def ingest(opt: IngestOptions) -> Manifest:
    """A whole ingest on this machine: one part (with opt.workers local processes), then finalize."""
    ingest_part(opt, 0, 1)
    return finalize(opt, 1)


def _write_quarantine(path: str, rows: list) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["study", "reason", "message"])
    writer.writerows(rows)
    fs.write_text_atomic(path, buf.getvalue())

