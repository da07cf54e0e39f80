"""Per-label ranking metrics with scikit-learn, masking uncertain labels per label."""
from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score


def _valid(y: np.ndarray, mask: np.ndarray | None, i: int) -> np.ndarray:
    return np.ones(len(y), bool) if mask is None else mask[:, i] > 0


def per_label_metrics(y: np.ndarray, probs: np.ndarray, label_names, mask: np.ndarray | None = None) -> dict:
    """{label: {auroc, auprc, prevalence, positives, n, excluded, note}} for (n, L) arrays.

    A label whose known entries are all one class gets auroc/auprc None and a note.
    """
    out = {}
    for i, name in enumerate(label_names):
        keep = _valid(y, mask, i)
        yi, pi = y[keep, i], probs[keep, i]
        positives = int(yi.sum())
        row = {"n": int(keep.sum()), "excluded": int((~keep).sum()), "positives": positives,
               "prevalence": positives / len(yi) if len(yi) else None, "auroc": None, "auprc": None, "note": ""}
        if positives == 0 or positives == len(yi):
            row["note"] = "n/a: no positives" if positives == 0 else "n/a: no negatives"
        else:
            row["auroc"] = float(roc_auc_score(yi, pi))
            row["auprc"] = float(average_precision_score(yi, pi))
        out[name] = row
    return out


def summary_metrics(y: np.ndarray, probs: np.ndarray, label_names, mask: np.ndarray | None = None) -> dict:
    """Per-label metrics plus macro (mean over defined labels) and micro (pooled) averages."""
    labels = per_label_metrics(y, probs, label_names, mask)
    keep = np.ones_like(y, bool) if mask is None else mask > 0
    macro = {}
    for key in ("auroc", "auprc"):
        values = [r[key] for r in labels.values() if r[key] is not None]
        macro[key] = float(np.mean(values)) if values else None
    flat_y, flat_p = y[keep], probs[keep]
    micro = {"auroc": None, "auprc": None}
    if 0 < flat_y.sum() < len(flat_y):
        micro = {"auroc": float(roc_auc_score(flat_y, flat_p)),
                 "auprc": float(average_precision_score(flat_y, flat_p))}
    return {"n": int(len(y)), "labels": labels, "macro": macro, "micro": micro}


def mean_bce(y: np.ndarray, probs: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Binary cross-entropy averaged over known entries (for validation logs)."""
    p = np.clip(probs, 1e-7, 1 - 1e-7)
    loss = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    if mask is not None:
        return float((loss * mask).sum() / max(mask.sum(), 1))
    return float(loss.mean()) if loss.size else math.nan
