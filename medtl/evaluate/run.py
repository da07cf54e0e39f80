"""`medtl evaluate`: predict a split (all ranks), score it with val-tuned thresholds, write the report.

Calibration and thresholds: `evaluate` (and `export`) fit them on the val split when the run has
none yet, or when the checkpoint, calibration, policy, target or TTA changed since: first the
calibration (evaluate.calibration; medtl.evaluate.calibration), then the thresholds on the calibrated
val probabilities. The run folder keeps both (RunDir.write_calibration, write_thresholds). `train`
does not tune them, so changing either needs no retraining. An exported model is evaluated through
the same `evaluate` (see medtl.serve.evaluate). Reports of a run are recorded in its folder
(RunDir.record_output), whose index.html links them.
"""
from __future__ import annotations

import dataclasses
import datetime
import os

import numpy as np

import medtl
from medtl import dist
from medtl.config import Config, dump_config
from medtl.data.manifest import Manifest
from medtl.errors import MedtlError, RunFailure
from medtl.evaluate import report as rep
from medtl.evaluate.bootstrap import bootstrap_distributions, percentile_interval
from medtl.evaluate.calibration import apply_calibration, calibration_summary, fit_calibration
from medtl.evaluate.checks import check_split, read_run_inputs, with_evaluate_overrides  # noqa: F401 (re-exported)
from medtl.evaluate.curve import LearningCurve, read_learning_curve
from medtl.evaluate.external import ExternalValidation, external_summary
from medtl.evaluate.overfit import analyse_overfitting, run_setup
from medtl.evaluate.subgroups import subgroup_report
from medtl.evaluate.thresholds import tune_thresholds
from medtl.models.metrics import summary_metrics
from medtl.models.predict import predict_split
from medtl.train.rundir import Calibration, RunDir, RunOutput, SplitMetrics, Thresholds, epoch_points, load_run
from medtl.utils import fs
from medtl.utils.log import log

TUNING_SPLIT = "val"


@dataclasses.dataclass
class Source:
    """What is evaluated: a run's best checkpoint, or an exported model on some records."""

    cfg: Config
    manifest: Manifest
    # A Keras model (logits), or a callable images -> probabilities (an export, TTA inside).
    model: object
    # TTA applied around `model` by predict_split.
    tta: str
    thresholds: Thresholds
    provenance: dict
    history: list | None
    # Maps the model's probabilities to the reported ones (None: reported as they are).
    calibration: Calibration | None = None
    # The run folder (None for an export): reports are recorded there, and its index.html refreshed.
    run: RunDir | None = None
    # Absolute paths the report links to ("run index", "model card"), when they exist.
    links: dict = dataclasses.field(default_factory=dict)
    # External validation (an export on another site's records): the labels evaluated, the internal result.
    external: ExternalValidation | None = None
    # With evaluate.saliency: images (batch, size, size, c) -> (batch, size, size, K) Grad-CAM maps in
    # [0, 1] of the evaluated labels (label_names order).
    saliency: object = None

    @property
    def label_names(self) -> tuple[str, ...]:
        """The labels scored: the model's, or under a label map those mapped to a records label."""
        return self.external.mapping.evaluated if self.external else tuple(self.manifest.labels)

    def train_prevalence(self) -> dict | None:
        train = self.manifest.splits.get("train")
        if train is None:
            return None
        return self.external.mapping.train_prevalence(train.prevalence) if self.external else train.prevalence


def _thresholds_stale(saved: Thresholds | None, cfg: Config, digest: str, label_names) -> bool:
    if not saved:
        return True
    ev = cfg.evaluate
    return (saved.checkpoint_sha256 != digest or saved.policy != ev.threshold_policy
            or saved.target != ev.target or saved.tta != ev.tta or saved.calibration != ev.calibration
            or list(saved.labels) != list(label_names))


def _calibration_stale(saved: Calibration | None, cfg: Config, digest: str, label_names) -> bool:
    ev = cfg.evaluate
    if ev.calibration == "none":
        return False
    return (not saved or saved.method != ev.calibration or saved.checkpoint_sha256 != digest
            or saved.tta != ev.tta or list(saved.labels) != list(label_names))


def _saved_tuning(run: RunDir, cfg: Config, digest: str, label_names) -> tuple | None:
    """(thresholds, calibration or None) saved for this checkpoint and these settings, or None."""
    thresholds, calibration = run.read_thresholds(), run.read_calibration()
    if _thresholds_stale(thresholds, cfg, digest, label_names) or _calibration_stale(calibration, cfg, digest,
                                                                                     label_names):
        return None
    return thresholds, calibration if cfg.evaluate.calibration != "none" else None


