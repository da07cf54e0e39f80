"""learning_curve.json: val AUROC of one head against the fraction of training data, and what it says.

`medtl search --fractions` writes it (the best head retrained at every fraction); the evaluation
report reads it (evaluate.learning_curve, which best.yaml sets) to say whether more data would help
an overfitting run. This module alone reads and writes the file.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

from medtl.errors import MedtlError
from medtl.utils import fs

CURVE_FILE = "learning_curve.json"
# Val macro AUROC gained per doubling of the training data, between the two largest fractions, above
# which the curve counts as still rising. 0.005 is about the AUROC difference a val split of a few
# thousand patients resolves; a smaller gain is within the noise of one training.
RISE_PER_DOUBLING = 0.005


@dataclass(frozen=True)
class CurvePoint:
    fraction: float
    train_images: int
    train_patients: int
    val_auroc: float


@dataclass(frozen=True)
class LearningCurve:
    head: str                        # the head's key (medtl.search.space.Head.key)
    epochs: int                      # each point: this many epochs (phase 1's full schedule)
    points: tuple[CurvePoint, ...]   # by fraction, ascending

    def gain_per_doubling(self) -> float | None:
        """Val AUROC gained per doubling of the data between the two largest fractions (None: < 2 points)."""
        if len(self.points) < 2:
            return None
        a, b = self.points[-2], self.points[-1]
        return (b.val_auroc - a.val_auroc) / math.log2(b.fraction / a.fraction)

    def rising(self) -> bool | None:
        gain = self.gain_per_doubling()
        return None if gain is None else gain > RISE_PER_DOUBLING

    def verdict(self) -> str:
        """One sentence a user reads: is more data likely to help?"""
        gain = self.gain_per_doubling()
        if gain is None:
            return "one fraction only: the learning curve shows no trend"
        a, b = self.points[-2], self.points[-1]
        span = (f"{gain:+.3f} val AUROC per doubling of the data between {a.fraction:.0%} and {b.fraction:.0%} "
                f"({a.val_auroc:.3f} -> {b.val_auroc:.3f})")
        if gain > RISE_PER_DOUBLING:
            return f"still rising at {b.fraction:.0%} ({span}): more data is likely to help"
        return f"not rising at {b.fraction:.0%} ({span}): more data alone is unlikely to help much"

    def to_dict(self) -> dict:
        return {"head": self.head, "epochs": self.epochs, "points": [asdict(p) for p in self.points],
                "gain_per_doubling": self.gain_per_doubling(), "verdict": self.verdict()}


def write_learning_curve(folder: str, curve: LearningCurve) -> str:
    path = os.path.join(folder, CURVE_FILE)
    fs.write_text_atomic(path, json.dumps(curve.to_dict(), indent=2))
    return path


def read_learning_curve(path: str, key: str = "evaluate.learning_curve") -> LearningCurve:
    """The curve at `path`, or one MedtlError naming `key` and the file."""
    try:
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
        points = tuple(CurvePoint(float(p["fraction"]), int(p["train_images"]), int(p["train_patients"]),
                                  float(p["val_auroc"])) for p in raw["points"])
        return LearningCurve(str(raw["head"]), int(raw["epochs"]), tuple(sorted(points, key=lambda p: p.fraction)))
    except FileNotFoundError:
        raise MedtlError(f"{key}: {path} does not exist; point it at the learning_curve.json of a "
                         "`medtl search --fractions` run, or set it to ''") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MedtlError(f"{key}: {path} is not a learning curve written by `medtl search --fractions` "
                         f"({type(exc).__name__}: {exc}); run the search again or set it to ''") from None
