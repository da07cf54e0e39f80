"""Ingest: study files + a labels table -> de-identified, patient-split, sharded TFRecords.

Outputs in the records folder:
  {train,val,test}-NNNNN-of-MMMMM.tfrecord   shards (written as .tmp, renamed when complete)
  manifest.json                              labels, counts, prevalence, shard sizes and SHA-256
  quarantine.csv                             every input that could not be used, with a reason
"""
from __future__ import annotations

import concurrent.futures as futures
import csv
import hashlib
import io
import json
import multiprocessing
import os
from dataclasses import dataclass

import numpy as np

import medtl
from medtl.data import decode, deid, splits, tables
from medtl.errors import MedtlError
from medtl.utils.log import log
from medtl.utils.progress import Progress

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
QUARANTINE = "quarantine.csv"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")


@dataclass(frozen=True)
class IngestOptions:
    images: str
    labels: str
    out: str
    format: str = "chestxray14"
    image_size: int = 512
    bit_depth: int = 16
    aspect: str = "pad"
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0
    shard_mb: float = 150.0
    workers: int = 1
    max_bad_fraction: float = 0.01
    salt_file: str | None = None
    progress: bool = True


def _decode_one(args: tuple[str, int, int, str]) -> tuple[bytes | None, str, str]:
    """(png, reason, message) for one file; runs in worker processes, so no TensorFlow here."""
    path, size, bit_depth, aspect = args
    try:
        image = decode.decode_file(path)
        image = decode.resize(image, size, aspect)
        return decode.encode_png(image, bit_depth), "", ""
    except decode.DecodeError as exc:
        return None, exc.reason, exc.message
    except Exception as exc:  # never let one file take the whole ingest down
        return None, "decode_failed", f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


class _ShardWriter:
    """Buffers records of one split into shards of about `target_bytes`, under temporary names."""

    def __init__(self, out: str, split: str, target_bytes: int):
        self.out, self.split, self.target = out, split, target_bytes
        self.pending: list[tuple[str, int, int, str]] = []  # (tmp path, records, bytes, sha256)
        self._writer = None
        self._count = 0
        self._bytes = 0
        self._hash = None
        self._path = ""

    def write(self, record: bytes) -> None:
        from medtl.tf import tf

        if self._writer is None:
            self._path = os.path.join(self.out, f".{self.split}-{len(self.pending):05d}.tfrecord.tmp")
            self._writer = tf.io.TFRecordWriter(self._path)
            self._count = 0
            self._bytes = 0
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
        self.pending.append((self._path, self._count, os.path.getsize(self._path), _sha256(self._path)))

    def finish(self) -> list[dict]:
        """Close the last shard and rename all to their final `-of-` names."""
        self._close()
        from medtl.data.records import shard_name

        shards = []
        for i, (tmp, count, size, digest) in enumerate(self.pending):
            name = shard_name(self.split, i, len(self.pending))
            os.replace(tmp, os.path.join(self.out, name))
            shards.append({"file": name, "records": count, "bytes": size, "sha256": digest})
        return shards


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files_on_disk(images: str) -> set[str]:
    found = set()
    for root, _, files in os.walk(images):
        for name in files:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.add(os.path.relpath(os.path.join(root, name), images))
    return found


def _check_options(opt: IngestOptions) -> None:
    if not os.path.isdir(opt.images):
        raise MedtlError(f"images folder {opt.images} does not exist; pass the folder holding the studies with --images")
    if opt.bit_depth not in (8, 16):
        raise MedtlError(f"--bit-depth must be 8 or 16, got {opt.bit_depth}")
    if opt.image_size < 32:
        raise MedtlError(f"--image-size must be >= 32, got {opt.image_size}")
    if opt.aspect not in decode.ASPECT_POLICIES:
        raise MedtlError(f"--aspect must be one of {', '.join(decode.ASPECT_POLICIES)}, got {opt.aspect}")
    if not 0 <= opt.max_bad_fraction <= 1:
        raise MedtlError(f"--max-bad-fraction must be in [0, 1], got {opt.max_bad_fraction}")
    if opt.workers < 1:
        raise MedtlError(f"--workers must be >= 1, got {opt.workers}")


