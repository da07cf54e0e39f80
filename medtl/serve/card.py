"""The model card of an export (MODEL_CARD.md and MODEL_CARD.json) as one typed, frozen `ModelCard`.

This module alone writes and reads the two files; `medtl export` builds the card from what the run
knows: the intended use (--intended-use, else DEFAULT_INTENDED_USE), the training data (the records'
manifest: counts, prevalence, the kept fields and sites, by salted id or the --site label; values
with fewer than evaluate.subgroup_min_patients patients are shown as such, not counted), metrics with
intervals, subgroups and calibration from the newest test report of the exported checkpoint (none
when there is none), the thresholds, known limits (found, and --limitation), the config and medtl's
version. Nothing in it names a patient or a study.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields

import yaml

from medtl.data.manifest import Manifest
from medtl.evaluate.calibration import describe
from medtl.evaluate.report import ReportSummary
from medtl.serve.meta import ExportMeta
from medtl.utils import fs

CARD_MD = "MODEL_CARD.md"
CARD_JSON = "MODEL_CARD.json"
DEFAULT_INTENDED_USE = (
    "Research use only. This model is not a medical device and has not been validated for clinical decisions: "
    "its outputs must not guide the care of a patient. It classifies the findings listed below on images like "
    "those it was trained on; its performance on other sites, devices or populations is unknown until it is "
    "evaluated there.")
FEW_POSITIVES = 30  # a label with fewer positives in train is named among the known limits


@dataclass(frozen=True)
class ModelCard:
    """Everything MODEL_CARD.md shows; MODEL_CARD.json is `to_dict()`."""

    title: str
    intended_use: str
    model: dict
    training_data: dict
    evaluation: dict | None  # the test report's figures, or None when the run has none for this checkpoint
    subgroups: dict | None
    calibration: dict
    thresholds: dict
    limits: list
    config: dict
    medtl_version: str
    exported_at: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelCard":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


def _splits(manifest: Manifest) -> list:
    """(name, SplitInfo) in ingest's order: train, val, test, then any other."""
    order = {"train": 0, "val": 1, "test": 2}
    return sorted(manifest.splits.items(), key=lambda item: (order.get(item[0], 3), item[0]))


def _counts(manifest: Manifest, min_patients: int) -> dict:
    """{split: {field: {value: {"records", "patients"} or {"note"}}}}; small cells are not counted."""
    out = {}
    for split, info in _splits(manifest):
        out[split] = {
            field: {(value or "unknown"): (c if c["patients"] >= min_patients
                                           else {"note": f"fewer than {min_patients} patients"})
                    for value, c in values.items()}
            for field, values in info.field_counts.items()}
    return out


def training_data(manifest: Manifest, min_patients: int) -> dict:
    counts = _counts(manifest, min_patients)
    sites = sorted({v for split in counts.values() for v in split.get("site", {})})
    return {"format": manifest.format, "data_manifest_sha256": manifest.digest(),
            "stored_image_size": manifest.stored_image_size, "bit_depth": manifest.bit_depth,
            "splits": {s: {"records": i.records, "patients": i.patients} for s, i in _splits(manifest)},
            "prevalence": {s: dict(i.prevalence) for s, i in _splits(manifest)},
            "positives_in_train": dict(manifest.splits["train"].positives) if "train" in manifest.splits else {},
            "quarantined": manifest.quarantined, "fields_kept": list(manifest.fields), "field_counts": counts,
            "sites": sites if "site" in manifest.fields else None}


def evaluation(summary: ReportSummary | None) -> dict | None:
    if summary is None:
        return None
    return {"report": os.path.abspath(summary.folder), "split": summary.split, "images": summary.images,
            "patients": summary.patients, "evaluated_at": summary.evaluated_at, "confidence": summary.confidence,
            "bootstrap_resamples": summary.resamples, "labels": summary.labels,
            "macro": {k: summary.macro.get(k) for k in ("auroc", "auroc_ci", "auprc", "auprc_ci")},
            "micro": {k: summary.micro.get(k) for k in ("auroc", "auroc_ci", "auprc", "auprc_ci", "ece")}}


def subgroups(summary: ReportSummary | None) -> dict | None:
    """Per field and group: patients, macro AUROC with its interval, the labels flagged below overall."""
    if summary is None or not summary.subgroups:
        return None
    out = {"min_patients": summary.subgroups["min_patients"], "fields": {}}
    for field, result in summary.subgroups["fields"].items():
        groups = {g: {"images": r["n"], "patients": r["patients"], "macro_auroc": r["macro"]["auroc"],
                      "macro_auroc_ci": r["macro"]["auroc_ci"], "macro_below_overall": r["macro"]["below_overall"],
                      "labels_below_overall": [n for n, row in r["labels"].items() if row["below_overall"]]}
                  for g, r in result["groups"].items()}
        out["fields"][field] = {"groups": groups, "merged": result["merged"], "suppressed": result["suppressed"]}
    return out


