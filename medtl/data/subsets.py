"""Nested, patient-level subsets of the train split (data.train_fraction): learning curves and label-budget
benchmarks train on the first F of the train split's patients, in an order fixed by the seed.

Patients are ranked by a seeded hash of their salted id, and a subset is a prefix of that ranking, so the
patients of a smaller fraction are inside every larger one (nested), a patient's images stay together
(patient-level), and the same seed gives the same patients on every rank and machine. Pure: the pipeline
(medtl.data.pipeline.train_subset) reads the ids and applies the subset.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from medtl.errors import ConfigError


def patient_order(patients, seed: int) -> list[str]:
    """The train split's patients (salted ids) in the seeded order subsets take them from."""
    return sorted(set(patients), key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).digest())


def subset_patients(patients, fraction: float, seed: int) -> frozenset:
    """The first ceil(fraction x patients) patients of patient_order (at least one)."""
    ordered = patient_order(patients, seed)
    count = len(ordered) if fraction >= 1 else max(1, math.ceil(fraction * len(ordered)))
    return frozenset(ordered[:count])


@dataclass(frozen=True)
class TrainSubset:
    """The train split's records that data.train_fraction keeps."""

    fraction: float
    seed: int
    patients: frozenset       # salted patient ids kept
    total_patients: int
    records: int              # records kept
    positives: dict           # label -> positives among the kept records (known labels only)


def select(patients: np.ndarray, labels: np.ndarray, mask: np.ndarray, label_names, fraction: float,
           seed: int, where: str = "data.train_fraction") -> TrainSubset:
    """The subset of one split's records (patients (n,), labels and mask (n, L)); refuses, in one line, a
    subset that leaves a label without a known positive (no AUROC, and nothing for the loss to learn)."""
    kept = subset_patients(patients, fraction, seed)
    rows = np.array([p in kept for p in patients], bool)
    positives = {name: int(((labels[rows, i] > 0) & (mask[rows, i] > 0)).sum()) for i, name in enumerate(label_names)}
    empty = [name for name, count in positives.items() if count == 0]
    if empty:
        raise ConfigError(f"{where}={fraction:g} keeps {len(kept)} of {len(set(patients))} train patients "
                          f"({int(rows.sum())} records), with no positive for {', '.join(empty)}; raise {where} "
                          "(or ingest more studies)")
    return TrainSubset(fraction, seed, kept, len(set(patients)), int(rows.sum()), positives)
