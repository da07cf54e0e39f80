"""An export's metadata (assets/medtl_export.json) as one typed, frozen `ExportMeta`.

This module alone reads and writes the file; `medtl export` fills it, `medtl predict` and
`medtl evaluate --model` read it. On disk the thresholds are flat lists beside the label
names (the format every export so far has), in memory they are the run's `Thresholds`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import medtl
from medtl.config import Config, to_tree
from medtl.data.manifest import Manifest
from medtl.errors import MedtlError
from medtl.train.rundir import Calibration, SplitMetrics, Thresholds
from medtl.utils import fs

META_FILE = "medtl_export.json"
ASSETS_DIR = "assets"
FORMAT = "medtl-export"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ExportMeta:
    """What predict and evaluate need to use an export without its run folder."""

    label_names: tuple[str, ...]
    thresholds: Thresholds
    # The model's input side; the shards (and predict's PNGs) hold stored_image_size images.
    image_size: int
    channels: int
    stored_image_size: int
    bit_depth: int
    aspect: str
    frame: str
    backbone: str
    data_manifest_sha256: str
    config: dict  # the run's resolved config tree
    history: list = field(default_factory=list)
    medtl_version: str = medtl.__version__
    # The calibration applied inside the SavedModel before the thresholds (None: probabilities as trained).
    calibration: Calibration | None = None
    # The layer whose map the saliency signatures' Grad-CAM uses; "" in exports made before they existed.
    gradcam_layer: str = ""
    # The run folder exported (absolute), and its test split's evaluation for this checkpoint if it had one.
    run_folder: str = ""
    internal_test: SplitMetrics | None = None

    @property
    def tta(self) -> str:
        return self.thresholds.tta

    @property
    def threshold_values(self) -> list[float]:
        return self.thresholds.values(self.label_names)

    @classmethod
    def build(cls, cfg: Config, manifest: Manifest, thresholds: Thresholds, history: list | None,
              calibration: Calibration | None = None) -> "ExportMeta":
        return cls(label_names=tuple(manifest.labels), thresholds=thresholds, image_size=cfg.data.image_size,
                   channels=cfg.data.channels, stored_image_size=manifest.stored_image_size,
                   bit_depth=manifest.bit_depth, aspect=manifest.aspect, frame=manifest.frame,
                   backbone=cfg.model.backbone, data_manifest_sha256=manifest.digest(), config=to_tree(cfg),
                   history=list(history or []), calibration=calibration)

    def to_dict(self) -> dict:
        t, names = self.thresholds, self.label_names
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "medtl_version": self.medtl_version,
            "label_names": list(names), "thresholds": t.values(names), "threshold_notes": t.notes(names),
            "threshold_policy": t.policy, "threshold_target": t.target, "thresholds_tuned_on": t.tuned_on,
            "val_records": t.val_records, "tta": t.tta, "image_size": self.image_size, "channels": self.channels,
            "stored_image_size": self.stored_image_size, "bit_depth": self.bit_depth, "aspect": self.aspect,
            "frame": self.frame, "backbone": self.backbone, "checkpoint_sha256": t.checkpoint_sha256,
            "data_manifest_sha256": self.data_manifest_sha256, "config": self.config, "history": self.history,
            "threshold_calibration": t.calibration,
            "calibration": self.calibration.to_dict() if self.calibration else None,
            "gradcam_layer": self.gradcam_layer, "run_folder": self.run_folder,
            "internal_test": self.internal_test.to_dict() if self.internal_test else None,
        }

    @classmethod
    def from_dict(cls, raw: dict) -> "ExportMeta":
        names = tuple(raw["label_names"])
        thresholds = Thresholds(
            policy=raw["threshold_policy"], target=raw["threshold_target"], tta=raw["tta"],
            tuned_on=raw["thresholds_tuned_on"], val_records=raw["val_records"],
            labels={n: {"threshold": t, "note": note}
                    for n, t, note in zip(names, raw["thresholds"], raw["threshold_notes"])},
            checkpoint_sha256=raw["checkpoint_sha256"], medtl_version=raw.get("medtl_version", ""),
            calibration=raw.get("threshold_calibration", "none"))
        calibration = Calibration.from_dict(raw["calibration"]) if raw.get("calibration") else None
        return cls(label_names=names, thresholds=thresholds, image_size=int(raw["image_size"]),
                   channels=int(raw["channels"]), stored_image_size=int(raw["stored_image_size"]),
                   bit_depth=int(raw["bit_depth"]), aspect=raw.get("aspect", "pad"),
                   frame=raw.get("frame", "middle"), backbone=raw.get("backbone", ""),
                   data_manifest_sha256=raw.get("data_manifest_sha256", ""), config=raw["config"],
                   history=list(raw.get("history") or []), medtl_version=raw.get("medtl_version", ""),
                   calibration=calibration, gradcam_layer=raw.get("gradcam_layer", ""),
                   run_folder=raw.get("run_folder", ""),
                   internal_test=SplitMetrics.from_dict(raw["internal_test"]) if raw.get("internal_test") else None)


def meta_path(model_dir: str) -> str:
    return os.path.join(model_dir, ASSETS_DIR, META_FILE)


def write_meta(path: str, meta: ExportMeta) -> None:
    """The file the SavedModel carries as an asset (written before tf.saved_model.save copies it)."""
    fs.write_text_atomic(path, json.dumps(meta.to_dict(), indent=2))


def check_saliency(meta: ExportMeta, model_dir: str) -> None:
    """Grad-CAM needs the saliency signatures, which exports made before them lack."""
    if not meta.gradcam_layer:
        raise MedtlError(f"export {model_dir} has no saliency signatures (it was made by medtl "
                         f"{meta.medtl_version or 'before 0.1'}, before Grad-CAM); re-export its run with "
                         "`medtl export --workdir RUN --out NEW_DIR` and use that export")


def read_meta(model_dir: str) -> ExportMeta:
    """The export's metadata, with a clear error when the folder is not a medtl export."""
    path = meta_path(model_dir)
    if not os.path.isfile(os.path.join(model_dir, "saved_model.pb")) or not os.path.isfile(path):
        raise MedtlError(f"{model_dir} is not a model written by `medtl export` (no saved_model.pb or "
                         f"{ASSETS_DIR}/{META_FILE}); export one with `medtl export --workdir RUN --out DIR`")
    with open(path, encoding="utf-8") as fh:
        raw = json.load(fh)
    if raw.get("format") != FORMAT or raw.get("format_version", 0) > FORMAT_VERSION:
        raise MedtlError(f"{path} is not a medtl export this version ({medtl.__version__}) can read")
    try:
        return ExportMeta.from_dict(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise MedtlError(f"{path} lacks or garbles {exc}; re-export the run with `medtl export`") from None


def _not_the_gradient_warning(record) -> bool:
    """False for absl's "unsaved custom gradients" warning: exports leave those gradients out on purpose
    (serving never differentiates a signature; medtl.serve.export), so the warning says nothing to a user."""
    return "with ops with unsaved custom gradients" not in record.getMessage()


def load_savedmodel(model_dir: str):
    """The export's SavedModel, loaded with TensorFlow (keep the returned object: signatures do not own the
    variables)."""
    import logging

    from medtl.tf import tf

    absl = logging.getLogger("absl")
    absl.addFilter(_not_the_gradient_warning)
    try:
        return tf.saved_model.load(model_dir)
    finally:
        absl.removeFilter(_not_the_gradient_warning)