def calibration(meta: ExportMeta, summary: ReportSummary | None) -> dict:
    cal = meta.calibration
    if cal is None:
        return {"method": "none"}
    tested = (summary.calibration.get("labels", {}) if summary and summary.calibration.get("method") == cal.method
              else {})
    labels = {n: {"map": describe(e["params"]), "note": e["note"], "val_ece": e["val_ece"],
                  "test_ece": [tested[n]["ece_before"], tested[n]["ece_after"]] if n in tested else None}
              for n, e in cal.labels.items()}
    return {"method": cal.method, "fitted_on": cal.fitted_on, "val_records": cal.val_records, "labels": labels}


def known_limits(meta: ExportMeta, data: dict, summary: ReportSummary | None, given: tuple[str, ...]) -> list[str]:
    """The limits the run shows, then the user's (--limitation)."""
    out = list(given)
    sites = data["sites"]
    out.append(f"Trained on {len(sites)} site(s) ({', '.join(sites)})" if sites else
               "The training site(s) were not recorded (ingest --keep-fields site, or --site LABEL)")
    out[-1] += "; performance at another site is unknown until it is evaluated there."
    rare = [n for n, count in data["positives_in_train"].items() if count < FEW_POSITIVES]
    if rare:
        out.append(f"Fewer than {FEW_POSITIVES} positive training images for: {', '.join(rare)}.")
    if summary is None:
        out.append("No test-split report of this checkpoint was found in the run folder: no metrics are given "
                   "(run `medtl evaluate --workdir RUN`, then export again).")
    else:
        undefined = [n for n, r in summary.labels.items() if r["auroc"] is None]
        if undefined:
            out.append(f"No test AUROC (one class only in the test split) for: {', '.join(undefined)}.")
        out += _subgroup_limits(summary)
    if meta.calibration is None:
        out.append("The probabilities are not calibrated (evaluate.calibration: none): read them as scores.")
    else:
        out.append(f"Calibration was fitted on {meta.calibration.val_records} val images; it holds for data like them.")
    out.append("Pixels are not scrubbed: text burned into images is excluded only when DICOM's BurnedInAnnotation "
               "says so.")
    return out


def _subgroup_limits(summary: ReportSummary) -> list[str]:
    if not summary.subgroups:
        return ["No subgroup analysis was run (evaluate.subgroups)."]
    out = []
    for field, result in summary.subgroups["fields"].items():
        flagged = [f"{g} ({', '.join(n for n, r in row['labels'].items() if r['below_overall']) or 'macro'})"
                   for g, row in result["groups"].items()
                   if row["macro"]["below_overall"] or any(r["below_overall"] for r in row["labels"].values())]
        if flagged:
            out.append(f"By {field}, the interval lies below the overall figure for: {'; '.join(flagged)}.")
        if result["suppressed"]:
            out.append(f"By {field}, too few patients to report: {', '.join(result['merged'])}.")
    return out


def build_card(meta: ExportMeta, manifest: Manifest, summary: ReportSummary | None, min_patients: int,
               intended_use: str | None, limitations: tuple[str, ...], exported_at: str) -> ModelCard:
    data = training_data(manifest, min_patients)
    t = meta.thresholds
    return ModelCard(
        title=f"{meta.backbone} multi-label classifier of {len(meta.label_names)} findings",
        intended_use=intended_use or DEFAULT_INTENDED_USE,
        model={"backbone": meta.backbone, "image_size": meta.image_size, "channels": meta.channels,
               "labels": list(meta.label_names), "checkpoint_sha256": t.checkpoint_sha256, "tta": meta.tta,
               "base_weights": meta.config["model"]["weights"]},
        training_data=data, evaluation=evaluation(summary), subgroups=subgroups(summary),
        calibration=calibration(meta, summary),
        thresholds={"policy": t.policy, "target": t.target, "tuned_on": t.tuned_on, "val_records": t.val_records,
                    "calibration": t.calibration, "labels": t.labels},
        limits=known_limits(meta, data, summary, limitations), config=meta.config,
        medtl_version=meta.medtl_version, exported_at=exported_at)


# --------------------------------------------------------------------------- Markdown


def _num(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ci(value, ci) -> str:
    return _num(value) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _table(header: list[str], rows: list[list]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""])


def _data_lines(data: dict) -> list[str]:
    lines = [f"Records of format `{data['format']}` (manifest sha256 {data['data_manifest_sha256']}), stored at "
             f"{data['stored_image_size']} px, {data['bit_depth']} bit; {data['quarantined']} input(s) quarantined.",
             ""]
    labels = list(data["positives_in_train"])
    lines += _table(["split", "images", "patients"] + [f"{n} prevalence" for n in labels],
                    [[s, i["records"], i["patients"]] + [f"{(data['prevalence'][s].get(n) or 0):.1%}" for n in labels]
                     for s, i in data["splits"].items()])
    lines.append(f"Fields kept at ingest: {', '.join(data['fields_kept']) or 'none'}.")
    lines.append(f"Sites: {', '.join(data['sites'])}." if data["sites"] is not None else "Sites: not recorded.")
    lines.append("")
    for field in data["fields_kept"]:
        cells = [[s, value, c.get("records", ""), c.get("patients", c.get("note", ""))]
                 for s, split in data["field_counts"].items() for value, c in split.get(field, {}).items()]
        lines += [f"By {field}:", ""] + _table(["split", field, "images", "patients"], cells)
    return lines


