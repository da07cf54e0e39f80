"""`medtl evaluate --model EXPORT --records DIR`: an exported model scored like a run, e.g. a
shipped model on another site's data. The export's calibration, thresholds and TTA are fixed: the
report applies the export's calibration to its uncalibrated output, so it shows ECE before and after."""
from __future__ import annotations

import copy
import dataclasses
import os

from medtl import dist
from medtl.config import load_config
from medtl.data.manifest import read_manifest
from medtl.errors import MedtlError
from medtl.evaluate.checks import check_split
from medtl.evaluate.subgroups import check_subgroup_fields
from medtl.evaluate.run import Source, evaluate, with_evaluate_overrides
from medtl.serve.card import CARD_MD
from medtl.serve.meta import read_meta

FIXED_SETTINGS = ("evaluate.threshold_policy", "evaluate.target", "evaluate.tta", "evaluate.calibration")


def export_source(model_dir: str, records: str, split: str, overrides: list[str]) -> Source:
    """An exported model on a records folder whose labels must be the export's."""
    from medtl.tf import tf

    meta = read_meta(model_dir)
    manifest = read_manifest(records)
    if list(manifest.labels) != list(meta.label_names):
        raise MedtlError(f"model {model_dir} was exported with labels {list(meta.label_names)} but {records} has "
                         f"{list(manifest.labels)}; evaluate it on records ingested with the same labels")
    fixed = [o for o in overrides if o.split("=")[0].strip() in FIXED_SETTINGS]
    if fixed:
        raise MedtlError(f"--set {fixed[0]}: an export's calibration, thresholds and TTA are fixed; re-export the "
                         "run with `medtl export --set ...` to change them")
    tree = copy.deepcopy(meta.config)
    tree["data"]["records"] = os.path.abspath(records)
    cfg = with_evaluate_overrides(load_config(raw=tree), overrides)
    check_split(manifest, split, records)  # no val needed: the export's calibration was fitted when it was made
    check_subgroup_fields(cfg.evaluate.subgroups, manifest, records)
    loaded = tf.saved_model.load(model_dir)
    signature = loaded.signatures["predict_images"]
    # The model's own probabilities, calibrated by the report (as the SavedModel does); older exports lack them.
    output = ("uncalibrated_probabilities" if "uncalibrated_probabilities" in signature.structured_outputs
              else "probabilities")
    provenance = {"exported model": os.path.abspath(model_dir),
                  "checkpoint": f"exported best checkpoint (sha256 {meta.thresholds.checkpoint_sha256[:16]})",
                  "trained on data manifest sha256": meta.data_manifest_sha256}
    cfg = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, tta=meta.tta))

    def probabilities(images, _keep=loaded):  # _keep holds the variables the signature reads
        return signature(images=images)[output]

    card = os.path.join(os.path.abspath(model_dir), CARD_MD)
    return Source(cfg, manifest, probabilities, "none", meta.thresholds, provenance, meta.history or None,
                  meta.calibration if output == "uncalibrated_probabilities" else None,
                  links={"model card": card if os.path.isfile(card) else None})


def evaluate_export(model_dir: str, records: str, split: str, out: str, overrides: list[str] | None = None) -> dict:
    """Predict `split` of `records` with the export on every rank; rank 0 writes the report."""
    ctx = dist.init()
    return evaluate(export_source(model_dir, records, split, overrides or []), split, out, ctx)
