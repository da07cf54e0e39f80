"""Metrics, bootstrap intervals and threshold policies on toy arrays with hand-computed answers."""
import numpy as np
import pytest
from sklearn.calibration import calibration_curve

from medtl.config import load_config
from medtl.errors import ConfigError
from medtl.evaluate.bootstrap import (bootstrap_distributions, paired_difference, percentile_interval,
                                      resample_weights, weighted_ranking_metrics)
from medtl.evaluate.thresholds import choose_threshold, tune_thresholds
from medtl.models.metrics import (calibration_bins, expected_calibration_error, operating_metrics,
                                  summary_metrics)

# One label, four records: sorted by score 0.1(-) 0.35(+) 0.4(-) 0.8(+).
Y = np.array([0, 0, 1, 1])
P = np.array([0.1, 0.4, 0.35, 0.8])


def test_ranking_metrics_by_hand():
    s = summary_metrics(Y[:, None], P[:, None], ["a"])
    row = s["labels"]["a"]
    # 4 (positive, negative) pairs; 3 are ordered right: 0.8>0.1, 0.8>0.4, 0.35>0.1.
    assert row["auroc"] == pytest.approx(3 / 4)
    # Precision at each positive, top down: 0.8 -> 1/1, 0.35 -> 2/3; AP = (1 + 2/3) / 2.
    assert row["auprc"] == pytest.approx((1 + 2 / 3) / 2)
    assert (row["n"], row["positives"], row["prevalence"], row["excluded"]) == (4, 2, 0.5, 0)


def test_operating_point_by_hand():
    m = operating_metrics(Y, P, threshold=0.35)  # predicted [0, 1, 1, 1]
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 1, 0)
    assert m["sensitivity"] == 1.0 and m["specificity"] == 0.5
    assert m["ppv"] == pytest.approx(2 / 3) and m["npv"] == 1.0 and m["f1"] == pytest.approx(0.8)
    nothing = operating_metrics(Y, P, threshold=0.9)  # no predicted positives: PPV undefined, not 0
    assert nothing["ppv"] is None and nothing["sensitivity"] == 0.0 and nothing["specificity"] == 1.0


def test_expected_calibration_error_by_hand():
    # 2 bins: [0, 0.5) holds 0.1, 0.4, 0.35 (mean 0.2833, 1 of 3 positive); [0.5, 1] holds 0.8 (positive).
    ece = expected_calibration_error(Y.astype(float), P, bins=2)
    assert ece == pytest.approx(3 / 4 * abs(1 / 3 - 0.85 / 3) + 1 / 4 * abs(1 - 0.8))
    perfect = expected_calibration_error(np.array([0, 1.0]), np.array([0.0, 1.0]), bins=10)
    assert perfect == 0.0


def test_calibration_bins_agree_with_sklearn():
    rng = np.random.default_rng(0)
    p = rng.random(500)
    y = (rng.random(500) < p).astype(float)
    b = calibration_bins(y, p, 10)
    frac, mean = calibration_curve(y, p, n_bins=10, strategy="uniform")
    full = b["count"] > 0
    np.testing.assert_allclose(b["fraction_positive"][full], frac)
    np.testing.assert_allclose(b["mean_predicted"][full], mean)


def test_masked_labels_are_excluded_per_label_and_counted():
    y = np.array([[0, 1], [1, 0], [1, 1], [0, 0]])
    p = np.array([[0.2, 0.9], [0.7, 0.1], [0.9, 0.2], [0.1, 0.8]])
    mask = np.array([[1, 1], [1, 0], [1, 1], [1, 0]])  # label b uncertain for rows 1 and 3
    s = summary_metrics(y, p, ["a", "b"], mask)
    assert s["labels"]["a"]["auroc"] == 1.0 and s["labels"]["a"]["excluded"] == 0
    b = s["labels"]["b"]
    assert (b["n"], b["excluded"], b["positives"]) == (2, 2, 2)
    assert b["auroc"] is None and b["note"] == "n/a: no negatives"
    # Macro averages the defined labels only; micro pools the 6 known entries.
    assert s["macro"]["auroc"] == 1.0 and s["macro"]["labels_averaged"] == 1
    known = mask > 0
    from sklearn.metrics import roc_auc_score
    assert s["micro"]["auroc"] == pytest.approx(roc_auc_score(y[known], p[known]))


def test_label_without_positives_is_na_not_a_crash():
    y = np.array([[0, 1], [0, 0], [0, 1]])
    p = np.array([[0.1, 0.8], [0.2, 0.3], [0.3, 0.6]])
    s = summary_metrics(y, p, ["none", "ok"])
    assert s["labels"]["none"]["auroc"] is None and s["labels"]["none"]["note"] == "n/a: no positives"
    assert s["labels"]["none"]["sensitivity"] is None and s["labels"]["ok"]["auroc"] == 1.0


