"""Patient-level train/val/test splits with multi-label iterative stratification.

Every image of a patient lands in the same split. Patients are stratified on
the union of their images' labels (iterstrat), so per-label prevalence stays
close across splits. Patients without labels (an unlabeled ingest) are split at random, by the same
fractions. Seeded: the same inputs and seed give the same split.
"""
from __future__ import annotations

import numpy as np

from medtl.errors import MedtlError


def split_patients(patient_labels: dict[str, np.ndarray], val_fraction: float, test_fraction: float,
                   seed: int) -> dict[str, str]:
    """{patient: 'train' | 'val' | 'test'} for patients with (num_labels,) 0/1 label unions."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise MedtlError(
            f"split fractions val={val_fraction} test={test_fraction} must each be in [0, 1) and sum below 1"
        )
    patients = sorted(patient_labels)
    if len(patients) < 3 and (val_fraction or test_fraction):
        raise MedtlError(f"only {len(patients)} patient(s): a patient-level split needs at least 3")
    y = np.stack([patient_labels[p] for p in patients]).astype(int)
    stratified = y.shape[1] > 0
    # A "no finding" column keeps healthy patients stratified too.
    y = np.concatenate([y, (y.sum(axis=1) == 0).astype(int)[:, None]], axis=1)
    index = np.arange(len(patients))
    assignment = {}

    def carve(pool: np.ndarray, fraction: float, rng_seed: int) -> tuple[np.ndarray, np.ndarray]:
        if fraction <= 0 or len(pool) < 2:
            return pool, pool[:0]
        n_out = max(1, int(round(fraction * len(pool))))
        if n_out >= len(pool):
            n_out = len(pool) - 1
        if not stratified:  # nothing to stratify on: a seeded draw of patients
            order = np.random.default_rng(rng_seed).permutation(len(pool))
            return np.sort(pool[order[n_out:]]), np.sort(pool[order[:n_out]])
        splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=n_out, random_state=rng_seed)
        keep, out = next(splitter.split(pool[:, None], y[pool]))
        return pool[keep], pool[out]

    rest, test = carve(index, test_fraction, seed)
    val_of_rest = val_fraction / (1.0 - test_fraction) if test_fraction < 1 else 0.0
    train, val = carve(rest, val_of_rest, seed + 1)
    for split, members in (("train", train), ("val", val), ("test", test)):
        for i in members:
            assignment[patients[i]] = split
    return assignment
