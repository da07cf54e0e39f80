"""`medtl bench pretrain` through the CLI on tiny records, and data.train_fraction's subsets (nested,
patient-level, the size asked for) read back from the pipeline itself."""
import math
import os
import re

import pytest

from conftest import REPO, assert_user_error, run_cli

TINY = os.path.join(REPO, "tests", "reliability", "tiny.yaml")


def _train_patients(records, fraction):
    """{patient: records of it} that the train stream at `fraction` reads, and the stream's record count."""
    import dataclasses

    from medtl.config import load_config
    from medtl.data.manifest import read_manifest
    from medtl.data.pipeline import build_dataset, records_in

    cfg = load_config(TINY, [f"data.records={records}", f"data.train_fraction={fraction}"])
    manifest = read_manifest(records)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, augment=()))
    counts = {}
    for _, _, _, patients, _ in build_dataset(cfg, "train", manifest=manifest, training=False, with_ids=True):
        for patient in patients.numpy():
            counts[patient] = counts.get(patient, 0) + 1
    assert sum(counts.values()) == records_in(cfg, manifest, "train")
    return counts


def test_train_fraction_subsets_are_nested_and_patient_level(records):
    full = _train_patients(records, 1.0)
    small, large = _train_patients(records, 0.3), _train_patients(records, 0.6)
    total = sum(full.values())
    for fraction, subset in ((0.3, small), (0.6, large)):  # at least the fraction of the images, barely
        assert sum(subset.values()) >= fraction * total > sum(subset.values()) - max(subset.values())
    assert set(small) < set(large) < set(full)  # nested
    for subset in (small, large):
        assert all(subset[p] == full[p] for p in subset)  # every study of a kept patient, none of the others


def test_train_fraction_too_small_is_refused(records, tmp_path):
    r = run_cli("train", "--config", TINY, "--workdir", tmp_path / "run", "--set", f"data.records={records}",
                "--set", "data.train_fraction=0.01")
    assert_user_error(r, "data.train_fraction=0.01 keeps", "fewer than one global batch", "raise data.train_fraction",
                      exit_code=2)
    assert_user_error(run_cli("train", "--config", TINY, "--workdir", tmp_path / "run2", "--set",
                              f"data.records={records}", "--set", "data.train_fraction=1.5"),
                      "data.train_fraction", "must be in (0, 1]", exit_code=2)


@pytest.mark.slow
def test_bench_pretrain_compares_both_arms_per_fraction(records, tmp_path):
    phases = "phases=[{name: head, epochs: 1, learning_rate: 0.001, trainable: none}, " \
             "{name: top, epochs: 1, learning_rate: 0.001, trainable: all}]"
    r = run_cli("bench", "pretrain", "--config", TINY, "--pretrain-config", TINY, "--records", records,
                "--archive", records, "--fractions", "0.5", "--set", "pretrain.method=supervised",
                "--set", phases, "--set", "evaluate.bootstrap=0", "--set", "data.image_size=32", "--keep", tmp_path / "work")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = re.findall(r"^\| (\d+)% \| (\d+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([+-][\d.]+) \|$",
                      r.stdout, re.M)
    # One fraction (each costs a pretrained and a scratch training with their evaluations); the subset
    # path, the one with a choice of patients. Fraction 1 is the ordinary run of the other tests.
    assert [row[0] for row in rows] == ["50"], r.stdout
    for fraction, images, patients, head, pretrained, scratch, gap in rows:
        assert float(gap) == pytest.approx(float(pretrained) - float(scratch), abs=2e-3)
    full, half = _train_patients(records, 1.0), _train_patients(records, 0.5)
    assert (int(rows[0][1]), int(rows[0][2])) == (sum(half.values()), len(half))
    assert int(rows[0][1]) >= 0.5 * sum(full.values()) and int(rows[0][2]) < len(full)
    work = tmp_path / "work"
    # The scratch arm trains every layer from a random base for all the phases' epochs, in one phase.
    from medtl.config import load_config

    scratch = load_config(str(work / "scratch-0p5" / "config.yaml"))
    assert scratch.model.weights == "none" and [(p.epochs, p.trainable.kind) for p in scratch.phases] == [(2, "all")]
    pretrained = load_config(str(work / "pretrained-0p5" / "config.yaml"))
    assert pretrained.model.weights == str(work / "base" / "base.weights.h5") and pretrained.data.train_fraction == 0.5


def test_bench_pretrain_user_errors(tmp_path):
    from medtl.bench.pretrain import parse_fractions

    assert parse_fractions("1,0.05,0.25") == (0.05, 0.25, 1.0)  # the table's rows, smallest first
    assert_user_error(run_cli("bench", "pretrain", "--fractions", "0,0.5"), "--fractions", "(0, 1]")
    assert_user_error(run_cli("bench", "pretrain", "--fractions", "a"), "--fractions", "numbers")
    assert_user_error(run_cli("bench", "pretrain", "--base", tmp_path / "absent.h5"), "--base", "is not a file")