# --------------------------------------------------------------------------- thresholds

# Scores 0.1 .. 0.7; positives at 0.4, 0.6, 0.7; negatives at 0.1, 0.2, 0.3, 0.5.
TY = np.array([0, 0, 0, 1, 0, 1, 1])
TP = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])


@pytest.mark.parametrize("policy, target, expected", [
    ("youden", None, 0.4),        # J: t=0.6 -> 2/3 - 0; t=0.4 -> 1 - 1/4 = 0.75 (max)
    ("sensitivity", 0.6, 0.6),    # highest threshold with sensitivity >= 0.6: 2/3 at 0.6
    ("sensitivity", 0.9, 0.4),    # 100% only from 0.4 down
    ("specificity", 0.75, 0.4),   # lowest threshold with specificity >= 0.75: 3/4 at 0.4
    ("specificity", 0.9, 0.6),    # 100% specificity: nothing below 0.6
    ("f1", None, 0.4),            # F1: 0.4 -> 6/7; 0.6 -> 4/5; 0.7 -> 1/2
])
def test_threshold_policies_by_hand(policy, target, expected):
    assert choose_threshold(TY, TP, policy, target or 0.9) == pytest.approx(expected)


def test_f1_and_youden_can_disagree():
    # 20 negatives (18 low, two at 0.7 and 0.8), positives at 0.6, 0.9, 0.95.
    # Youden: t=0.6 -> 1 - 2/20 = 0.9 beats t=0.9 -> 2/3. F1: t=0.6 -> 6/8 loses to t=0.9 -> 4/5.
    p = np.concatenate([np.linspace(0.01, 0.18, 18), [0.7, 0.8, 0.6, 0.9, 0.95]])
    y = np.array([0] * 20 + [1] * 3)
    assert choose_threshold(y, p, "youden") == pytest.approx(0.6)
    assert choose_threshold(y, p, "f1") == pytest.approx(0.9)


def test_sensitivity_target_is_met_on_the_tuning_data():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    p = np.clip(0.3 * y + rng.normal(0.35, 0.2, 400), 0, 1)
    for target in (0.8, 0.9, 0.95):
        t = choose_threshold(y, p, "sensitivity", target)
        assert operating_metrics(y, p, t)["sensitivity"] >= target
        t = choose_threshold(y, p, "specificity", target)
        assert operating_metrics(y, p, t)["specificity"] >= target


def test_tune_thresholds_defaults_when_val_has_no_positives():
    y = np.array([[0, 1], [0, 0], [0, 1], [0, 0]])
    p = np.array([[0.1, 0.8], [0.2, 0.3], [0.3, 0.6], [0.4, 0.5]])
    out = tune_thresholds(y, p, None, ["none", "ok"], "youden", 0.9)
    assert out["none"] == {"threshold": 0.5, "note": "default 0.5 (no positives in val)"}
    assert out["ok"]["threshold"] == pytest.approx(0.6) and out["ok"]["note"] == ""


def test_evaluate_config_is_validated():
    base = {"phases": [{"name": "a", "epochs": 1, "learning_rate": 1e-3}]}
    cfg = load_config(raw={**base, "evaluate": {"threshold_policy": "sensitivity", "target": 0.95}})
    assert cfg.evaluate.threshold_policy == "sensitivity" and cfg.evaluate.bootstrap == 1000
    with pytest.raises(ConfigError, match="'evaluate.threshold_policy' must be one of 'youden'"):
        load_config(raw={**base, "evaluate": {"threshold_policy": "accuracy"}})
    with pytest.raises(ConfigError, match=r"'evaluate.target' must be in \(0, 1\), got 1.5"):
        load_config(raw={**base, "evaluate": {"target": 1.5}})
    with pytest.raises(ConfigError, match="'evaluate.bootstrap' must be 0"):
        load_config(raw={**base, "evaluate": {"bootstrap": 10}})
    with pytest.raises(ConfigError, match="'evaluate.tta' must be one of 'none', 'flip'"):
        load_config(raw={**base, "evaluate": {"tta": "rotate"}})


# --------------------------------------------------------------------------- bootstrap


def _toy(n_patients: int, seed: int, separation: float = 1.0):
    """Two images per patient, a signal of the given strength, 2 labels."""
    rng = np.random.default_rng(seed)
    patients = np.repeat([f"p{i:05d}" for i in range(n_patients)], 2)
    y = rng.integers(0, 2, (len(patients), 2))
    probs = 1 / (1 + np.exp(-(separation * (2 * y - 1) + rng.normal(0, 1, y.shape))))
    return y, probs, patients


