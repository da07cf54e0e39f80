"""Calibration maps: each fit against an independent computation, the TensorFlow maps of the export
against the numpy ones of the report (to float32 precision), and labels left as they are."""
import numpy as np
import pytest

from medtl.evaluate import calibration as cal


def _overconfident(n=600, seed=0, scale=4.0):
    """Labels drawn from sigmoid(z), reported as sigmoid(scale * z): over-confident scores."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-1.0, 1.5, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(float)
    return y, (1 / (1 + np.exp(-scale * z))).astype(np.float32)


def _nll(y, q):
    q = np.clip(q, 1e-15, 1 - 1e-15)
    return -np.mean(y * np.log(q) + (1 - y) * np.log(1 - q))


def test_temperature_is_the_nll_minimum_of_a_grid():
    y, p = _overconfident()
    t = cal.fit_temperature(y, p)[0]["temperature"]
    z = np.log(p.astype(np.float64)) - np.log1p(-p.astype(np.float64))
    grid = np.exp(np.linspace(-3, 3, 6001))
    best = grid[np.argmin([_nll(y, 1 / (1 + np.exp(-z / g))) for g in grid])]
    assert t == pytest.approx(best, rel=2e-3) and t == pytest.approx(4.0, rel=0.25)


def test_platt_minimises_the_soft_target_nll():
    from scipy.optimize import minimize

    y, p = _overconfident(seed=1)
    z = np.log(p.astype(np.float64)) - np.log1p(-p.astype(np.float64))
    for labels in (y, 1 - y):  # a model that ranks the label, and one that ranks it backwards
        params, note = cal.fit_platt(labels, p)
        pos, neg = labels.sum(), len(labels) - labels.sum()
        t = np.where(labels > 0, (pos + 1) / (pos + 2), 1 / (neg + 2))
        objective = lambda ab: _nll(t, 1 / (1 + np.exp(-(ab[0] * z + ab[1]))))  # noqa: E731
        if labels is y:
            best = minimize(objective, x0=[1.0, 0.0], method="Nelder-Mead",
                            options={"xatol": 1e-8, "fatol": 1e-12}).x
            assert [params["slope"], params["intercept"]] == pytest.approx(list(best), abs=1e-3) and not note
        else:  # the slope is held at MIN_SLOPE, so the ranking stays; the intercept is the best one for it
            grid = np.linspace(-5, 5, 20001)
            best = grid[np.argmin([objective([cal.MIN_SLOPE, b]) for b in grid])]
            assert params["slope"] == cal.MIN_SLOPE and params["intercept"] == pytest.approx(best, abs=1e-3)
            assert "held at" in note


def test_isotonic_applies_as_scikit_learn_predicts():
    from sklearn.isotonic import IsotonicRegression

    y, p = _overconfident(seed=2)
    params, _ = cal.fit_isotonic(y[:400], p[:400])
    reference = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(p[:400].astype(np.float64), y[:400])
    np.testing.assert_allclose(cal.apply_label(params, p[400:]), reference.predict(p[400:].astype(np.float64)),
                               atol=1e-12)


def test_fits_lower_ece_and_one_class_labels_stay_as_they_are():
    from medtl.models.metrics import expected_calibration_error as ece

    y, p = _overconfident(n=2000, seed=3)
    labels = np.stack([y, np.zeros_like(y)], axis=1)
    probs = np.stack([p, p], axis=1)
    for method in ("temperature", "platt", "isotonic"):
        fitted = cal.fit_calibration(method, labels[:1000], probs[:1000], None, ("a", "b"), 10, "none", "sha")
        out = cal.apply_calibration(fitted, probs[1000:], ("a", "b"))
        assert ece(y[1000:], out[:, 0]) < ece(y[1000:], p[1000:]) / 2, method
        assert fitted.labels["b"]["params"] == {} and "no positives in val" in fitted.labels["b"]["note"]
        np.testing.assert_array_equal(out[:, 1], probs[1000:, 1])


@pytest.mark.parametrize("method", ["temperature", "platt", "isotonic"])
def test_the_exports_tensorflow_map_equals_the_reports(method):
    from medtl.serve.export import calibrate_fn
    from medtl.tf import tf

    y, p = _overconfident(n=800, seed=4)
    labels, probs = np.stack([y, 1 - y, y], 1), np.stack([p, 1 - p, p], 1)
    fitted = cal.fit_calibration(method, labels[:300], probs[:300], None, ("a", "b", "c"), 10, "none", "sha")
    if method == "isotonic":  # a label whose val scores are all one value: a single point, a constant
        fitted.labels["c"]["params"] = {"x": [0.25], "y": [0.125]}
    edges = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [1e-30, 1 - 1e-9, 0.5]], np.float32)
    test = np.concatenate([probs[300:], edges]).astype(np.float32)
    want = cal.apply_calibration(fitted, test, ("a", "b", "c"))
    got = tf.function(calibrate_fn(fitted, ("a", "b", "c")))(tf.constant(test)).numpy()
    np.testing.assert_allclose(got, want, atol=2e-6)
    if method == "isotonic":
        assert np.all(got[:, 2] == np.float32(0.125))


def test_no_val_split_is_one_line():
    from medtl.data.manifest import Manifest, SplitInfo
    from medtl.errors import MedtlError

    manifest = Manifest(labels=("a",), stored_image_size=64, bit_depth=8,
                        splits={"train": SplitInfo(records=5), "val": SplitInfo(records=0)})
    cal.check_calibration_split("none", manifest, "recs")
    with pytest.raises(MedtlError, match=r"evaluate.calibration=platt is fitted on the val split, but recs has no val"):
        cal.check_calibration_split("platt", manifest, "recs")
