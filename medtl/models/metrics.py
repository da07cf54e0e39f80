"""Per-label metrics with scikit-learn: ranking (AUROC, AUPRC), operating point, calibration.

Uncertain labels (mask 0) are excluded label by label. A label whose known
entries are all one class gets None for its ranking metrics and a note saying why.
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score


def known(mask: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    """(n, L) bool: True where the label is known."""
    return np.ones(shape, bool) if mask is None else np.asarray(mask) > 0


def undefined_reason(y: np.ndarray) -> str:
    """Why AUROC is undefined for these 0/1 labels, or '' when it is defined."""
    if len(y) == 0:
        return "n/a: no known labels"
    positives = int(np.sum(y))
    if positives == 0:
        return "n/a: no positives"
    if positives == len(y):
        return "n/a: no negatives"
    return ""


def ranking_metrics(y: np.ndarray, probs: np.ndarray, sample_weight: np.ndarray | None = None) -> tuple:
    """(auroc, auprc) for one label, or (None, None) when one class is missing."""
    if sample_weight is not None:
        used = sample_weight > 0
        if undefined_reason(y[used]):
            return None, None
    elif undefined_reason(y):
        return None, None
    return (float(roc_auc_score(y, probs, sample_weight=sample_weight)),
            float(average_precision_score(y, probs, sample_weight=sample_weight)))


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def operating_metrics(y: np.ndarray, probs: np.ndarray, threshold: float) -> dict:
    """Sensitivity, specificity, PPV, NPV, F1 and the confusion counts at `probs >= threshold`.

    A ratio whose denominator is zero (e.g. PPV with no predicted positives) is None.
    """
    predicted = (probs >= threshold).astype(int)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y.astype(int), predicted, labels=[0, 1]).ravel())
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    return {"threshold": float(threshold), "tp": tp, "fp": fp, "tn": tn, "fn": fn,
            "sensitivity": recall, "specificity": _ratio(tn, tn + fp), "ppv": precision,
            "npv": _ratio(tn, tn + fn), "f1": f1}


def calibration_bins(y: np.ndarray, probs: np.ndarray, bins: int) -> dict:
    """Equal-width bins over [0, 1] as sklearn's calibration_curve draws them, with their counts.

    Returns {'count', 'mean_predicted', 'fraction_positive'} per bin ((bins,) arrays, NaN where empty).
    """
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Same bin assignment as sklearn.calibration.calibration_curve(strategy="uniform").
    ids = np.searchsorted(edges[1:-1], probs)
    count = np.bincount(ids, minlength=bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_predicted = np.bincount(ids, weights=probs, minlength=bins) / count
        fraction_positive = np.bincount(ids, weights=y, minlength=bins) / count
    return {"count": count, "mean_predicted": mean_predicted, "fraction_positive": fraction_positive}


def expected_calibration_error(y: np.ndarray, probs: np.ndarray, bins: int = 10) -> float | None:
    """ECE: sum over bins of (bin share) x |fraction positive - mean predicted probability|."""
    if len(y) == 0:
        return None
    b = calibration_bins(y, probs, bins)
    full = b["count"] > 0
    gaps = np.abs(b["fraction_positive"][full] - b["mean_predicted"][full])
    return float(np.sum(b["count"][full] / len(y) * gaps))


def label_metrics(y: np.ndarray, probs: np.ndarray, threshold: float, bins: int = 10) -> dict:
    """Every metric of one label over its known entries (1-D arrays)."""
    positives = int(y.sum())
    auroc, auprc = ranking_metrics(y, probs)
    row = {"n": int(len(y)), "positives": positives, "prevalence": _ratio(positives, len(y)),
           "auroc": auroc, "auprc": auprc, "note": undefined_reason(y),
           "ece": expected_calibration_error(y, probs, bins)}
    row.update(operating_metrics(y, probs, threshold))
    return row


def per_label_metrics(y: np.ndarray, probs: np.ndarray, label_names, mask: np.ndarray | None = None,
                      thresholds=None, bins: int = 10) -> dict:
    """{label: metrics} for (n, L) arrays; `thresholds` (L,) defaults to 0.5 for every label."""
    keep = known(mask, y.shape)
    thresholds = [0.5] * len(label_names) if thresholds is None else thresholds
    out = {}
    for i, name in enumerate(label_names):
        k = keep[:, i]
        row = label_metrics(y[k, i], probs[k, i], thresholds[i], bins)
        row["excluded"] = int((~k).sum())
        out[name] = row
    return out


def micro_metrics(y: np.ndarray, probs: np.ndarray, mask: np.ndarray | None = None,
                  sample_weight: np.ndarray | None = None) -> tuple:
    """(auroc, auprc) over all known (record, label) pairs pooled; sample_weight is per record."""
    keep = known(mask, y.shape)
    weights = None if sample_weight is None else np.broadcast_to(sample_weight[:, None], y.shape)[keep]
    return ranking_metrics(y[keep], probs[keep], weights)


def summary_metrics(y: np.ndarray, probs: np.ndarray, label_names, mask: np.ndarray | None = None,
                    thresholds=None, bins: int = 10) -> dict:
    """Per-label metrics plus macro (mean over labels where defined) and micro (pooled) averages."""
    labels = per_label_metrics(y, probs, label_names, mask, thresholds, bins)
    macro = {}
    for key in ("auroc", "auprc", "sensitivity", "specificity", "ppv", "npv", "f1", "ece"):
        values = [r[key] for r in labels.values() if r[key] is not None]
        macro[key] = float(np.mean(values)) if values else None
    macro["labels_averaged"] = sum(r["auroc"] is not None for r in labels.values())
    auroc, auprc = micro_metrics(y, probs, mask)
    keep = known(mask, y.shape)
    micro = {"auroc": auroc, "auprc": auprc, "ece": expected_calibration_error(y[keep], probs[keep], bins)}
    return {"n": int(len(y)), "labels": labels, "macro": macro, "micro": micro}
