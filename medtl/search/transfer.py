"""Subset transfer: does the head ranking found on a fraction of the train patients hold on the largest?

How heads that successive halving pruned early are ranked: by the search's own verdict, the
leaderboard order (highest rung reached, then val AUROC there; see report.write_leaderboard). A head
pruned at rung 1 lost to the heads above it at that rung, which is what the search decided; its
first-rung score is all there is of it. The alternatives measure something no decision rests on:
first-rung scores alone rank every head after one epoch (what the search sees before it prunes, not
what it picks), and full-schedule scores exist only for the 1/reduction_factor^k survivors, too few for
a rank correlation. Heads are compared where both fractions explored them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from medtl.data.subsets import Subset


@dataclass(frozen=True)
class FractionRun:
    """One fraction's search: its subset of the train split and its Optuna study."""

    fraction: float
    subset: Subset
    study: object


def ranking_key(trial, rungs: tuple[int, ...]) -> tuple:
    """The leaderboard's order: highest rung reached, then best val AUROC there, then trial number. Epochs
    past a rung (a second look, a budget stop between rungs) do not rank a trial above those it met there."""
    reached = [r for r in rungs if r in trial.intermediate_values]
    top = max(reached) if reached else max(trial.intermediate_values)  # killed before the first rung
    value = trial.intermediate_values[top]
    return (-top, -value if not math.isnan(value) else math.inf, trial.number)


def head_ranking(study, rungs: tuple[int, ...]) -> list[str]:
    """Head keys of the study's finished trials, best first (a head retried after a kill counts once)."""
    from optuna.trial import TrialState

    finished = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
                if t.intermediate_values and not math.isnan(t.intermediate_values[max(t.intermediate_values)])]
    ranking: list[str] = []
    for t in sorted(finished, key=lambda t: ranking_key(t, rungs)):
        if t.user_attrs["head"] not in ranking:
            ranking.append(t.user_attrs["head"])
    return ranking


@dataclass(frozen=True)
class Agreement:
    common: int                 # heads ranked at both fractions
    kendall_tau: float | None   # scipy.stats.kendalltau of their two rank orders; None for < 2 heads
    top_k: int                  # k used: search.top_k, at most `common`
    top_k_overlap: float | None  # share of the reference's best k (among common heads) also in this one's


def compare_rankings(ranking: list[str], reference: list[str], k: int) -> Agreement:
    """How `ranking` (a smaller fraction's) agrees with `reference` (the largest fraction's), on common heads."""
    from scipy.stats import kendalltau

    common = [h for h in reference if h in set(ranking)]
    if not common:
        return Agreement(0, None, 0, None)
    mine = [h for h in ranking if h in set(common)]
    k = min(k, len(common))
    overlap = len(set(mine[:k]) & set(common[:k])) / k
    if len(common) < 2:
        return Agreement(len(common), None, k, overlap)
    tau = kendalltau([mine.index(h) for h in common], list(range(len(common)))).statistic
    return Agreement(len(common), None if math.isnan(tau) else float(tau), k, overlap)


def full_schedule_score(study, head_key: str, full_epochs: int) -> float | None:
    """The head's val AUROC after the full schedule in this study, when a trial of it got there."""
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("head") == head_key and full_epochs in t.intermediate_values:
            return float(t.intermediate_values[full_epochs])
    return None
