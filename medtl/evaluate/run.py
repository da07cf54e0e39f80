"""`medtl evaluate`: predict a split (all ranks), score it with val-tuned thresholds, write the report.

Thresholds: `evaluate` (and `export`) tune them on the val split when the run has
none yet, or when the checkpoint, policy, target or TTA changed since; they are
kept in RUN/thresholds.json. `train` does not tune them, so changing the policy
needs no retraining.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os

import numpy as np

import medtl
from medtl import dist
from medtl.config import Config, dump_config, load_config, to_tree
from medtl.errors import MedtlError
from medtl.evaluate import report as rep
from medtl.evaluate.bootstrap import bootstrap_distributions, percentile_interval
from medtl.evaluate.metrics import summary_metrics
from medtl.evaluate.predict import predict_split
from medtl.evaluate.thresholds import tune_thresholds
from medtl.utils import fs
from medtl.utils.log import log

THRESHOLDS_FILE = "thresholds.json"
TUNING_SPLIT = "val"


@dataclasses.dataclass
class Source:
    """What is evaluated: a run's best checkpoint, or an exported model on some records."""

    cfg: Config
    manifest: dict
    # A Keras model (logits), or a callable images -> probabilities (an export, TTA inside).
    model: object
    # TTA applied around `model` by predict_split.
    tta: str
    # {label: {'threshold', 'note'}} and how they were chosen.
    thresholds: dict
    provenance: dict
    history: list | None


def with_evaluate_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `--set evaluate.X=V`; other keys would no longer describe the trained model."""
    for assignment in overrides:
        if not assignment.strip().startswith("evaluate."):
            raise MedtlError(f"--set {assignment}: only evaluate.* keys can be changed after training "
                             "(e.g. --set evaluate.threshold_policy=f1)")
    return load_config(raw=to_tree(cfg), overrides=overrides) if overrides else cfg


def manifest_hash(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def check_split(manifest: dict, split: str, records: str, purpose: str = "evaluate") -> None:
    """Clear errors for a split that is not in the manifest or holds no records."""
    if split not in manifest["splits"]:
        raise MedtlError(f"split {split!r} is not in {records}/manifest.json; it has: "
                         f"{', '.join(manifest['splits'])}")
    if int(manifest["splits"][split]["records"]) == 0:
        raise MedtlError(f"split {split!r} of {records} is empty (0 records), nothing to {purpose}; "
                         "re-run `medtl ingest` with more studies or a larger --val-fraction/--test-fraction")


def _thresholds_stale(saved: dict | None, cfg: Config, digest: str, label_names) -> bool:
    if not saved:
        return True
    ev = cfg.evaluate
    return (saved.get("checkpoint_sha256") != digest or saved.get("policy") != ev.threshold_policy
            or saved.get("target") != ev.target or saved.get("tta") != ev.tta
            or list(saved.get("labels", {})) != list(label_names))


def load_or_tune_thresholds(workdir: str, cfg: Config, manifest: dict, model, ctx: dist.Context,
                            checkpoint: str) -> dict:
    """RUN/thresholds.json, re-tuned on val (all ranks predict) when missing or stale."""
    path = os.path.join(workdir, THRESHOLDS_FILE)
    saved = None
    if ctx.primary and os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            saved = json.load(fh)
    digest = fs.sha256(checkpoint) if ctx.primary else ""
    saved = dist.broadcast_object(ctx, None if _thresholds_stale(saved, cfg, digest, manifest["labels"])
                                  else saved, "medtl_thresholds")
    if saved is not None:
        return saved
    check_split(manifest, TUNING_SPLIT, cfg.data.records, "tune the operating thresholds on")
    ev = cfg.evaluate
    log(f"evaluate: tuning thresholds on {TUNING_SPLIT} ({ev.threshold_policy}"
        f"{'' if ev.threshold_policy in ('youden', 'f1') else f', target {ev.target}'})")
    val = predict_split(model, cfg, manifest, TUNING_SPLIT, ctx, tta=ev.tta)
    tuned = {"policy": ev.threshold_policy, "target": ev.target, "tta": ev.tta, "tuned_on": TUNING_SPLIT,
             "val_records": len(val["probs"]), "checkpoint_sha256": digest, "medtl_version": medtl.__version__,
             "labels": tune_thresholds(val["labels"], val["probs"], val["mask"], manifest["labels"],
                                       ev.threshold_policy, ev.target)}
    if ctx.primary:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(tuned, fh, indent=2)
        os.replace(tmp, path)
    return tuned


def read_history(path: str) -> list[dict] | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def run_source(workdir: str, split: str, overrides: list[str], ctx: dist.Context) -> Source:
    """A run folder's best checkpoint, with its thresholds (tuned on val if needed)."""
    from medtl.train.checkpoints import load_run
    from medtl.train.checkpoints import BEST_WEIGHTS, CHECKPOINT_DIR, HISTORY_FILE

    cfg, manifest, model = load_run(workdir)
    cfg = with_evaluate_overrides(cfg, overrides)
    check_split(manifest, split, cfg.data.records)  # before tuning, which takes a while
    checkpoint = os.path.join(workdir, CHECKPOINT_DIR, BEST_WEIGHTS)
    thresholds = load_or_tune_thresholds(workdir, cfg, manifest, model, ctx, checkpoint)
    provenance = {
        "run": os.path.abspath(workdir),
        "checkpoint": f"{CHECKPOINT_DIR}/{BEST_WEIGHTS} (sha256 {thresholds['checkpoint_sha256'][:16]})",
    }
    return Source(cfg, manifest, model, cfg.evaluate.tta, thresholds, provenance,
                  read_history(os.path.join(workdir, HISTORY_FILE)))


