"""Overfitting analysis on hand-made histories, the learning curve's verdict, subset selection on real
records, the ranking agreement and the training loss on val: each against values worked out here."""
from __future__ import annotations

import itertools
import math
import os

import numpy as np
import pytest

from medtl.config import load_config
from medtl.data.subsets import parse_fractions, patient_order, select_subsets
from medtl.errors import ConfigError, MedtlError
from medtl.evaluate.curve import CurvePoint, LearningCurve, read_learning_curve, write_learning_curve
from medtl.evaluate.overfit import RunSetup, analyse_overfitting, run_setup
from medtl.search.transfer import Agreement, compare_rankings
from medtl.train.rundir import EpochPoint, epoch_points

from conftest import JOBS

NONE_USED = RunSetup(dropout=False, augmentation=False, weight_decay=False, early_stopping=False)


def history(train, val, phases=None):
    phases = phases or ["head"] * len(train)
    return [EpochPoint(p, i, 0.5, 0.5, t, v, "bce") for i, (p, t, v) in enumerate(zip(phases, train, val))]


# ----------------------------------------------------------------------------- the overfitting flag


def test_val_falling_while_train_rises_for_k_epochs_fires_and_k_minus_1_does_not():
    train = [0.60, 0.65, 0.70, 0.75, 0.80]
    val = [0.60, 0.64, 0.63, 0.62, 0.61]  # falls for 3 epochs (2->3, 3->4, 4->5) while train rises
    found = analyse_overfitting(history(train, val), patience=3, gap=0.5, setup=NONE_USED)
    assert found.flagged and found.longest_divergence == 3
    assert "3 consecutive epochs (epochs 2-5 of phase 'head': val 0.640 -> 0.610, train 0.650 -> 0.800" \
        in found.reasons[0]
    quiet = analyse_overfitting(history(train, val), patience=4, gap=0.5, setup=NONE_USED)
    assert not quiet.flagged and quiet.remedies == () and quiet.longest_divergence == 3


def test_divergence_does_not_run_across_a_phase_boundary():
    train = [0.60, 0.65, 0.70, 0.75, 0.80]
    val = [0.64, 0.63, 0.62, 0.61, 0.60]
    found = analyse_overfitting(history(train, val, ["head"] * 3 + ["top"] * 2), patience=3, gap=0.5,
                                setup=NONE_USED)
    assert found.longest_divergence == 2 and not found.flagged  # 2 in 'head', 1 in 'top'


def test_gap_at_the_last_or_best_epoch_fires():
    found = analyse_overfitting(history([0.7, 0.9, 0.99], [0.68, 0.70, 0.69]), patience=5, gap=0.1,
                                setup=NONE_USED)
    assert found.flagged and found.best_epoch == 2
    assert found.gap_at_best == pytest.approx(0.2) and found.gap_at_last == pytest.approx(0.3)
    assert [r.split(" at ")[1][:14] for r in found.reasons] == ["the best epoch", "the last epoch"]
    small = analyse_overfitting(history([0.7, 0.75], [0.68, 0.70]), patience=5, gap=0.1, setup=NONE_USED)
    assert not small.flagged and small.gap_at_last == pytest.approx(0.05)


def test_remedies_name_what_the_run_did_not_use():
    overfit = history([0.7, 0.99], [0.6, 0.6])
    none = analyse_overfitting(overfit, 3, 0.1, NONE_USED)
    assert [r.split(":")[0] for r in none.remedies] == ["more data", "dropout", "augmentation", "weight decay",
                                                        "early stopping"]
    assert "medtl search --fractions" in none.remedies[0]
    all_used = analyse_overfitting(overfit, 3, 0.1, RunSetup(True, True, True, True))
    assert [r.split(":")[0] for r in all_used.remedies] == ["more data"]
    rising = LearningCurve("h", 5, (CurvePoint(0.25, 10, 5, 0.70), CurvePoint(1.0, 40, 20, 0.80)))
    found = analyse_overfitting(overfit, 3, 0.1, NONE_USED, rising)
    assert "still rising at 100%" in found.remedies[0] and "more data is likely to help" in found.remedies[0]


def test_setup_from_config_and_old_histories():
    cfg = load_config(os.path.join(JOBS, "smoke.yaml"), ["model.head.dropout=0", "data.augment=[]"])
    assert run_setup(cfg) == RunSetup(False, False, False, False)
    cfg = load_config(os.path.join(JOBS, "smoke.yaml"), ["phases.1.early_stopping_patience=2",
                                                         "phases.0.optimizer=adamw", "phases.0.weight_decay=1e-4"])
    assert run_setup(cfg) == RunSetup(True, True, True, True)
    old = epoch_points([{"phase": "head", "epoch": 0, "loss": 0.7, "val_loss": 0.6, "val_auroc": 0.6}])
    assert old[0].train_auroc is None and old[0].loss_name is None
    found = analyse_overfitting(old, 3, 0.1, NONE_USED)
    assert not found.flagged and "no train AUROC" in found.note


