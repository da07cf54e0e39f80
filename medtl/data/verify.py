"""`medtl verify`: every shard checked against the manifest, with the damage named.

The cheap check (existence and byte size) runs at every training start-up; the
deep check (SHA-256, every record read, parsed and decoded) runs in `medtl
verify` and, to name the culprit, when a data error stops training.
"""
from __future__ import annotations

from dataclasses import dataclass

from medtl.data.manifest import Manifest, Shard, check_train_split, read_manifest
from medtl.errors import MedtlError, RunFailure
from medtl.utils import fs
from medtl.utils.log import log


@dataclass(frozen=True)
class Problem:
    shard: str
    kind: str  # missing | truncated | oversized | corrupted | count_mismatch | bad_record
    detail: str

    def __str__(self) -> str:
        return f"shard {self.shard}: {self.kind}: {self.detail}"


def _shards(manifest: Manifest, splits) -> list[tuple[str, Shard]]:
    chosen = splits or list(manifest.splits)
    unknown = [s for s in chosen if s not in manifest.splits]
    if unknown:
        raise MedtlError(f"split(s) {', '.join(unknown)} not in the manifest; it has: {', '.join(manifest.splits)}")
    return [(split, shard) for split in chosen for shard in manifest.splits[split].shards]


def check_cheap(records: str, manifest: Manifest, splits=None) -> list[Problem]:
    """Existence and byte size of every listed shard (no data read)."""
    problems = []
    for _, shard in _shards(manifest, splits):
        path = fs.join(records, shard.file)
        if not fs.exists(path):
            problems.append(Problem(path, "missing", "listed in manifest.json but not found"))
            continue
        if shard.bytes is None:  # a hand-written manifest without sizes: only existence is checkable
            continue
        size = fs.size(path)
        if size < shard.bytes:
            problems.append(Problem(path, "truncated", f"{size} of {shard.bytes} bytes"))
        elif size > shard.bytes:
            problems.append(Problem(path, "oversized", f"{size} bytes, manifest says {shard.bytes}"))
    return problems


def _read_records(path: str, manifest: Manifest, expected: int) -> Problem | None:
    """Read, parse and decode every record of one shard."""
    from medtl.data.records import LABELS, MASK, feature_spec, image_feature
    from medtl.tf import tf

    num_labels = manifest.num_labels
    spec = feature_spec(num_labels, manifest.encoding)
    image_key = image_feature(manifest.encoding)
    count = 0
    try:
        for record in tf.data.TFRecordDataset(path):
            try:
                ex = tf.io.parse_single_example(record, spec)
                wrong = _image_problem(ex[image_key], manifest)
            except tf.errors.InvalidArgumentError as exc:
                return Problem(path, "bad_record", f"record {count} does not parse as a medtl {manifest.encoding} "
                                                   f"record with {num_labels} labels: {_first_line(exc)}")
            if wrong:
                return Problem(path, "bad_record", f"record {count} {wrong}")
            if ex[LABELS].shape[0] != num_labels or ex[MASK].shape[0] != num_labels:
                return Problem(path, "bad_record", f"record {count} has {ex[LABELS].shape[0]} labels, expected {num_labels}")
            count += 1
    except tf.errors.DataLossError as exc:
        return Problem(path, "corrupted", f"unreadable after record {count} ({_first_line(exc)})")
    if count != expected:
        return Problem(path, "count_mismatch", f"{count} records, manifest says {expected}")
    return None


def _image_problem(data, manifest: Manifest) -> str | None:
    """What is wrong with one record's stored image against the manifest, or None (raises
    InvalidArgumentError for a PNG that does not decode)."""
    from medtl.tf import tf

    size = manifest.stored_image_size
    if manifest.encoding == "raw":
        found = len(data.numpy())
        if found != manifest.raw_image_bytes:
            return (f"holds {found} image bytes, manifest says {size}x{size} {manifest.bit_depth}-bit raw "
                    f"({manifest.raw_image_bytes} bytes)")
        return None
    dtype = tf.uint16 if manifest.bit_depth == 16 else tf.uint8
    image = tf.io.decode_png(data, channels=1, dtype=dtype)
    if tuple(image.shape) != (size, size, 1):
        return f"image is {tuple(image.shape[:2])}, manifest says ({size}, {size})"
    return None


def _first_line(exc: Exception) -> str:
    text = getattr(exc, "message", None) or str(exc)
    return text.strip().splitlines()[0][:160]


def check_deep(records: str, manifest: Manifest, splits=None, progress: bool = False) -> list[Problem]:
    """Everything: existence, size, SHA-256, then every record read, parsed and decoded."""
    problems = check_cheap(records, manifest, splits)
    bad = {p.shard for p in problems}
    for _, shard in _shards(manifest, splits):
        path = fs.join(records, shard.file)
        if path in bad:
            continue
        problem = _read_records(path, manifest, shard.records)
        if problem is None and shard.sha256 is not None and fs.sha256(path) != shard.sha256:
            problem = Problem(path, "corrupted", "SHA-256 differs from the manifest (bytes changed)")
        if problem is not None:
            problems.append(problem)
        elif progress:
            log(f"verify: {shard.file} ok ({shard.records} records)")
    return problems


def verify_records(records: str, deep: bool = True) -> dict:
    """The `medtl verify` command: raise MedtlError naming the first damaged shard, or the folder when it
    holds no records at all. Unlabeled records (`medtl ingest --unlabeled`) are checked like labeled ones."""
    manifest = read_manifest(records, unlabeled_ok=True)
    if not any(s.records for s in manifest.splits.values()):
        check_train_split(records, manifest)  # names the folder: no images at all
    problems = check_deep(records, manifest) if deep else check_cheap(records, manifest)
    shards = sum(len(s.shards) for s in manifest.splits.values())
    count = sum(s.records for s in manifest.splits.values())
    if problems:
        for p in problems[1:]:
            log(f"verify: also damaged: {p}")
        raise RunFailure(f"{len(problems)} of {shards} shards damaged in {records}; first: {problems[0]}. "
                         "Re-run `medtl ingest` for this folder (or restore the shard from a copy).")
    log(f"verify: {records}: {shards} shards, {count} records, all {'read, parsed and checksummed' if deep else 'present with the right sizes'}")
    return {"shards": shards, "records": count}


def raise_if_damaged(records: str, manifest: Manifest, splits, cause: Exception) -> None:
    """After a data error in training or prediction: name the damaged shard, or re-raise the cause."""
    problems = check_deep(records, manifest, splits)
    if problems:
        raise RunFailure(f"{problems[0]}; training stopped, nothing was skipped. Run `medtl verify {records}` and "
                         "re-ingest or restore the shard.") from None
    raise cause
