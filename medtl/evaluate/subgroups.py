"""AUROC and AUPRC by subgroup (evaluate.subgroups): for each field kept at ingest (medtl.data.fields),
per value, with the report's patient-level bootstrap intervals.

- A value with fewer than evaluate.subgroup_min_patients patients is merged into "other"; "other" is
  suppressed when it is still that small. The report names merged and suppressed values, never their
  patient counts (small cells can single out patients). "" (not known at ingest) is the group "unknown".
- A group is flagged when its interval lies below the overall figure: the upper end of its AUROC
  interval under the overall AUROC of that label, or (macro) under the overall mean over the labels
  the group has both classes of (a group without positives of a label averages fewer labels).
"""
from __future__ import annotations

import numpy as np

from medtl.config import Config
from medtl.data.manifest import Manifest
from medtl.errors import MedtlError
from medtl.evaluate.bootstrap import bootstrap_distributions, percentile_interval
from medtl.models.metrics import known, ranking_metrics, undefined_reason

OTHER = "other"
UNKNOWN = "unknown"


def check_subgroup_fields(fields: tuple[str, ...], manifest: Manifest, records: str) -> None:
    """One line naming the first asked-for field that the records do not carry, and the fix."""
    missing = [f for f in fields if f not in manifest.fields]
    if missing:
        kept = ", ".join(manifest.fields) or "none"
        wanted = ",".join(dict.fromkeys(list(manifest.fields) + list(fields)))
        raise MedtlError(f"evaluate.subgroups: field {missing[0]!r} was not kept at ingest of {records} (kept: {kept}); "
                         f"re-ingest with --keep-fields {wanted}")


def assign_groups(values: np.ndarray, patients: np.ndarray, min_patients: int) -> tuple[np.ndarray, list, list]:
    """(each record's group, or "" when suppressed; values merged into "other"; groups suppressed)."""
    values = np.where(values == "", UNKNOWN, values)
    count = {v: len(np.unique(patients[values == v])) for v in np.unique(values)}
    merged = sorted(v for v, c in count.items() if c < min_patients)
    groups = np.where(np.isin(values, merged), OTHER, values)
    suppressed = []
    if merged and len(np.unique(patients[groups == OTHER])) < min_patients:
        suppressed = [OTHER]
        groups = np.where(groups == OTHER, "", groups)
    return groups, merged, suppressed


def _interval(draws: np.ndarray, value, confidence: float):
    ci = percentile_interval(draws, confidence) if value is not None else None
    return list(ci) if ci else None


def _below(ci, overall) -> bool:
    return bool(ci is not None and overall is not None and ci[1] < overall)


def score_group(y, probs, mask, patients, label_names, overall: dict, cfg: Config) -> dict:
    """One group's per-label and macro AUROC/AUPRC with intervals and flags."""
    ev = cfg.evaluate
    keep = known(mask, y.shape)
    draws = (bootstrap_distributions(y, probs, mask, patients, ev.bootstrap, ev.seed) if ev.bootstrap else None)
    labels = {}
    for i, name in enumerate(label_names):
        yi, pi = y[keep[:, i], i], probs[keep[:, i], i]
        auroc, auprc = ranking_metrics(yi, pi)
        row = {"n": int(len(yi)), "positives": int(yi.sum()), "auroc": auroc, "auprc": auprc,
               "note": undefined_reason(yi)}
        for key, value in (("auroc", auroc), ("auprc", auprc)):
            row[f"{key}_ci"] = _interval(draws[key][:, i], value, ev.confidence) if draws else None
        row["below_overall"] = _below(row["auroc_ci"], overall["labels"][name]["auroc"])
        labels[name] = row
    defined = [n for n, r in labels.items() if r["auroc"] is not None and overall["labels"][n]["auroc"] is not None]
    macro = {"auroc": float(np.mean([labels[n]["auroc"] for n in defined])) if defined else None,
             "auprc": float(np.mean([labels[n]["auprc"] for n in defined])) if defined else None,
             "labels_averaged": len(defined),
             "overall_same_labels": float(np.mean([overall["labels"][n]["auroc"] for n in defined])) if defined else None}
    for key in ("auroc", "auprc"):
        macro[f"{key}_ci"] = _interval(draws[f"macro_{key}"], macro[key], ev.confidence) if draws and defined else None
    macro["below_overall"] = _below(macro["auroc_ci"], macro["overall_same_labels"])
    return {"n": int(len(y)), "patients": int(len(np.unique(patients))), "labels": labels, "macro": macro}


def analyse(values_by_field: dict[str, np.ndarray], preds: dict, label_names, overall: dict, cfg: Config) -> dict:
    """metrics.json's "subgroups": per field, its groups' scores, and the values merged and suppressed."""
    min_patients = cfg.evaluate.subgroup_min_patients
    fields = {}
    for field, values in values_by_field.items():
        groups, merged, suppressed = assign_groups(values, preds["patient"], min_patients)
        scored = {}
        for group in sorted(set(groups) - {""}, key=lambda g: (g in (OTHER, UNKNOWN), g)):
            rows = groups == group
            scored[group] = score_group(preds["labels"][rows], preds["probs"][rows], preds["mask"][rows],
                                        preds["patient"][rows], label_names, overall, cfg)
        fields[field] = {"groups": scored, "merged": merged, "suppressed": suppressed}
    return {"min_patients": min_patients, "fields": fields}


def subgroup_report(cfg: Config, manifest: Manifest, split: str, preds: dict, overall: dict,
                    label_names=None) -> dict | None:
    """The subgroups of `split` by evaluate.subgroups (None when none are asked for), each record's field
    values read from its shards by key; `label_names` are the scored labels (default: the manifest's)."""
    names = cfg.evaluate.subgroups
    if not names:
        return None
    from medtl.data.pipeline import shard_paths
    from medtl.data.records import read_fields

    by_key = read_fields(shard_paths(cfg.data.records, manifest, split), names)
    values = {f: np.array([by_key[k][f] for k in preds["key"]], dtype=object).astype(str) for f in names}
    return analyse(values, preds, tuple(label_names or manifest.labels), overall, cfg)