# ----------------------------------------------------------------------------- the learning curve


def test_learning_curve_verdict_and_file(tmp_path):
    rising = LearningCurve("h", 4, (CurvePoint(0.1, 10, 5, 0.60), CurvePoint(0.3, 30, 15, 0.66),
                                    CurvePoint(1.0, 100, 50, 0.70)))
    # (0.70 - 0.66) / log2(1.0 / 0.3) by hand
    assert rising.gain_per_doubling() == pytest.approx(0.04 / 1.7369655941662063)
    assert rising.verdict().startswith("still rising at 100%")
    flat = LearningCurve("h", 4, (CurvePoint(0.5, 50, 25, 0.700), CurvePoint(1.0, 100, 50, 0.703)))
    assert not flat.rising() and flat.verdict().startswith("not rising at 100%")
    path = write_learning_curve(str(tmp_path), rising)
    assert read_learning_curve(path) == rising
    with pytest.raises(MedtlError, match="evaluate.learning_curve: .*nope.json does not exist"):
        read_learning_curve(str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(MedtlError, match="is not a learning curve"):
        read_learning_curve(str(tmp_path / "bad.json"))


# ----------------------------------------------------------------------------- ranking agreement


def kendall_by_pairs(a: list[str], b: list[str]) -> float:
    """Kendall's tau (no ties) counted over pairs: (concordant - discordant) / pairs."""
    pairs = list(itertools.combinations(a, 2))
    score = sum(1 if (a.index(x) - a.index(y)) * (b.index(x) - b.index(y)) > 0 else -1 for x, y in pairs)
    return score / len(pairs)


def test_ranking_agreement_against_pair_counts():
    reference = ["a", "b", "c", "d", "e", "f"]
    ranking = ["b", "a", "c", "f", "x", "e"]  # x: not explored at the reference; d: not here
    found = compare_rankings(ranking, reference, k=3)
    common_ref, common_mine = ["a", "b", "c", "e", "f"], ["b", "a", "c", "f", "e"]
    assert found.common == 5
    assert found.kendall_tau == pytest.approx(kendall_by_pairs(common_mine, common_ref)) == pytest.approx(0.6)
    assert found.top_k == 3 and found.top_k_overlap == pytest.approx(1.0)  # {b, a, c} vs {a, b, c}
    assert compare_rankings(["c", "b", "a"], ["a", "b", "c"], k=2).top_k_overlap == pytest.approx(0.5)
    assert compare_rankings(["a"], ["a", "b"], k=5) == Agreement(1, None, 1, 1.0)


# ----------------------------------------------------------------------------- fractions


def test_bad_fractions_are_one_line_errors():
    assert parse_fractions("0.1, 0.3,1") == (0.1, 0.3, 1.0)
    for text, fragment in (("0,1", "(0, 1]"), ("0.5,1.5", "(0, 1]"), ("0.1,x", "'x' is not a number"),
                           ("0.3,0.3", "twice")):
        with pytest.raises(ConfigError, match="--fractions") as err:
            parse_fractions(text)
        assert fragment in str(err.value) and "\n" not in str(err.value)
    for override, key in (("search.fractions=[0.5, 2]", "'search.fractions'"),
                          ("train.train_eval_images=-1", "'train.train_eval_images'"),
                          ("evaluate.overfit_gap=0", "'evaluate.overfit_gap'"),
                          ("evaluate.overfit_patience=0", "'evaluate.overfit_patience'"),
                          ("search.top_k=0", "'search.top_k'")):
        with pytest.raises(ConfigError, match=key):
            load_config(os.path.join(JOBS, "smoke.yaml"), [override])


@pytest.fixture(scope="module")
def train_rows(records):
    """(patient, labels, mask) of every train record, read from the shards (salted hashes only)."""
    from medtl.config import load_config as load
    from medtl.data.pipeline import build_dataset

    cfg = load(os.path.join(JOBS, "smoke.yaml"), [f"data.records={records}"])
    patients, labels, masks = [], [], []
    for _, y, mask, patient, _ in build_dataset(cfg, "train", training=False, with_ids=True):
        patients += [p.decode() for p in patient.numpy()]
        labels.append(y.numpy())
        masks.append(mask.numpy())
    return np.array(patients), np.concatenate(labels), np.concatenate(masks)


def test_fractions_are_nested_patient_level_and_keep_positives(train_rows):
    patients, labels, mask = train_rows
    names = [f"label{i}" for i in range(labels.shape[1])]
    subsets = select_subsets(patients, labels, mask, [1.0, 0.3, 0.6], seed=0, label_names=names)
    assert list(subsets) == [0.3, 0.6, 1.0]
    chosen = {f: set(patients[s.rows]) for f, s in subsets.items()}
    assert chosen[0.3] < chosen[0.6] < chosen[1.0] == set(patients)  # nested, by patient
    for f, s in subsets.items():
        rows = set(s.rows.tolist())
        # patient level: a chosen patient brings every one of their images, no other patient's
        assert rows == {i for i, p in enumerate(patients) if p in chosen[f]}
        assert s.patients == len(chosen[f]) and s.images >= f * len(patients) - 1e-9
        assert (labels[s.rows] * mask[s.rows]).sum(axis=0).min() >= 1  # every label keeps a positive
    # the same seed: the same patients whatever the row order; another seed: others
    order = np.random.default_rng(1).permutation(len(patients))
    again = select_subsets(patients[order], labels[order], mask[order], [0.3], 0, names)
    assert set(patients[order][again[0.3].rows]) == chosen[0.3] and again[0.3].digest == subsets[0.3].digest
    other = select_subsets(patients, labels, mask, [0.3], 1, names)
    assert set(patients[other[0.3].rows]) != chosen[0.3]


def test_a_fraction_too_small_for_a_label_names_it(train_rows):
    patients, labels, mask = train_rows
    names = [f"label{i}" for i in range(labels.shape[1])]
    first = patient_order(patients, labels, mask, 0)[0]
    tiny = (patients == first).sum() / len(patients) / 2  # less than the first patient's images
    with pytest.raises(ConfigError) as err:
        select_subsets(patients, labels, mask, [tiny, 1.0], 0, names)
    message = str(err.value)
    assert f"fraction {tiny:g} of --fractions/search.fractions leaves label 'label" in message
    assert "without positives" in message and "use fractions of at least" in message


# ----------------------------------------------------------------------------- the training loss on val


def test_val_loss_is_the_training_loss_reduced_as_keras_reduces_a_batch():
    from medtl.config import LossConfig
    from medtl.models.losses import build_loss
    from medtl.train.callbacks import masked_loss

    rng = np.random.default_rng(0)
    y = (rng.random((7, 3)) > 0.5).astype(np.float32)
    logits = rng.normal(size=(7, 3)).astype(np.float32) * 3
    mask = (rng.random((7, 3)) > 0.3).astype(np.float32)
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    gamma = 2.0
    focal = -(y * (1 - p) ** gamma * np.log(p) + (1 - y) * p ** gamma * np.log(1 - p))
    expected = (focal * mask).sum() / y.size  # Keras: the masked sum over all entries
    assert masked_loss(build_loss(LossConfig(name="focal", gamma=gamma)), y, logits, mask) == \
        pytest.approx(expected, rel=1e-5)
    bce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert masked_loss(build_loss(LossConfig()), y, logits, mask) == pytest.approx((bce * mask).sum() / y.size,
                                                                                   rel=1e-5)
    assert not math.isclose(expected, (bce * mask).sum() / y.size)


def test_the_train_sample_is_the_same_records_on_any_rank_count(records):
    from medtl.config import load_config as load
    from medtl.data.manifest import read_manifest
    from medtl.data.pipeline import build_sample_dataset, sample_counts

    cfg = load(os.path.join(JOBS, "smoke.yaml"), [f"data.records={records}"])
    manifest = read_manifest(records)
    counts = [s.records for s in manifest.splits["train"].shards]
    takes = sample_counts(manifest, "train", 50)
    assert sum(takes) == 50 and all(0 <= t <= c for t, c in zip(takes, counts))
    assert all(abs(t - 50 * c / sum(counts)) < 1 for t, c in zip(takes, counts))  # proportional
    assert sample_counts(manifest, "train", 10**6) == counts  # smaller split: all of it

    def sums(rank, ranks):
        return [float(x.sum()) for images, _, _ in build_sample_dataset(cfg, manifest, "train", 50, rank, ranks)
                for x in images.numpy()]

    one = sums(0, 1)
    assert len(one) == 50 and sums(0, 1) == one  # the same images every epoch
    assert sorted(sums(0, 2) + sums(1, 2)) == sorted(one)