def add_intervals(summary: dict, preds: dict, cfg: Config) -> dict:
    """Bootstrap intervals for AUROC and AUPRC: per label, macro and micro (in place)."""
    ev = cfg.evaluate
    if not ev.bootstrap:
        return summary
    draws = bootstrap_distributions(preds["labels"], preds["probs"], preds["mask"], preds["patient"],
                                    ev.bootstrap, ev.seed)
    for i, row in enumerate(summary["labels"].values()):
        for key in ("auroc", "auprc"):
            ci = percentile_interval(draws[key][:, i], ev.confidence) if row[key] is not None else None
            row[f"{key}_ci"] = list(ci) if ci else None
    for kind in ("macro", "micro"):
        for key in ("auroc", "auprc"):
            ci = percentile_interval(draws[f"{kind}_{key}"], ev.confidence)
            summary[kind][f"{key}_ci"] = list(ci) if ci and summary[kind][key] is not None else None
    return summary


def build_report(source: Source, split: str, preds: dict) -> dict:
    """metrics.json's content: metrics at the saved thresholds, intervals, thresholds, provenance."""
    cfg, manifest, ev = source.cfg, source.manifest, source.cfg.evaluate
    label_names = manifest["labels"]
    thresholds = [source.thresholds["labels"][n]["threshold"] for n in label_names]
    summary = summary_metrics(preds["labels"], preds["probs"], label_names, preds["mask"], thresholds,
                              ev.calibration_bins)
    add_intervals(summary, preds, cfg)
    for name, row in summary["labels"].items():
        row["threshold_note"] = source.thresholds["labels"][name]["note"]
    from medtl.tf import tf

    provenance = {
        "split": split, "data records": cfg.data.records, "data manifest sha256": manifest_hash(manifest),
        "model": f"{cfg.model.backbone} at {cfg.data.image_size} px, {cfg.data.channels} channel(s)",
        **source.provenance,
        "test-time augmentation": ev.tta, "medtl version": medtl.__version__, "tensorflow": tf.__version__,
        "evaluated at (UTC)": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
    }
    thr = {k: source.thresholds[k] for k in ("policy", "target", "tuned_on", "val_records")}
    thr["labels"] = source.thresholds["labels"]
    return {"split": split, "n": summary["n"], "patients": int(len(np.unique(preds["patient"]))),
            "labels": summary["labels"], "macro": summary["macro"], "micro": summary["micro"],
            "thresholds": thr, "calibration_bins": ev.calibration_bins,
            "bootstrap": {"resamples": ev.bootstrap, "seed": ev.seed, "confidence": ev.confidence,
                          "unit": "patient"},
            "provenance": provenance}