def _evaluation_lines(ev: dict | None) -> list[str]:
    if ev is None:
        return ["None: no test-split report of this checkpoint was found in the run folder.", ""]
    lines = [f"{ev['split']} split: {ev['images']} images of {ev['patients']} patients, evaluated "
             f"{ev['evaluated_at']} UTC; {ev['confidence']:.0%} intervals from {ev['bootstrap_resamples']} "
             "patient-level bootstrap resamples.", ""]
    rows = [[n, r["n"], r["positives"], _ci(r["auroc"], r["auroc_ci"]), _ci(r["auprc"], r["auprc_ci"]),
             _num(r["ece"])] for n, r in ev["labels"].items()]
    rows += [["macro", "", "", _ci(ev["macro"]["auroc"], ev["macro"]["auroc_ci"]),
              _ci(ev["macro"]["auprc"], ev["macro"]["auprc_ci"]), ""],
             ["micro", "", "", _ci(ev["micro"]["auroc"], ev["micro"]["auroc_ci"]),
              _ci(ev["micro"]["auprc"], ev["micro"]["auprc_ci"]), _num(ev["micro"]["ece"])]]
    return lines + _table(["label", "images", "positives", "AUROC [CI]", "AUPRC [CI]", "ECE"], rows)


def _subgroup_lines(sub: dict | None) -> list[str]:
    if sub is None:
        return ["None (evaluate.subgroups was not set for the test report).", ""]
    lines = [f"Groups with fewer than {sub['min_patients']} patients are merged into `other`, suppressed when "
             "still that small; a flag marks an interval below the overall figure.", ""]
    for field, result in sub["fields"].items():
        rows = [[g, r["images"], r["patients"], _ci(r["macro_auroc"], r["macro_auroc_ci"])
                 + (" (below overall)" if r["macro_below_overall"] else ""),
                 ", ".join(r["labels_below_overall"]) or "-"] for g, r in result["groups"].items()]
        lines += [f"By {field}:", ""] + _table(["group", "images", "patients", "macro AUROC [CI]",
                                                "labels below overall"], rows)
        if result["merged"]:
            lines += [f"Merged into other: {', '.join(result['merged'])}"
                      + ("; suppressed." if result["suppressed"] else "."), ""]
    return lines


def _calibration_lines(cal: dict) -> list[str]:
    if cal["method"] == "none":
        return ["None: the probabilities are the model's own.", ""]
    lines = [f"{cal['method']}, fitted per label on {cal['fitted_on']} ({cal['val_records']} images) before the "
             "thresholds were tuned; the SavedModel and `medtl predict` return the calibrated probabilities.", ""]
    rows = [[n, r["map"], f"{_num(r['val_ece'][0])} -> {_num(r['val_ece'][1])}",
             f"{_num(r['test_ece'][0])} -> {_num(r['test_ece'][1])}" if r["test_ece"] else "n/a", r["note"] or ""]
            for n, r in cal["labels"].items()]
    return lines + _table(["label", "map", "val ECE", "test ECE", "note"], rows)


def to_markdown(card: ModelCard) -> str:
    t = card.thresholds
    m = card.model
    lines = [f"# Model card: {card.title}", "",
             f"medtl {card.medtl_version}, exported {card.exported_at} UTC; checkpoint sha256 "
             f"{m['checkpoint_sha256']}.", "", "## Intended use", "", card.intended_use, "", "## Model", "",
             f"{m['backbone']} at {m['image_size']} px, {m['channels']} channel(s), base weights "
             f"`{m['base_weights']}`, test-time augmentation {m['tta']}. Labels: {', '.join(m['labels'])}.", "",
             "## Training data", "", *_data_lines(card.training_data), "## Metrics", "",
             *_evaluation_lines(card.evaluation), "## Subgroups", "", *_subgroup_lines(card.subgroups),
             "## Calibration", "", *_calibration_lines(card.calibration), "## Thresholds", "",
             f"Policy {t['policy']} (target {t['target']}), tuned per label on {t['tuned_on']} ({t['val_records']} "
             f"images), on {t['calibration']} probabilities.", "",
             *_table(["label", "threshold", "note"], [[n, f"{r['threshold']:.4f}", r["note"] or ""]
                                                       for n, r in t["labels"].items()]),
             "## Known limits", "", *[f"- {limit}" for limit in card.limits], "",
             "## Config", "", "```yaml", yaml.safe_dump(card.config, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def write_card(folder: str, card: ModelCard) -> str:
    """Both files into `folder`; returns MODEL_CARD.md's path."""
    fs.write_text_atomic(os.path.join(folder, CARD_JSON), json.dumps(card.to_dict(), indent=2) + "\n")
    fs.write_text_atomic(os.path.join(folder, CARD_MD), to_markdown(card))
    return os.path.join(folder, CARD_MD)


def read_card(folder: str) -> ModelCard:
    with open(os.path.join(folder, CARD_JSON), encoding="utf-8") as fh:
        return ModelCard.from_dict(json.load(fh))
