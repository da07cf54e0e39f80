"""The records folder's manifest.json as one typed, frozen `Manifest`.

This module alone reads and writes manifest.json; everyone else uses the attributes.
The file keeps its keys (`image_size` on disk is `stored_image_size` here).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from medtl.data.decode import ENCODINGS
from medtl.errors import MedtlError
from medtl.utils import fs

MANIFEST_FILE = "manifest.json"
# Where the k workers of an unfinished ingest keep their parts (see medtl.data.ingest).
PARTS_DIR = ".parts"


@dataclass(frozen=True)
class Shard:
    """One TFRecord file of a split, with what `medtl verify` checks it against."""

    file: str      # name inside the records folder
    records: int
    bytes: int | None = None   # None in a hand-written manifest: only existence is checkable
    sha256: str | None = None

    def to_dict(self) -> dict:
        return {"file": self.file, "records": self.records, "bytes": self.bytes, "sha256": self.sha256}


@dataclass(frozen=True)
class SplitInfo:
    """One split: counts, per-label statistics (keyed by label name) and its shards in order."""

    records: int = 0
    patients: int = 0
    positives: dict = field(default_factory=dict)
    masked: dict = field(default_factory=dict)
    # Positives / known labels in this split; None where no label is known.
    prevalence: dict = field(default_factory=dict)
    shards: tuple[Shard, ...] = ()
    # Kept field (--keep-fields) -> value ("" unknown) -> {"records": n, "patients": n} in this split.
    field_counts: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {"records": self.records, "patients": self.patients, "positives": dict(self.positives),
               "masked": dict(self.masked), "prevalence": dict(self.prevalence),
               "shards": [s.to_dict() for s in self.shards]}
        if self.field_counts:  # absent without kept fields: such manifests keep their bytes
            out["field_counts"] = self.field_counts
        return out


@dataclass(frozen=True)
class Manifest:
    """What `medtl ingest` wrote into a records folder."""

    labels: tuple[str, ...]
    # Side of the square images stored in the shards (the model's input size is cfg.data.image_size).
    stored_image_size: int
    bit_depth: int
    splits: dict  # split name -> SplitInfo, in ingest order (train, val, test)
    channels: int = 1
    aspect: str = "pad"
    frame: str = "middle"
    format: str | None = None
    medtl_version: str | None = None
    uncertain: str | None = None
    blank: str | None = None
    fields: tuple[str, ...] = ()
    split_seed: int | None = None
    split_source: str | None = None
    val_fraction: float | None = None
    test_fraction: float | None = None
    quarantined: int = 0
    # How the shards store each image (medtl.data.decode.ENCODINGS); manifests older than the field are png.
    encoding: str = "png"

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def raw_image_bytes(self) -> int:
        """Bytes of one stored image as raw pixels (what every raw record must hold)."""
        return self.stored_image_size * self.stored_image_size * self.channels * (self.bit_depth // 8)

    @property
    def labeled(self) -> bool:
        """False for records of `medtl ingest --unlabeled`: images only, every label vector empty."""
        return bool(self.labels)

    def records(self, split: str) -> int:
        return self.splits[split].records

    def to_dict(self) -> dict:
        """The manifest.json content (its keys as ingest has always written them)."""
        return {"medtl_version": self.medtl_version, "format": self.format, "labels": list(self.labels),
                "image_size": self.stored_image_size, "bit_depth": self.bit_depth, "channels": self.channels,
                "aspect": self.aspect, "frame": self.frame, "uncertain": self.uncertain, "blank": self.blank,
                "fields": list(self.fields), "split_seed": self.split_seed, "split_source": self.split_source,
                "val_fraction": self.val_fraction, "test_fraction": self.test_fraction,
                "quarantined": self.quarantined, "encoding": self.encoding,
                "splits": {k: v.to_dict() for k, v in self.splits.items()}}

    def digest(self) -> str:
        """A short SHA-256 of the content, to name the data in reports and exports. A png manifest hashes
        without its encoding, so records ingested before the field existed keep the digest they had."""
        content = self.to_dict()
        if self.encoding == "png":
            del content["encoding"]
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, raw: dict, where: str = MANIFEST_FILE) -> "Manifest":
        missing = [k for k in ("labels", "image_size", "bit_depth", "splits") if k not in raw]
        if missing:
            raise MedtlError(f"{where} lacks {', '.join(missing)}; it was not written by `medtl ingest`: re-run it")
        encoding = raw.get("encoding", "png")
        if encoding not in ENCODINGS:
            raise MedtlError(f"{where}: key 'encoding' is {encoding!r}, which this medtl cannot read (it knows "
                             f"{', '.join(ENCODINGS)}); re-ingest with `medtl ingest --encoding png` or `--encoding "
                             "raw`, or read these records with the medtl version that wrote them")
        try:
            splits = {name: _split_from_dict(info) for name, info in raw["splits"].items()}
            return cls(labels=tuple(raw["labels"]), stored_image_size=int(raw["image_size"]),
                       bit_depth=int(raw["bit_depth"]), splits=splits, channels=int(raw.get("channels", 1)),
                       aspect=raw.get("aspect") or "pad", frame=raw.get("frame") or "middle",
                       format=raw.get("format"), medtl_version=raw.get("medtl_version"),
                       uncertain=raw.get("uncertain"), blank=raw.get("blank"), fields=tuple(raw.get("fields", ())),
                       split_seed=raw.get("split_seed"), split_source=raw.get("split_source"),
                       val_fraction=raw.get("val_fraction"), test_fraction=raw.get("test_fraction"),
                       quarantined=int(raw.get("quarantined", 0)), encoding=encoding)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise MedtlError(f"{where} is malformed ({type(exc).__name__}: {exc}); re-run `medtl ingest`") from None


def _split_from_dict(info: dict) -> SplitInfo:
    shards = tuple(Shard(file=s["file"], records=int(s["records"]), bytes=s.get("bytes"),
                         sha256=s.get("sha256")) for s in info.get("shards", ()))
    return SplitInfo(records=int(info.get("records", sum(s.records for s in shards))),
                     patients=int(info.get("patients", 0)), positives=dict(info.get("positives", {})),
                     masked=dict(info.get("masked", {})), prevalence=dict(info.get("prevalence", {})),
                     shards=shards, field_counts=dict(info.get("field_counts", {})))


def manifest_path(records: str) -> str:
    return fs.join(records, MANIFEST_FILE)


# What a job that needs labels says to records without them; one text, so every such job says the same.
UNLABELED_FIX = ("ingest a labels table into a records folder for it (`medtl ingest --labels CSV`), or pretrain on "
                 "these records with pretrain.method: simclr")


def read_manifest(records: str, unlabeled_ok: bool = False) -> Manifest:
    """The manifest of a records folder, with a clear error when it is missing or unreadable.

    Every job reads its records through here, and most need labels: records of `medtl ingest --unlabeled`
    are refused unless the caller reads images only (`unlabeled_ok`: verify, self-supervised pretraining)."""
    path = manifest_path(records)
    if not fs.exists(path):
        hint = (" (an ingest is unfinished: run `medtl ingest-finalize`)"
                if fs.exists(fs.join(records, PARTS_DIR)) else "")
        raise MedtlError(f"no {MANIFEST_FILE} in {records}{hint}; point data.records at a folder written by "
                         "`medtl ingest`")
    try:
        raw = json.loads(fs.read_text(path))
    except json.JSONDecodeError as exc:
        raise MedtlError(f"{path} is not valid JSON ({exc}); re-run `medtl ingest`") from None
    if not isinstance(raw, dict):
        raise MedtlError(f"{path} is not a JSON object; re-run `medtl ingest`")
    manifest = Manifest.from_dict(raw, path)
    if not unlabeled_ok and not manifest.labeled:
        raise MedtlError(f"records folder {records} is unlabeled (ingested with --unlabeled) and this job needs "
                         f"labels; {UNLABELED_FIX}")
    return manifest


def check_split(manifest: Manifest, split: str, records: str, purpose: str = "evaluate") -> None:
    """Clear errors for a split that is not in the manifest or holds no records."""
    if split not in manifest.splits:
        raise MedtlError(f"split {split!r} is not in {records}/manifest.json; it has: "
                         f"{', '.join(manifest.splits)}")
    if manifest.records(split) == 0:
        raise MedtlError(f"split {split!r} of {records} is empty (0 records), nothing to {purpose}; "
                         "re-run `medtl ingest` with more studies or a larger --val-fraction/--test-fraction")


def check_val_split(records: str, manifest: Manifest) -> None:
    """Validation picks the best epoch and the thresholds: records without val records cannot train."""
    if manifest.records("val") == 0:
        raise MedtlError(f"the val split of {records} is empty (0 records), and training needs it to pick the best "
                         "epoch; re-run `medtl ingest` with more patients or a larger --val-fraction")


def check_train_split(records: str, manifest: Manifest) -> None:
    """A job that trains on the train split: one line naming the folder when that split holds no images."""
    if "train" in manifest.splits and manifest.records("train") > 0:
        return
    total = sum(s.records for s in manifest.splits.values())
    what = "no images at all (0 records in every split)" if not total else "no images in its train split (0 records)"
    raise MedtlError(f"records folder {records} holds {what}; re-run `medtl ingest` with studies that decode (its "
                     "quarantine.csv lists the inputs it could not use)")


# Stored side over model input side beyond which `medtl train` says the records are larger than the job needs.
OVERSIZE_RATIO = 1.5


def check_input_size(records: str, manifest: Manifest, image_size: int, allow_upsample: bool) -> None:
    """A model input larger than the stored images is upsampled detail that is not there: refused unless
    the job says so (data.allow_upsample)."""
    stored = manifest.stored_image_size
    if image_size > stored and not allow_upsample:
        raise MedtlError(f"data.image_size is {image_size} px but {records} stores {stored} px images (manifest.json "
                         f"image_size), so they would be upsampled; set data.allow_upsample: true to train on upsampled "
                         f"images, or re-ingest at {image_size} px (`medtl ingest --size-from CONFIG`)")


def oversize_warning(records: str, manifest: Manifest, image_size: int) -> str | None:
    """The warning for records stored more than OVERSIZE_RATIO times larger than the model input, with the
    cost in pixels (every epoch reads and resizes them, and decodes them if png); None otherwise."""
    stored = manifest.stored_image_size
    if stored <= OVERSIZE_RATIO * image_size:
        return None
    work = "decodes and resizes" if manifest.encoding == "png" else "reads and resizes"
    return (f"{records} stores {stored} px images, {stored / image_size:.1f}x the model input data.image_size "
            f"{image_size} px (more than {OVERSIZE_RATIO:g}x): every epoch {work} {(stored / image_size) ** 2:.1f} "
            f"pixels per pixel the model uses; re-ingest at {image_size} px for less CPU per image (`medtl ingest "
            "--size-from CONFIG`, docs/ingest.md)")


def write_manifest(records: str, manifest: Manifest) -> None:
    """Written atomically and last: a folder with manifest.json holds complete shards."""
    fs.write_text_atomic(manifest_path(records), json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n")


def remove_manifest(records: str) -> None:
    """While shards are renamed the folder must not look like finished records."""
    fs.remove(manifest_path(records))
