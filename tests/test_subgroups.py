"""Subgroups: which values are merged into "other", and when "other" is suppressed (by patients, not images)."""
import numpy as np

from medtl.evaluate.subgroups import assign_groups


def test_small_values_merge_into_other_and_a_small_other_is_suppressed():
    # Patients per value: A 6 (12 images), B 2 (4 images), C 2, "" (unknown) 1 (3 images).
    values = np.array(["A"] * 12 + ["B"] * 4 + ["C"] * 2 + [""] * 3)
    patients = np.array([f"a{i % 6}" for i in range(12)] + ["b0", "b0", "b1", "b1", "c0", "c1", "u0", "u0", "u0"])
    groups, merged, suppressed = assign_groups(values, patients, 6)
    assert merged == ["B", "C", "unknown"] and suppressed == ["other"]  # other: 5 patients < 6
    assert list(groups) == ["A"] * 12 + [""] * 9
    groups, merged, suppressed = assign_groups(values, patients, 5)
    assert merged == ["B", "C", "unknown"] and suppressed == []  # other: 5 patients, enough
    assert list(groups) == ["A"] * 12 + ["other"] * 9
    groups, merged, suppressed = assign_groups(values, patients, 7)
    assert merged == ["A", "B", "C", "unknown"] and suppressed == [] and set(groups) == {"other"}  # 11 patients
    groups, merged, suppressed = assign_groups(values, patients, 12)
    assert suppressed == ["other"] and not any(groups)
    groups, merged, suppressed = assign_groups(values, patients, 1)
    assert merged == suppressed == [] and list(groups) == list(np.where(values == "", "unknown", values))
