"""Per-label calibration of the model's probabilities (evaluate.calibration), fitted on val.

  temperature  p' = sigmoid(logit(p) / T); T minimises the val NLL (scipy: a bounded 1-D search on log T)
  platt        p' = sigmoid(a * logit(p) + b): scikit-learn's LogisticRegression on the logit, unpenalised,
               with Platt's targets ((N+ + 1) / (N+ + 2) and 1 / (N- + 2)), so that a val split the model
               separates does not send a to infinity. When the best a is below MIN_SLOPE (the model does not
               rank the label on val), a is held there and b refitted: nearly the val base rate, still
               strictly increasing, so the ranking (and AUROC) is kept
  isotonic     scikit-learn's IsotonicRegression on p: the fitted points, linear between them, constant
               outside them
Order: the calibration is fitted on the val predictions first, then the thresholds are tuned on the
calibrated val probabilities (medtl.evaluate.run), so a threshold is a calibrated probability in the
report, in the export and in `medtl predict`. Temperature and Platt are strictly increasing: rankings,
hence AUROC and AUPRC, do not change. Isotonic is non-decreasing but flat between its points' steps:
studies whose raw scores fall in one step get one probability (ties), which can lower AUROC a little
and means a threshold can only separate whole steps. A label without both classes in val is left as it is.
The export applies the same formulas in TensorFlow (medtl.serve.export.calibrate_fn).
"""
from __future__ import annotations

import numpy as np

import medtl
from medtl.data.manifest import Manifest
from medtl.errors import MedtlError
from medtl.models.metrics import expected_calibration_error, known, undefined_reason
from medtl.train.rundir import Calibration

METHODS = ("none", "temperature", "platt", "isotonic")
# logit(p) is taken of p clipped to [LOW, HIGH]: HIGH is the largest float32 below 1, LOW keeps
# float32's small probabilities apart (a sigmoid of -27 is still 1.9e-12).
LOW, HIGH = 1e-12, 1.0 - 2.0 ** -24
LOG_T_BOUNDS = (-5.0, 5.0)  # T in [0.0067, 148]
MIN_SLOPE = 1e-3


def check_calibration_split(method: str, manifest: Manifest, records: str) -> None:
    """Calibration is fitted on val: one line when the records have none."""
    if method == "none":
        return
    if "val" not in manifest.splits or manifest.records("val") == 0:
        raise MedtlError(f"evaluate.calibration={method} is fitted on the val split, but {records} has no val records; "
                         "re-ingest with --val-fraction > 0, or set evaluate.calibration=none")


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), LOW, HIGH)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow for large |z|


def _soft_nll(targets: np.ndarray, z: np.ndarray) -> float:
    """Mean cross-entropy of sigmoid(z) against (soft) targets in [0, 1], stably."""
    return float(np.mean(targets * np.logaddexp(0.0, -z) + (1 - targets) * np.logaddexp(0.0, z)))


def fit_temperature(y: np.ndarray, p: np.ndarray) -> tuple[dict, str]:
    from scipy.optimize import minimize_scalar

    z = logit(p)
    best = minimize_scalar(lambda log_t: _soft_nll(y, z / np.exp(log_t)), bounds=LOG_T_BOUNDS, method="bounded")
    return {"temperature": float(np.exp(best.x))}, ""


def fit_platt(y: np.ndarray, p: np.ndarray) -> tuple[dict, str]:
    from scipy.optimize import minimize_scalar
    from sklearn.linear_model import LogisticRegression

    z = logit(p)
    positives, negatives = float(np.sum(y)), float(len(y) - np.sum(y))
    target = np.where(y > 0, (positives + 1) / (positives + 2), 1 / (negatives + 2))
    # Soft targets as two weighted copies of each example: one positive, one negative.
    model = LogisticRegression(C=np.inf).fit(np.r_[z, z][:, None], np.r_[np.ones(len(y)), np.zeros(len(y))],
                                             sample_weight=np.r_[target, 1 - target])
    slope, intercept = float(model.coef_[0, 0]), float(model.intercept_[0])
    if slope >= MIN_SLOPE:
        return {"slope": slope, "intercept": intercept}, ""
    best = minimize_scalar(lambda b: _soft_nll(target, MIN_SLOPE * z + b), bounds=(-30.0, 30.0), method="bounded")
    return ({"slope": MIN_SLOPE, "intercept": float(best.x)},
            f"Platt slope {slope:.3g} < {MIN_SLOPE:g} (no ranking on val): held at {MIN_SLOPE:g}, intercept refitted")


