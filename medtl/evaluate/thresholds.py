"""Operating thresholds: chosen per label on the validation split, never on test.

Policies (config `evaluate.threshold_policy`), a label is called positive when
its probability is >= its threshold:
  youden       maximises sensitivity + specificity - 1 (Youden's J)
  sensitivity  the highest threshold whose sensitivity reaches `target` (best specificity at it)
  specificity  the lowest threshold whose specificity reaches `target` (best sensitivity at it)
  f1           maximises F1
A label with no positives or no negatives in val keeps 0.5, with a note.
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_curve

from medtl.models.metrics import known, undefined_reason

POLICIES = ("youden", "sensitivity", "specificity", "f1")
DEFAULT_THRESHOLD = 0.5


def _finite(thresholds: np.ndarray) -> np.ndarray:
    # roc_curve's first threshold is +inf ("nothing positive"); keep it just above the top score.
    out = thresholds.astype(np.float64).copy()
    if len(out) > 1 and not np.isfinite(out[0]):
        out[0] = np.nextafter(out[1], np.inf)
    return out


def choose_threshold(y: np.ndarray, probs: np.ndarray, policy: str, target: float = 0.9) -> float:
    """One label's threshold from its known (y, probs). Both classes must be present."""
    if policy == "f1":
        precision, recall, thresholds = precision_recall_curve(y, probs)
        precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        return float(thresholds[int(np.argmax(f1))])
    fpr, tpr, thresholds = roc_curve(y, probs, drop_intermediate=False)
    thresholds = _finite(thresholds)
    if policy == "youden":
        return float(thresholds[int(np.argmax(tpr - fpr))])
    if policy == "sensitivity":
        # tpr rises as the threshold falls: the first point reaching the target has the best specificity.
        return float(thresholds[int(np.argmax(tpr >= target - 1e-12))])
    if policy == "specificity":
        # fpr rises as the threshold falls: the last point within 1 - target has the best sensitivity.
        return float(thresholds[int(np.nonzero(fpr <= 1.0 - target + 1e-12)[0][-1])])
    raise ValueError(f"unknown threshold policy {policy!r}; choose one of {POLICIES}")


def tune_thresholds(y: np.ndarray, probs: np.ndarray, mask: np.ndarray | None, label_names,
                    policy: str, target: float) -> dict:
    """{label: {'threshold', 'note'}} chosen on the given (validation) predictions."""
    keep = known(mask, y.shape)
    out = {}
    for i, name in enumerate(label_names):
        yi, pi = y[keep[:, i], i], probs[keep[:, i], i]
        reason = undefined_reason(yi)
        if reason:
            out[name] = {"threshold": DEFAULT_THRESHOLD,
                         "note": f"default {DEFAULT_THRESHOLD} ({reason.removeprefix('n/a: ')} in val)"}
        else:
            out[name] = {"threshold": choose_threshold(yi, pi, policy, target), "note": ""}
    return out
