"""Patient-level bootstrap: confidence intervals for AUROC/AUPRC and paired tests between models.

A resample draws patients with replacement and keeps all of each drawn patient's
images, so studies of one patient (correlated) move together. A resample is a
per-record weight (how often its patient was drawn), which scikit-learn takes as
sample_weight: the same as duplicating those records. Resamples depend only on the
patient hashes and the seed, so two models scored on the same records see the same
resamples: that pairing is what `medtl compare` tests.
"""
from __future__ import annotations

import warnings

import numpy as np

from medtl.evaluate.metrics import known, micro_metrics, ranking_metrics


def resample_weights(patients: np.ndarray, resamples: int, seed: int):
    """Yields `resamples` (n,) float arrays: each record's patient draw count."""
    _, patient_index = np.unique(np.asarray(patients), return_inverse=True)
    num_patients = int(patient_index.max()) + 1 if len(patient_index) else 0
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        draws = rng.integers(0, num_patients, num_patients)
        yield np.bincount(draws, minlength=num_patients)[patient_index].astype(np.float64)


def bootstrap_distributions(y: np.ndarray, probs: np.ndarray, mask: np.ndarray | None, patients: np.ndarray,
                            resamples: int, seed: int) -> dict:
    """Bootstrap draws of each metric: {'auroc', 'auprc'}: (resamples, L); {'micro_auroc', 'micro_auprc',
    'macro_auroc', 'macro_auprc'}: (resamples,). NaN where a resample leaves a label one class."""
    keep = known(mask, y.shape)
    num_labels = y.shape[1]
    out = {k: np.full((resamples, num_labels), np.nan) for k in ("auroc", "auprc")}
    for k in ("micro_auroc", "micro_auprc"):
        out[k] = np.full(resamples, np.nan)
    for b, weights in enumerate(resample_weights(patients, resamples, seed)):
        for i in range(num_labels):
            k = keep[:, i]
            auroc, auprc = ranking_metrics(y[k, i], probs[k, i], weights[k])
            if auroc is not None:
                out["auroc"][b, i], out["auprc"][b, i] = auroc, auprc
        micro = micro_metrics(y, probs, mask, weights)
        if micro[0] is not None:
            out["micro_auroc"][b], out["micro_auprc"][b] = micro
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: no label defined in a resample
        out["macro_auroc"] = np.nanmean(out["auroc"], axis=1)
        out["macro_auprc"] = np.nanmean(out["auprc"], axis=1)
    return out


def percentile_interval(draws: np.ndarray, confidence: float) -> tuple[float, float] | None:
    """The percentile interval of the finite draws, or None when fewer than half are finite."""
    draws = np.asarray(draws, float)
    finite = draws[np.isfinite(draws)]
    if len(finite) < max(len(draws) / 2, 1):
        return None
    tail = (1.0 - confidence) / 2 * 100
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    return float(lo), float(hi)


def paired_difference(draws_a: np.ndarray, draws_b: np.ndarray, confidence: float) -> dict | None:
    """Interval of (a - b) over paired resamples, and a two-sided bootstrap p-value for a - b = 0."""
    diff = np.asarray(draws_a, float) - np.asarray(draws_b, float)
    diff = diff[np.isfinite(diff)]
    interval = percentile_interval(diff, confidence)
    if interval is None:
        return None
    # Two-sided: twice the smaller share of resamples at or beyond zero, with the usual +1 so that
    # a finite number of resamples never claims p = 0.
    tail = min(np.sum(diff <= 0), np.sum(diff >= 0))
    p_value = float(min(1.0, 2 * (tail + 1) / (len(diff) + 1)))
    return {"ci": list(interval), "p_value": p_value, "significant": bool(interval[0] > 0 or interval[1] < 0)}