def ingest(opt: IngestOptions) -> dict:
    """Run ingest; returns the manifest. Raises MedtlError when too many inputs are bad."""
    _check_options(opt)
    table = tables.read_table(opt.labels, opt.format)
    salt = deid.load_salt(opt.salt_file)
    os.makedirs(opt.out, exist_ok=True)
    num_labels = len(table.label_names)

    quarantine: list[tuple[str, str, str]] = list(table.rejected)
    listed = {s.file for s in table.studies} | {f for f, _, _ in table.rejected}
    for extra in sorted(_files_on_disk(opt.images) - listed):
        quarantine.append((extra, "not_in_labels", "image file on disk but not in the labels table"))

    before_decode = len(quarantine)

    # Patient-level split on the union of each patient's labels.
    union: dict[str, np.ndarray] = {}
    for s in table.studies:
        union.setdefault(s.patient, np.zeros(num_labels, int))
        union[s.patient] |= np.array(s.labels, int)
    assignment = splits.split_patients(union, opt.val_fraction, opt.test_fraction, opt.seed)

    # Seeded record order within a split, so shards are already mixed for streaming.
    order = {split: [] for split in SPLITS}
    for s in sorted(table.studies, key=lambda s: s.file):
        order[assignment[s.patient]].append(s)
    rng = np.random.default_rng(opt.seed)
    for split in SPLITS:
        rng.shuffle(order[split])

    from medtl.data.records import encode_example

    manifest_splits = {}
    total = sum(len(v) for v in order.values())
    target = int(opt.shard_mb * 1024 * 1024)
    log(f"ingest: {total} images of {len(union)} patients, {num_labels} labels -> {opt.out}")
    with Progress(total, "ingest", enabled=opt.progress) as bar, _pool(opt.workers) as pool:
        for split in SPLITS:
            studies = order[split]
            writer = _ShardWriter(opt.out, split, target)
            jobs = [(os.path.join(opt.images, s.file), opt.image_size, opt.bit_depth, opt.aspect) for s in studies]
            results = pool.map(_decode_one, jobs, chunksize=8) if pool else map(_decode_one, jobs)
            positives = np.zeros(num_labels, int)
            known = np.zeros(num_labels, int)
            patients = set()
            written = 0
            for study, (png, reason, message) in zip(studies, results):
                bar(1)
                if png is None:
                    quarantine.append((study.file, reason, message))
                    continue
                writer.write(encode_example(png, study.labels, study.mask,
                                            deid.salted_hash(salt, study.patient),
                                            deid.salted_hash(salt, study.file)))
                written += 1
                positives += np.array(study.labels) * np.array(study.mask)
                known += np.array(study.mask)
                patients.add(study.patient)
            shards = writer.finish()
            manifest_splits[split] = {
                "records": written,
                "patients": len(patients),
                "positives": dict(zip(table.label_names, positives.tolist())),
                "prevalence": {n: round(p / k, 6) if k else None
                               for n, p, k in zip(table.label_names, positives.tolist(), known.tolist())},
                "shards": shards,
            }

    manifest = {
        "medtl_version": medtl.__version__,
        "format": opt.format,
        "labels": list(table.label_names),
        "image_size": opt.image_size,
        "bit_depth": opt.bit_depth,
        "channels": 1,
        "aspect": opt.aspect,
        "split_seed": opt.seed,
        "val_fraction": opt.val_fraction,
        "test_fraction": opt.test_fraction,
        "quarantined": len(quarantine),
        "splits": manifest_splits,
    }
    _write_atomic(os.path.join(opt.out, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    _write_quarantine(os.path.join(opt.out, QUARANTINE), quarantine)

    considered = total + before_decode
    bad_fraction = len(quarantine) / max(considered, 1)
    kept = sum(s["records"] for s in manifest_splits.values())
    log(f"ingest: wrote {kept} records "
        + ", ".join(f"{k}={v['records']}" for k, v in manifest_splits.items())
        + f"; quarantined {len(quarantine)} (see {os.path.join(opt.out, QUARANTINE)})")
    if bad_fraction > opt.max_bad_fraction:
        first = quarantine[0]
        raise MedtlError(
            f"{len(quarantine)} of {considered} inputs quarantined ({bad_fraction:.1%} > --max-bad-fraction "
            f"{opt.max_bad_fraction:.1%}); first: {first[0]}: {first[1]}: {first[2]}. "
            f"Fix the inputs listed in {os.path.join(opt.out, QUARANTINE)} or raise --max-bad-fraction."
        )
    return manifest


class _pool:
    """A process pool for decoding when workers > 1 (spawned: no TensorFlow state is forked)."""

    def __init__(self, workers: int):
        self.workers = workers
        self.executor = None

    def __enter__(self):
        if self.workers > 1:
            self.executor = futures.ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self.executor

    def __exit__(self, *exc):
        if self.executor is not None:
            self.executor.shutdown(cancel_futures=True)
        return False


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _write_quarantine(path: str, rows: list[tuple[str, str, str]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file", "reason", "message"])
    writer.writerows(sorted(rows))
    _write_atomic(path, buf.getvalue())


def read_manifest(records: str) -> dict:
    """The manifest of a records folder, with a clear error when it is missing or unreadable."""
    from medtl.tf import tf

    path = f"{records.rstrip('/')}/{MANIFEST}"
    if not tf.io.gfile.exists(path):
        raise MedtlError(f"no {MANIFEST} in {records}; point data.records at a folder written by `medtl ingest`")
    try:
        with tf.io.gfile.GFile(path, "r") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise MedtlError(f"{path} is not valid JSON ({exc}); re-run `medtl ingest`") from None