def check_finite(probs: np.ndarray, split: str, model: str) -> None:
    """One line, not a scikit-learn traceback, when a model predicts NaN or infinity (a diverged checkpoint)."""
    bad = ~np.isfinite(probs).all(axis=1)
    if bad.any():
        raise RunFailure(f"{model} predicts non-finite probabilities (NaN or infinity) for {int(bad.sum())} of "
                         f"{len(probs)} records of split {split!r}: its weights are not finite or the run diverged; "
                         "evaluate an earlier checkpoint or train again with a lower learning rate")


def load_or_tune(run: RunDir, cfg: Config, manifest: Manifest, model,
                 ctx: dist.Context) -> tuple[Thresholds, Calibration | None]:
    """The run's calibration and thresholds for its best checkpoint, fitted again on val (all ranks
    predict) when missing or stale: the calibration first, then the thresholds on calibrated probabilities."""
    digest = fs.sha256(run.best_weights) if ctx.primary else ""
    saved = _saved_tuning(run, cfg, digest, manifest.labels) if ctx.primary else None
    saved = dist.broadcast_object(ctx, saved, "medtl_thresholds")
    if saved is not None:
        return saved
    check_split(manifest, TUNING_SPLIT, cfg.data.records, "tune the operating thresholds on")
    ev = cfg.evaluate
    val = predict_split(model, cfg, manifest, TUNING_SPLIT, ctx, tta=ev.tta)
    check_finite(val["probs"], TUNING_SPLIT, run.best_weights)
    calibration, probs = None, val["probs"]
    if ev.calibration != "none":
        calibration = fit_calibration(ev.calibration, val["labels"], probs, val["mask"], manifest.labels,
                                      ev.calibration_bins, ev.tta, digest)
        probs = apply_calibration(calibration, probs, manifest.labels)
        log(f"evaluate: {ev.calibration} calibration fitted on {TUNING_SPLIT} ({len(probs)} records) per label")
    log(f"evaluate: tuning thresholds on {TUNING_SPLIT} ({ev.threshold_policy}"
        f"{'' if ev.threshold_policy in ('youden', 'f1') else f', target {ev.target}'}"
        f"{'' if calibration is None else f', on {ev.calibration}-calibrated probabilities'})")
    tuned = Thresholds(policy=ev.threshold_policy, target=ev.target, tta=ev.tta, tuned_on=TUNING_SPLIT,
                       val_records=len(probs), checkpoint_sha256=digest, medtl_version=medtl.__version__,
                       labels=tune_thresholds(val["labels"], probs, val["mask"], manifest.labels,
                                              ev.threshold_policy, ev.target), calibration=ev.calibration)
    run.write_calibration(calibration)
    run.write_thresholds(tuned)
    return tuned, calibration


def run_source(workdir: str, split: str, overrides: list[str], ctx: dist.Context) -> Source:
    """A run folder's best checkpoint, with its calibration and thresholds (fitted on val if needed)."""
    cfg, manifest = read_run_inputs(workdir, overrides, split)  # before the model loads and tuning starts
    _, _, model = load_run(workdir)
    run = RunDir(workdir, ctx.primary)
    thresholds, calibration = load_or_tune(run, cfg, manifest, model, ctx)
    provenance = {
        "run": os.path.abspath(workdir),
        "checkpoint": f"{run.best_weights_label} (sha256 {thresholds.checkpoint_sha256[:16]})",
    }
    saliency = None
    if cfg.evaluate.saliency:
        from medtl.models.saliency import build_gradcam_fn

        saliency = build_gradcam_fn(model, cfg.evaluate.tta)
    return Source(cfg, manifest, model, cfg.evaluate.tta, thresholds, provenance, run.read_history(),
                  calibration, run, _run_links(run, thresholds.checkpoint_sha256), saliency=saliency)


def _run_links(run: RunDir, checkpoint_sha256: str) -> dict:
    """The run's index and the model card of its newest export of this checkpoint, if any."""
    cards = run.outputs_of("export", checkpoint_sha256)
    return {"run index": os.path.abspath(os.path.join(run.path, RunDir.INDEX)),
            "model card": os.path.join(cards[0].path, cards[0].document) if cards else None}


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


def base_provenance(weights: str) -> str:
    """What the base started from: imagenet, none (random), or a file and, for a pretrained base, its sidecar."""
    from medtl.models import basefile

    if weights in ("imagenet", "none"):
        return {"imagenet": "ImageNet (Keras)", "none": "random initialisation"}[weights]
    try:
        meta = basefile.read_meta(weights)
    except MedtlError:
        meta = None
    if meta is None:
        return weights
    return (f"{weights} ({meta.method} pretraining, {meta.epochs} epoch(s) at {meta.image_size} px on records "
            f"{meta.records_digest[:16]})")