def write_report(out: str, report: dict, preds: dict, source: Source) -> str:
    """Every file of the report folder; returns the path of report.html."""
    label_names = source.manifest["labels"]
    os.makedirs(out, exist_ok=True)
    rep.write_metrics_json(os.path.join(out, rep.METRICS_FILE), report)
    rep.write_per_label_csv(os.path.join(out, rep.PER_LABEL_FILE), report["labels"])
    rep.write_predictions(out, preds, label_names, [r["threshold"] for r in report["labels"].values()])
    train_prevalence = source.manifest["splits"].get("train", {}).get("prevalence")
    figures = rep.build_figures(report, preds, label_names, train_prevalence, source.history)
    path = os.path.join(out, rep.REPORT_FILE)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(rep.render_html(report, figures, dump_config(source.cfg)))
    return path


def evaluate(source: Source, split: str, out: str, ctx: dist.Context) -> dict:
    """Predict `split` on every rank; rank 0 scores it and writes the report folder."""
    check_split(source.manifest, split, source.cfg.data.records)
    if split == TUNING_SPLIT:
        log(f"warning: the thresholds were tuned on {split}; metrics at the threshold are optimistic here")
    log(f"evaluate: predicting split {split!r} on {ctx.size} rank(s)")
    preds = predict_split(source.model, source.cfg, source.manifest, split, ctx, tta=source.tta, with_ids=True)
    if not ctx.primary:
        return {}
    report = build_report(source, split, preds)
    path = write_report(out, report, preds, source)
    macro = report["macro"]
    ci = macro.get("auroc_ci")
    level = f"{report['bootstrap']['confidence']:.0%}"
    log(f"evaluate: {split} macro AUROC {rep.fmt(macro['auroc'])}"
        f"{f' ({level} CI {ci[0]:.3f}-{ci[1]:.3f})' if ci else ''} on {report['n']} images; report {path}")
    return report


def evaluate_run(workdir: str, split: str, out: str, overrides: list[str] | None = None) -> dict:
    """`medtl evaluate --workdir RUN`: the run's best checkpoint on `split`."""
    ctx = dist.init()
    return evaluate(run_source(workdir, split, overrides or [], ctx), split, out, ctx)


def export_source(model_dir: str, records: str, split: str, overrides: list[str]) -> Source:
    """An exported model on a records folder whose labels must be the export's."""
    from medtl.data.ingest import read_manifest
    from medtl.serve.export import read_meta
    from medtl.tf import tf

    meta = read_meta(model_dir)
    manifest = read_manifest(records)
    if list(manifest["labels"]) != list(meta["label_names"]):
        raise MedtlError(f"model {model_dir} was exported with labels {meta['label_names']} but {records} has "
                         f"{manifest['labels']}; evaluate it on records ingested with the same labels")
    fixed = [o for o in overrides if o.split("=")[0].strip() in
             ("evaluate.threshold_policy", "evaluate.target", "evaluate.tta")]
    if fixed:
        raise MedtlError(f"--set {fixed[0]}: an export's thresholds and TTA are fixed; re-export the run "
                         "with `medtl export --set ...` to change them")
    tree = meta["config"]
    tree["data"]["records"] = os.path.abspath(records)
    cfg = with_evaluate_overrides(load_config(raw=tree), overrides)
    check_split(manifest, split, records)
    loaded = tf.saved_model.load(model_dir)
    signature = loaded.signatures["predict_images"]
    thresholds = {"policy": meta["threshold_policy"], "target": meta["threshold_target"],
                  "tuned_on": meta["thresholds_tuned_on"], "val_records": meta["val_records"],
                  "labels": {n: {"threshold": t, "note": note} for n, t, note in
                             zip(meta["label_names"], meta["thresholds"], meta["threshold_notes"])}}
    provenance = {"exported model": os.path.abspath(model_dir),
                  "checkpoint": f"exported best checkpoint (sha256 {meta['checkpoint_sha256'][:16]})",
                  "trained on data manifest sha256": meta["data_manifest_sha256"]}
    cfg = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, tta=meta["tta"]))
    def probabilities(images, _keep=loaded):  # _keep holds the variables the signature reads
        return signature(images=images)["probabilities"]

    return Source(cfg, manifest, probabilities, "none", thresholds, provenance, meta.get("history") or None)


def evaluate_export(model_dir: str, records: str, split: str, out: str, overrides: list[str] | None = None) -> dict:
    """`medtl evaluate --model EXPORT --records DIR`: e.g. a shipped model on another site's data."""
    ctx = dist.init()
    return evaluate(export_source(model_dir, records, split, overrides or []), split, out, ctx)
