"""Is the run overfitting? One pure function over the training history, and the remedies it did not use.

Two signs, each on the history's macro AUROCs (train: the fixed train sample; val: the whole split):
- val AUROC falls while train AUROC rises for evaluate.overfit_patience consecutive epochs of a phase
  (phases are not chained: each starts from the previous one's best weights);
- train AUROC exceeds val AUROC by more than evaluate.overfit_gap at the best epoch (the weights the
  report evaluates) or at the last epoch (where the curves end).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

from medtl.evaluate.curve import LearningCurve
from medtl.train.rundir import EpochPoint


@dataclass(frozen=True)
class RunSetup:
    """Which of the usual remedies for overfitting the run's config already uses."""

    dropout: bool
    augmentation: bool
    weight_decay: bool
    early_stopping: bool


def run_setup(cfg) -> RunSetup:
    return RunSetup(dropout=any(layer.kind == "dropout" and layer.rate > 0 for layer in cfg.model.head.layer_list()), augmentation=bool(cfg.data.augment),
                    weight_decay=any(p.weight_decay > 0 for p in cfg.phases),
                    early_stopping=any(p.early_stopping_patience > 0 for p in cfg.phases))


@dataclass(frozen=True)
class OverfitFinding:
    flagged: bool
    reasons: tuple[str, ...]        # the signs found, in words
    remedies: tuple[str, ...]       # remedies the run did not use (only when flagged)
    note: str                       # why nothing could be judged, or ''
    best_epoch: int | None          # global epoch (from 1) of the best val AUROC
    gap_at_best: float | None       # train - val macro AUROC there
    gap_at_last: float | None
    longest_divergence: int         # most consecutive epochs of val falling while train rose

    def to_dict(self) -> dict:
        return asdict(self)


def _divergence(points: Sequence[EpochPoint]) -> tuple[int, tuple[EpochPoint, EpochPoint] | None]:
    """(longest streak of epochs where val AUROC fell and train AUROC rose, its first and last point)."""
    best, span, streak, start = 0, None, 0, None
    for before, now in zip(points, points[1:]):
        if now.phase != before.phase:
            streak = 0
            continue
        if now.val_auroc < before.val_auroc and now.train_auroc > before.train_auroc:
            streak, start = streak + 1, (start if streak else before)
            if streak > best:
                best, span = streak, (start, now)
        else:
            streak = 0
    return best, span


def _remedies(setup: RunSetup, curve: LearningCurve | None) -> tuple[str, ...]:
    more_data = (f"more data: the learning curve of {curve.head} is {curve.verdict()}" if curve is not None else
                 "more data: `medtl search --fractions 0.25,0.5,1.0` draws the learning curve that says whether "
                 "it would help (set evaluate.learning_curve to its learning_curve.json)")
    unused = [more_data]
    if not setup.dropout:
        unused.append("dropout: the head has none (model.head.dropout, or a dropout layer in model.head.layers)")
    if not setup.augmentation:
        unused.append("augmentation: data.augment is empty")
    if not setup.weight_decay:
        unused.append("weight decay: every phase has weight_decay 0 (use optimizer adamw or sgd with "
                      "phases[].weight_decay, e.g. 1.0e-4)")
    if not setup.early_stopping:
        unused.append("early stopping: every phase has early_stopping_patience 0")
    return tuple(unused)


def analyse_overfitting(history: Sequence[EpochPoint], patience: int, gap: float, setup: RunSetup,
                        curve: LearningCurve | None = None) -> OverfitFinding:
    """The finding for a run's history; flags at `patience` diverging epochs or a gap above `gap`."""
    points = [p for p in history if p.train_auroc is not None and p.val_auroc is not None]
    if not points:
        note = ("no training history" if not history else "the history has no train AUROC (trained before medtl "
                "logged it, or with train.train_eval_images: 0), so overfitting cannot be judged")
        return OverfitFinding(False, (), (), note, None, None, None, 0)
    best = max(points, key=lambda p: p.val_auroc)  # the first of equals, as training keeps the first
    last = points[-1]
    gap_best, gap_last = best.train_auroc - best.val_auroc, last.train_auroc - last.val_auroc
    streak, span = _divergence(points)
    reasons = []
    if streak >= patience:
        a, b = span
        reasons.append(f"val AUROC fell while train AUROC rose for {streak} consecutive epochs (epochs {a.epoch + 1}-"
                       f"{b.epoch + 1} of phase '{b.phase}': val {a.val_auroc:.3f} -> {b.val_auroc:.3f}, train "
                       f"{a.train_auroc:.3f} -> {b.train_auroc:.3f}; evaluate.overfit_patience {patience})")
    for where, point, value in (("the best epoch", best, gap_best), ("the last epoch", last, gap_last)):
        if value > gap and not (where == "the last epoch" and point is best):
            reasons.append(f"train macro AUROC exceeds val by {value:.3f} at {where} ({point.epoch + 1}: train "
                           f"{point.train_auroc:.3f}, val {point.val_auroc:.3f}; evaluate.overfit_gap {gap:g})")
    flagged = bool(reasons)
    return OverfitFinding(flagged, tuple(reasons), _remedies(setup, curve) if flagged else (), "", best.epoch + 1,
                          gap_best, gap_last, streak)