def fit_isotonic(y: np.ndarray, p: np.ndarray) -> tuple[dict, str]:
    from sklearn.isotonic import IsotonicRegression

    model = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
    model.fit(np.asarray(p, np.float64), y.astype(np.float64))
    return {"x": [float(v) for v in model.X_thresholds_], "y": [float(v) for v in model.y_thresholds_]}, ""


FITS = {"temperature": fit_temperature, "platt": fit_platt, "isotonic": fit_isotonic}


def apply_label(params: dict, p: np.ndarray) -> np.ndarray:
    """One label's calibrated probabilities (float64) from its raw ones, by `params`' formula."""
    if not params:
        return np.asarray(p, np.float64)
    if "temperature" in params:
        return _sigmoid(logit(p) / params["temperature"])
    if "slope" in params:
        return _sigmoid(params["slope"] * logit(p) + params["intercept"])
    return np.interp(np.asarray(p, np.float64), params["x"], params["y"])


def apply_calibration(calibration: Calibration | None, probs: np.ndarray, label_names) -> np.ndarray:
    """(n, L) raw probabilities -> calibrated (float32); unchanged without a calibration."""
    if calibration is None:
        return probs
    columns = [apply_label(calibration.params(name), probs[:, i]) for i, name in enumerate(label_names)]
    return np.stack(columns, axis=1).astype(np.float32) if columns else probs


def _fit_label(method: str, y: np.ndarray, p: np.ndarray) -> tuple[dict, str]:
    reason = undefined_reason(y)
    if reason:
        return {}, f"not calibrated ({reason.removeprefix('n/a: ')} in val)"
    return FITS[method](y, p)


def fit_calibration(method: str, y: np.ndarray, probs: np.ndarray, mask: np.ndarray | None, label_names,
                    bins: int, tta: str, checkpoint_sha256: str) -> Calibration:
    """Each label's map fitted on its known val entries, with its val ECE before and after."""
    keep = known(mask, y.shape)
    labels = {}
    for i, name in enumerate(label_names):
        yi, pi = y[keep[:, i], i], probs[keep[:, i], i]
        params, note = _fit_label(method, yi, pi)
        after = apply_label(params, pi)
        labels[name] = {"params": params, "note": note,
                        "val_ece": [expected_calibration_error(yi, pi, bins), expected_calibration_error(yi, after, bins)]}
    return Calibration(method=method, tta=tta, fitted_on="val", val_records=int(len(y)), labels=labels,
                       checkpoint_sha256=checkpoint_sha256, medtl_version=medtl.__version__)


def describe(params: dict) -> str:
    """A label's map in a few words, for the report and the model card."""
    if not params:
        return "identity"
    if "temperature" in params:
        return f"T = {params['temperature']:.3f}"
    if "slope" in params:
        return f"a = {params['slope']:.3f}, b = {params['intercept']:.3f}"
    return f"{len(params['x'])} points"


def calibration_summary(calibration: Calibration | None, y: np.ndarray, raw: np.ndarray, calibrated: np.ndarray,
                        mask: np.ndarray | None, label_names, bins: int) -> dict:
    """metrics.json's "calibration": the method, each label's map and its ECE before and after on this split."""
    if calibration is None:
        return {"method": "none"}
    keep = known(mask, y.shape)
    labels = {}
    for i, name in enumerate(label_names):
        k = keep[:, i]
        entry = calibration.labels[name]
        labels[name] = {"map": describe(entry["params"]), "note": entry["note"], "val_ece": entry["val_ece"],
                        "ece_before": expected_calibration_error(y[k, i], raw[k, i], bins),
                        "ece_after": expected_calibration_error(y[k, i], calibrated[k, i], bins)}
    pooled = {"ece_before": expected_calibration_error(y[keep], raw[keep], bins),
              "ece_after": expected_calibration_error(y[keep], calibrated[keep], bins)}
    return {"method": calibration.method, "fitted_on": calibration.fitted_on, "val_records": calibration.val_records,
            "labels": labels, "micro": pooled}
