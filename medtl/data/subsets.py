"""Nested, patient-level subsets of a split: subset transfer (`medtl search --fractions`) and label budgets
(data.train_fraction: `medtl train`, `medtl bench pretrain`).

The one place subsets are chosen. Input: each record's salted patient hash, labels and mask (the
feature cache keeps them per row). One seeded order of the patients is cut at each fraction, so the
10% subset's patients are inside the 30% subset's, and the same seed gives the same patients whatever
the record order or rank count. The order starts with one positive patient per label (rarest label
first), so every cut that holds those patients keeps a positive of every label the split has.
Imports numpy only (config.py checks fractions through here).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from medtl.errors import ConfigError


def fractions_problem(fractions) -> str:
    """Why a list of fractions is unusable ('' when it is fine): each in (0, 1], none twice."""
    for value in fractions:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
            return f"must be fractions in (0, 1] (e.g. 0.1,0.3,1.0), got {value!r}"
    if len(set(float(v) for v in fractions)) != len(fractions):
        return f"lists a fraction twice: {[float(v) for v in fractions]}"
    return ""


def parse_fractions(text: str, where: str = "--fractions") -> tuple[float, ...]:
    """'0.1,0.3,1.0' -> (0.1, 0.3, 1.0), or one ConfigError naming `where`."""
    values = []
    for part in text.split(","):
        try:
            values.append(float(part))
        except ValueError:
            raise ConfigError(f"{where} {text!r}: {part.strip()!r} is not a number; give fractions in (0, 1] "
                              "separated by commas, e.g. 0.1,0.3,1.0") from None
    problem = fractions_problem(values) if values else "is empty"
    if problem:
        raise ConfigError(f"{where} {text!r} {problem}")
    return tuple(values)


@dataclass(frozen=True)
class Subset:
    """One fraction's cut of a split."""

    fraction: float
    rows: np.ndarray     # (n,) sorted indices of the split's rows in the subset
    patients: int
    digest: str          # short hash of the subset's patients (a resumed search must see the same ones)

    @property
    def images(self) -> int:
        return int(len(self.rows))


def _positive(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return (np.asarray(labels) > 0.5) & (np.asarray(mask) > 0)  # (n, L) known positives


def patient_order(patients: np.ndarray, labels: np.ndarray, mask: np.ndarray, seed: int) -> list[str]:
    """Every patient once: first one positive patient per label (rarest label first), then the rest,
    each group in a seeded order that depends on the patient hashes only."""
    def draw(p: str) -> str:
        return hashlib.sha256(f"{seed}:{p}".encode()).hexdigest()

    unique = sorted(set(patients.tolist()), key=draw)
    positive = _positive(labels, mask)
    by_patient = {p: np.zeros(positive.shape[1], bool) for p in unique}
    for p, row in zip(patients.tolist(), positive):
        by_patient[p] |= row
    counts = sum(by_patient.values(), np.zeros(positive.shape[1], int))
    first: list[str] = []
    covered = np.zeros(positive.shape[1], bool)
    for label in np.argsort(counts, kind="stable"):
        if counts[label] == 0 or covered[label]:
            continue
        chosen = next(p for p in unique if by_patient[p][label])
        first.append(chosen)
        covered |= by_patient[chosen]
    chosen_set = set(first)
    return first + [p for p in unique if p not in chosen_set]


def select_subsets(patients: np.ndarray, labels: np.ndarray, mask: np.ndarray, fractions, seed: int,
                   label_names, where: str = "--fractions/search.fractions") -> dict[float, Subset]:
    """{fraction: Subset}: the shortest prefix of patient_order() holding fraction x the split's images.

    A fraction whose subset has no positive of a label the whole split has is a ConfigError naming the
    fraction, the label and the smallest fraction that keeps one."""
    patients = np.asarray(patients)
    order = patient_order(patients, labels, mask, seed)
    rows_of: dict[str, list[int]] = {}
    for i, p in enumerate(patients.tolist()):
        rows_of.setdefault(p, []).append(i)
    cumulative = np.cumsum([len(rows_of[p]) for p in order])
    total = int(cumulative[-1]) if len(order) else 0
    positive = _positive(labels, mask)
    has_any = positive.any(axis=0)
    out = {}
    for fraction in sorted(float(f) for f in fractions):
        count = 1 + int(np.searchsorted(cumulative, fraction * total - 1e-9))  # patients in the prefix
        count = min(max(count, 1), len(order))
        rows = np.sort(np.concatenate([rows_of[p] for p in order[:count]])).astype(np.int64)
        missing = [i for i in np.flatnonzero(has_any) if not positive[rows, i].any()]
        if missing:
            _raise_no_positives(fraction, missing[0], rows, total, count, order, rows_of, positive, label_names,
                                where)
        digest = hashlib.sha256("\n".join(sorted(order[:count])).encode()).hexdigest()[:12]
        out[fraction] = Subset(fraction, rows, count, digest)
    return out


def _raise_no_positives(fraction, label, rows, total, count, order, rows_of, positive, label_names, where):
    needed = next(k for k in range(1, len(order) + 1)
                  if positive[np.concatenate([rows_of[p] for p in order[:k]]), label].any())
    images = sum(len(rows_of[p]) for p in order[:needed])
    smallest = math.ceil(images / total * 1000) / 1000  # rounded up: a cut at it holds that positive
    raise ConfigError(
        f"fraction {fraction:g} of {where} leaves label {label_names[label]!r} without "
        f"positives in its train subset ({len(rows)} of {total} train images, {count} patients; the split has "
        f"{int(positive[:, label].sum())} positive image(s) of it); use fractions of at least "
        f"{smallest:g}, or leave that fraction out")
