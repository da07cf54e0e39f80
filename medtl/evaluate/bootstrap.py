"""Patient-level bootstrap: confidence intervals for AUROC/AUPRC and paired tests between models.

A resample draws patients with replacement and keeps all of each drawn patient's
images, so studies of one patient (correlated) move together. A resample is a
per-record weight (how often its patient was drawn): the same as duplicating those
records. Resamples depend only on the patient hashes and the seed, so two models scored
on the same records see the same resamples: that pairing is what `medtl compare` tests.

The scores' order does not change between resamples, only the weights do, so each
label is sorted once and all resamples of a chunk are scored together
(`weighted_ranking_metrics`), with scikit-learn's definitions of AUROC and average
precision under sample weights (tests/test_metrics.py checks it against scikit-learn).
Calling scikit-learn per resample cost 5 ms a call in input validation: 95 s of a
1000-resample report of 125 images.
"""
from __future__ import annotations

import warnings

import numpy as np

from medtl.models.metrics import known

# Resamples scored together: at most this many (resample, record) cells per array.
CHUNK_CELLS = 4_000_000


def weighted_ranking_metrics(y: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> tuple:
    """AUROC and average precision of one label under many weightings at once.

    y: (n,) 0/1; scores: (n,); weights: (B, n) >= 0. Returns (auroc, ap), each (B,), NaN where
    a weighting leaves no positive or no negative. Definitions are scikit-learn's with
    sample_weight: weighted true and false positives accumulated down the distinct scores
    (ties form one step); AUROC is the trapezoid area under (FPR, TPR) from (0, 0); AP is
    sum_k (R_k - R_k-1) P_k.
    """
    if len(scores) == 0:
        return np.full(len(weights), np.nan), np.full(len(weights), np.nan)
    order = np.argsort(scores, kind="mergesort")[::-1]
    ranked = scores[order]
    positive = y[order].astype(np.float64)
    w = np.asarray(weights, np.float64)[:, order]
    step_ends = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]
    tps = np.cumsum(w * positive, axis=1)[:, step_ends]
    fps = np.cumsum(w * (1.0 - positive), axis=1)[:, step_ends]
    total_pos, total_neg = tps[:, -1:], fps[:, -1:]
    defined = (total_pos[:, 0] > 0) & (total_neg[:, 0] > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        tpr = np.hstack([np.zeros_like(total_pos), tps / total_pos])
        fpr = np.hstack([np.zeros_like(total_neg), fps / total_neg])
        auroc = np.sum(np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2, axis=1)
        predicted = tps + fps
        precision = np.where(predicted > 0, tps / np.where(predicted > 0, predicted, 1), 0.0)
        ap = np.sum(np.diff(tpr, axis=1) * precision, axis=1)
    return np.where(defined, auroc, np.nan), np.where(defined, ap, np.nan)


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
    # Micro: every known (record, label) pair pooled, weighted by its record's draw count.
    pooled_records = np.nonzero(keep)[0]
    chunk = max(1, CHUNK_CELLS // max(len(pooled_records), 1))
    draws = resample_weights(patients, resamples, seed)
    for start in range(0, resamples, chunk):
        weights = np.stack([next(draws) for _ in range(min(chunk, resamples - start))])
        rows = slice(start, start + len(weights))
        for i in range(num_labels):
            k = keep[:, i]
            out["auroc"][rows, i], out["auprc"][rows, i] = weighted_ranking_metrics(y[k, i], probs[k, i], weights[:, k])
        out["micro_auroc"][rows], out["micro_auprc"][rows] = weighted_ranking_metrics(
            y[keep], probs[keep], weights[:, pooled_records])
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