def load_curve(cfg: Config) -> LearningCurve | None:
    """evaluate.learning_curve's curve (read before predicting: a wrong path stops at start), or None."""
    return read_learning_curve(cfg.evaluate.learning_curve) if cfg.evaluate.learning_curve else None


def overfitting(source: Source, curve: LearningCurve | None) -> dict:
    """metrics.json's overfitting entry: the finding on the run's history, with the settings it used."""
    ev = source.cfg.evaluate
    finding = analyse_overfitting(epoch_points(source.history), ev.overfit_patience, ev.overfit_gap,
                                  run_setup(source.cfg), curve)
    return {**finding.to_dict(), "patience": ev.overfit_patience, "gap": ev.overfit_gap,
            "learning_curve": curve.to_dict() if curve else None}


def build_report(source: Source, split: str, preds: dict, curve: LearningCurve | None = None) -> dict:
    """metrics.json's content: metrics at the saved thresholds, intervals, thresholds, provenance, and the
    overfitting finding."""
    cfg, manifest, ev = source.cfg, source.manifest, source.cfg.evaluate
    label_names = source.label_names
    thresholds = source.thresholds.values(label_names)
    summary = summary_metrics(preds["labels"], preds["probs"], label_names, preds["mask"], thresholds,
                              ev.calibration_bins)
    add_intervals(summary, preds, cfg)
    for name, row in summary["labels"].items():
        row["threshold_note"] = source.thresholds.labels[name]["note"]
    from medtl.tf import tf

    provenance = {
        "split": split, "data records": cfg.data.records, "data manifest sha256": manifest.digest(),
        "model": f"{cfg.model.backbone} at {cfg.data.image_size} px, {cfg.data.channels} channel(s)",
        "base weights": base_provenance(cfg.model.weights),
        **source.provenance,
        "test-time augmentation": ev.tta, "medtl version": medtl.__version__, "tensorflow": tf.__version__,
        "evaluated at (UTC)": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
    }
    t = source.thresholds
    thr = {"policy": t.policy, "target": t.target, "tuned_on": t.tuned_on, "val_records": t.val_records,
           "labels": t.labels}
    report = {"split": split, "n": summary["n"], "patients": int(len(np.unique(preds["patient"]))),
              "labels": summary["labels"], "macro": summary["macro"], "micro": summary["micro"],
              "thresholds": thr, "calibration_bins": ev.calibration_bins,
              "phases": rep.phase_summary(source.history, cfg),
              "bootstrap": {"resamples": ev.bootstrap, "seed": ev.seed, "confidence": ev.confidence,
                            "unit": "patient"},
              "overfitting": overfitting(source, curve), "provenance": provenance}
    if source.external:
        report["external"] = external_summary(report, source.external)
    return add_clinical_sections(report, source, split, preds)


# --------------------------------------------------------------------------- calibration, subgroups, links


def calibrate(preds: dict, source: Source) -> dict:
    """The predictions with calibrated `probs` (in place); the model's own are kept as `raw_probs`."""
    if source.calibration is not None:
        preds["raw_probs"] = preds["probs"]
        preds["probs"] = apply_calibration(source.calibration, preds["probs"], source.manifest.labels)
    return preds


def add_clinical_sections(report: dict, source: Source, split: str, preds: dict) -> dict:
    """metrics.json's checkpoint, calibration (ECE before and after) and subgroups, in place."""
    ev, labels = source.cfg.evaluate, source.label_names
    report["checkpoint_sha256"] = source.thresholds.checkpoint_sha256
    report["calibration"] = calibration_summary(source.calibration, preds["labels"], preds.get("raw_probs"),
                                                preds["probs"], preds["mask"], labels, ev.calibration_bins)
    report["subgroups"] = subgroup_report(source.cfg, source.manifest, split, preds, report, labels)
    report["fields_kept"] = list(source.manifest.fields)
    return report


def _relative_links(source: Source, out: str) -> dict:
    """The report's links (run index, model card) relative to its folder; None where there is none."""
    return {name: os.path.relpath(path, os.path.abspath(out)) if path else None
            for name, path in source.links.items()}


