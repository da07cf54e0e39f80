"""`medtl evaluate --model EXPORT --records DIR`: an exported model scored like a run, e.g. a
shipped model on another site's data. The export's thresholds and TTA are fixed."""
from __future__ import annotations

import copy
import dataclasses
import os

from medtl import dist
from medtl.config import load_config
from medtl.data.manifest import read_manifest
from medtl.errors import MedtlError
from medtl.evaluate.run import Source, check_split, evaluate, with_evaluate_overrides
from medtl.serve.meta import read_meta

FIXED_SETTINGS = ("evaluate.threshold_policy", "evaluate.target", "evaluate.tta")


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
        raise MedtlError(f"--set {fixed[0]}: an export's thresholds and TTA are fixed; re-export the run "
                         "with `medtl export --set ...` to change them")
    tree = copy.deepcopy(meta.config)
    tree["data"]["records"] = os.path.abspath(records)
    cfg = with_evaluate_overrides(load_config(raw=tree), overrides)
    check_split(manifest, split, records)
    loaded = tf.saved_model.load(model_dir)
    signature = loaded.signatures["predict_images"]
    provenance = {"exported model": os.path.abspath(model_dir),
                  "checkpoint": f"exported best checkpoint (sha256 {meta.thresholds.checkpoint_sha256[:16]})",
                  "trained on data manifest sha256": meta.data_manifest_sha256}
    cfg = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, tta=meta.tta))

    def probabilities(images, _keep=loaded):  # _keep holds the variables the signature reads
        return signature(images=images)["probabilities"]

    return Source(cfg, manifest, probabilities, "none", meta.thresholds, provenance, meta.history or None)


def evaluate_export(model_dir: str, records: str, split: str, out: str, overrides: list[str] | None = None) -> dict:
    """Predict `split` of `records` with the export on every rank; rank 0 writes the report."""
    ctx = dist.init()
    return evaluate(export_source(model_dir, records, split, overrides or []), split, out, ctx)
