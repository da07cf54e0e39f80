"""`medtl evaluate --model EXPORT --records DIR`: an exported model scored like a run, e.g. a
shipped model on another site's data. The export's calibration, thresholds and TTA are fixed: the
report applies the export's calibration to its uncalibrated output, so it shows ECE before and after.

Without a label map the records must have the export's labels; with one (medtl.evaluate.external)
the mapped labels are scored and the others listed. The report sets the result beside the internal
test set's, which the export carries (or its run folder holds) when the run's test split was evaluated.
"""
from __future__ import annotations

import copy
import dataclasses
import os

from medtl import dist
from medtl.config import load_config
from medtl.data.manifest import check_split, read_manifest
from medtl.errors import MedtlError
from medtl.evaluate.external import ExternalValidation, build_mapping, exact_mapping
from medtl.evaluate.run import Source, evaluate, with_evaluate_overrides
from medtl.evaluate.subgroups import check_subgroup_fields
from medtl.serve.card import CARD_MD
from medtl.serve.meta import ExportMeta, check_saliency, load_savedmodel, read_meta
from medtl.train.rundir import RunDir, SplitMetrics

FIXED_SETTINGS = ("evaluate.threshold_policy", "evaluate.target", "evaluate.tta", "evaluate.calibration")
INTERNAL_SPLIT = "test"


def internal_test_metrics(meta: ExportMeta) -> tuple[SplitMetrics | None, str]:
    """(the internal test figures of the exported checkpoint, where they came from), or (None, why not)."""
    if meta.internal_test is not None:
        return meta.internal_test, "the export's metadata"
    t = meta.thresholds
    if meta.run_folder and os.path.isdir(meta.run_folder):
        found = RunDir(meta.run_folder).read_split_metrics(INTERNAL_SPLIT)
        if found is not None and (found.checkpoint_sha256, found.tta) == (t.checkpoint_sha256, t.tta):
            return found, f"the export's run folder {meta.run_folder}"
    where = f" and its run folder {meta.run_folder} holds none for the exported checkpoint" if meta.run_folder else ""
    return None, (f"not available: the export carries no internal {INTERNAL_SPLIT} metrics{where}; evaluate the run "
                  f"(`medtl evaluate --workdir RUN --split {INTERNAL_SPLIT}`) and re-export it to compare")


def export_source(model_dir: str, records: str, split: str, overrides: list[str],
                  label_map: str | None = None) -> Source:
    """An exported model on a records folder: the export's labels, or those `label_map` maps."""
    meta = read_meta(model_dir)
    manifest = read_manifest(records)
    mapping = (build_mapping(label_map, meta.label_names, manifest.labels, model_dir, records) if label_map
               else exact_mapping(meta.label_names, manifest.labels, model_dir, records))
    fixed = [o for o in overrides if o.split("=")[0].strip() in FIXED_SETTINGS]
    if fixed:
        raise MedtlError(f"--set {fixed[0]}: an export's calibration, thresholds and TTA are fixed; re-export the "
                         "run with `medtl export --set ...` to change them")
    tree = copy.deepcopy(meta.config)
    tree["data"]["records"] = os.path.abspath(records)
    cfg = with_evaluate_overrides(load_config(raw=tree), overrides)
    check_split(manifest, split, records)  # no val needed: the export's calibration was fitted when it was made
    check_subgroup_fields(cfg.evaluate.subgroups, manifest, records)
    if cfg.evaluate.saliency:
        check_saliency(meta, model_dir)
    internal, internal_source = internal_test_metrics(meta)
    from medtl.tf import tf

    loaded = load_savedmodel(model_dir)
    signature = loaded.signatures["predict_images"]
    # The model's own probabilities, calibrated by the report (as the SavedModel does); older exports lack them.
    # Under a label map the report's labels are the records', so the SavedModel's calibrated output is used.
    output = ("uncalibrated_probabilities" if "uncalibrated_probabilities" in signature.structured_outputs
              and mapping.is_identity() else "probabilities")
    provenance = {"exported model": os.path.abspath(model_dir),
                  "checkpoint": f"exported best checkpoint (sha256 {meta.thresholds.checkpoint_sha256[:16]})",
                  "trained on data manifest sha256": meta.data_manifest_sha256,
                  "label map": os.path.abspath(label_map) if label_map else "none (the labels match by name)"}
    cfg = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, tta=meta.tta))
    gather = tf.constant(mapping.gather_index())

    def probabilities(images, _keep=loaded):  # _keep holds the variables the signature reads
        probs = signature(images=images)[output]  # (batch, L) in the model's label order
        padded = tf.concat([probs, tf.zeros_like(probs[:, :1])], axis=1)
        return tf.gather(padded, gather, axis=1)  # (batch, M) in the records' order; unmapped columns 0

    card = os.path.join(os.path.abspath(model_dir), CARD_MD)
    return Source(cfg, manifest, probabilities, "none", meta.thresholds, provenance, meta.history or None,
                  meta.calibration if output == "uncalibrated_probabilities" else None,
                  links={"model card": card if os.path.isfile(card) else None},
                  external=ExternalValidation(mapping, internal, internal_source),
                  saliency=_export_saliency(loaded, meta, mapping.evaluated) if cfg.evaluate.saliency else None)


def _export_saliency(loaded, meta: ExportMeta, evaluated):
    """images -> the export's Grad-CAM maps of the evaluated labels (batch, size, size, K)."""
    from medtl.tf import tf

    signature = loaded.signatures["saliency_images"]
    columns = tf.constant([meta.label_names.index(n) for n in evaluated])

    def maps(images, _keep=loaded):
        return tf.gather(signature(images=images)["saliency"], columns, axis=3)

    return maps


def evaluate_export(model_dir: str, records: str, split: str, out: str, overrides: list[str] | None = None,
                    label_map: str | None = None) -> dict:
    """Predict `split` of `records` with the export on every rank; rank 0 writes the report."""
    ctx = dist.init()
    return evaluate(export_source(model_dir, records, split, overrides or [], label_map), split, out, ctx)