def test_resamples_keep_a_patients_images_together_and_follow_the_seed():
    patients = np.array(["b", "a", "b", "c", "a", "c", "c"])
    draws = list(resample_weights(patients, 20, seed=3))
    for w in draws:
        assert w[0] == w[2] and w[1] == w[4] and w[3] == w[5] == w[6]
        assert w[[1, 0, 3]].sum() == 3  # three patients drawn per resample
    again = list(resample_weights(patients, 20, seed=3))
    assert all(np.array_equal(a, b) for a, b in zip(draws, again))
    assert any(not np.array_equal(a, b) for a, b in zip(draws, resample_weights(patients, 20, seed=4)))


def test_vectorised_bootstrap_metrics_equal_sklearn_per_resample():
    """All resamples at once give scikit-learn's AUROC and AP with sample_weight, ties and zero weights included."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    from medtl.evaluate import bootstrap

    rng = np.random.default_rng(11)
    y = rng.integers(0, 2, (90, 3)).astype(float)
    probs = np.round(rng.uniform(0, 1, y.shape) * 0.6 + 0.4 * y, 1)  # rounded: many tied scores
    mask = rng.uniform(size=y.shape) > 0.2
    patients = rng.integers(0, 30, 90).astype(str)
    draws = bootstrap_distributions(y, probs, mask, patients, 60, seed=2)
    for b, w in enumerate(resample_weights(patients, 60, seed=2)):
        for i in range(3):
            k, used = mask[:, i], w[mask[:, i]] > 0
            if len(set(y[k, i][used])) < 2:
                assert np.isnan(draws["auroc"][b, i]) and np.isnan(draws["auprc"][b, i])
                continue
            assert draws["auroc"][b, i] == pytest.approx(roc_auc_score(y[k, i], probs[k, i], sample_weight=w[k]))
            assert draws["auprc"][b, i] == pytest.approx(
                average_precision_score(y[k, i], probs[k, i], sample_weight=w[k]))
        pooled = np.broadcast_to(w[:, None], y.shape)[mask]
        assert draws["micro_auroc"][b] == pytest.approx(roc_auc_score(y[mask], probs[mask], sample_weight=pooled))
        assert draws["micro_auprc"][b] == pytest.approx(
            average_precision_score(y[mask], probs[mask], sample_weight=pooled))
    # Chunked (a few resamples per array) gives the same draws.
    small = bootstrap.CHUNK_CELLS
    try:
        bootstrap.CHUNK_CELLS = 200
        np.testing.assert_allclose(bootstrap_distributions(y, probs, mask, patients, 60, seed=2)["auroc"],
                                   draws["auroc"], rtol=1e-12)
    finally:
        bootstrap.CHUNK_CELLS = small
    # One class only, or nothing kept: undefined, not an error.
    one = weighted_ranking_metrics(np.ones(4), np.arange(4.0), np.ones((2, 4)))
    empty = weighted_ranking_metrics(np.ones(0), np.ones(0), np.ones((2, 0)))
    assert np.isnan(one).all() and np.isnan(empty).all()


def test_bootstrap_interval_contains_estimate_is_reproducible_and_shrinks():
    from sklearn.metrics import roc_auc_score

    widths = []
    for n_patients in (40, 640):
        y, p, patients = _toy(n_patients, seed=0)
        d = bootstrap_distributions(y, p, None, patients, 200, seed=0)
        lo, hi = percentile_interval(d["auroc"][:, 0], 0.95)
        assert lo <= roc_auc_score(y[:, 0], p[:, 0]) <= hi
        lo_m, hi_m = percentile_interval(d["macro_auroc"], 0.95)
        assert lo_m <= np.mean([roc_auc_score(y[:, i], p[:, i]) for i in range(2)]) <= hi_m
        assert percentile_interval(d["micro_auroc"], 0.95) is not None
        widths.append(hi - lo)
        again = bootstrap_distributions(y, p, None, patients, 200, seed=0)
        np.testing.assert_array_equal(d["auroc"], again["auroc"])
    assert widths[1] < widths[0] / 2  # 16x the data: about 1/4 the width


def test_paired_difference_flags_real_changes_only():
    y, p, patients = _toy(300, seed=5, separation=1.0)
    rng = np.random.default_rng(9)
    worse = 1 / (1 + np.exp(-(0.3 * (2 * y - 1) + rng.normal(0, 1, y.shape))))
    a = bootstrap_distributions(y, p, None, patients, 200, seed=1)
    same = bootstrap_distributions(y, p, None, patients, 200, seed=1)
    b = bootstrap_distributions(y, worse, None, patients, 200, seed=1)
    null = paired_difference(same["auroc"][:, 0], a["auroc"][:, 0], 0.95)
    assert null["ci"] == [0.0, 0.0] and not null["significant"] and null["p_value"] == 1.0
    change = paired_difference(b["auroc"][:, 0], a["auroc"][:, 0], 0.95)
    assert change["significant"] and change["ci"][1] < 0 and change["p_value"] < 0.05