def record_report(source: Source, split: str, out: str, report: dict) -> None:
    """List the report in its run folder (outputs.json), which refreshes the run's index.html."""
    if source.run is None:
        return
    macro, ci = report["macro"], report["macro"].get("auroc_ci")
    summary = f"macro AUROC {rep.fmt(macro['auroc'])}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
    summary += f", {report['n']} images" + (f", {report['calibration']['method']} calibration"
                                            if report["calibration"]["method"] != "none" else "")
    source.run.record_output(RunOutput(
        kind="report", path=os.path.abspath(out), document=rep.REPORT_FILE, split=split, summary=summary,
        written_at=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        checkpoint_sha256=source.thresholds.checkpoint_sha256))


def write_report(out: str, report: dict, preds: dict, source: Source, extra_figures: dict | None = None) -> str:
    """Every file of the report folder; returns the path of report.html."""
    label_names = source.label_names
    os.makedirs(out, exist_ok=True)
    report["links"] = _relative_links(source, out)
    rep.write_metrics_json(os.path.join(out, rep.METRICS_FILE), report)
    rep.write_per_label_csv(os.path.join(out, rep.PER_LABEL_FILE), report["labels"])
    rep.write_predictions(out, preds, label_names, [r["threshold"] for r in report["labels"].values()])
    figures = rep.build_figures(report, preds, label_names, source.train_prevalence(), source.history)
    figures.update(extra_figures or {})
    path = os.path.join(out, rep.REPORT_FILE)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(rep.render_html(report, figures, dump_config(source.cfg)))
    return path


def evaluate(source: Source, split: str, out: str, ctx: dist.Context) -> dict:
    """Predict `split` on every rank; rank 0 scores it and writes the report folder."""
    check_split(source.manifest, split, source.cfg.data.records)
    if split == TUNING_SPLIT:
        fitted = "thresholds and calibration were" if source.calibration is not None else "thresholds were"
        log(f"warning: the {fitted} tuned on {split}; metrics at the threshold are optimistic here")
    curve = load_curve(source.cfg)
    log(f"evaluate: predicting split {split!r} on {ctx.size} rank(s)")
    preds = predict_split(source.model, source.cfg, source.manifest, split, ctx, tta=source.tta, with_ids=True)
    check_finite(preds["probs"], split, source.run.best_weights if source.run else "the exported model")
    if not ctx.primary:
        return {}
    if source.external:
        preds = source.external.mapping.select(preds)
    report = build_report(source, split, calibrate(preds, source), curve)
    figures = {}
    if source.saliency is not None:
        from medtl.evaluate.saliency import saliency_section

        report["saliency"], figures = saliency_section(source, split, preds, report)
    path = write_report(out, report, preds, source, figures)
    record_report(source, split, out, report)
    found = report["overfitting"]
    if found["flagged"]:
        log(f"evaluate: warning: the run overfits: {found['reasons'][0]}; remedies it did not use: "
            + "; ".join(r.split(":")[0] for r in found["remedies"]) + " (see the report's Overfitting section)")
    macro = report["macro"]
    ci = macro.get("auroc_ci")
    level = f"{report['bootstrap']['confidence']:.0%}"
    log(f"evaluate: {split} macro AUROC {rep.fmt(macro['auroc'])}"
        f"{f' ({level} CI {ci[0]:.3f}-{ci[1]:.3f})' if ci else ''} on {report['n']} images; report {path}")
    return report


def evaluate_run(workdir: str, split: str, out: str, overrides: list[str] | None = None) -> dict:
    """`medtl evaluate --workdir RUN`: the run's best checkpoint on `split`; the run folder keeps the
    split's figures (an export carries the test split's, see medtl.serve.export)."""
    ctx = dist.init()
    source = run_source(workdir, split, overrides or [], ctx)
    report = evaluate(source, split, out, ctx)
    if report:
        RunDir(workdir, ctx.primary).write_split_metrics(split_metrics(report, source))
    return report


def split_metrics(report: dict, source: Source) -> SplitMetrics:
    """What the run folder keeps of a report: counts, AUROC and AUPRC with intervals."""
    keys = ("n", "positives", "prevalence", "auroc", "auroc_ci", "auprc", "auprc_ci")
    boot = report["bootstrap"]
    return SplitMetrics(
        split=report["split"], checkpoint_sha256=source.thresholds.checkpoint_sha256, tta=source.cfg.evaluate.tta,
        n=report["n"], patients=report["patients"], confidence=boot["confidence"], bootstrap=boot["resamples"],
        labels={name: {k: row.get(k) for k in keys} for name, row in report["labels"].items()},
        macro={k: report["macro"].get(k) for k in ("auroc", "auroc_ci", "auprc", "auprc_ci", "labels_averaged")},
        evaluated_at=report["provenance"]["evaluated at (UTC)"], medtl_version=medtl.__version__)
