"""`medtl search`: the space file, bad input at start, the feature cache reused, resume after a kill,
and the emitted best.yaml trained by `medtl train`."""
from __future__ import annotations

import csv
import html
import json
import os
import re
import sqlite3

import pytest
import yaml

from medtl.config import load_config
from medtl.data.manifest import read_manifest
from medtl.errors import ConfigError
from medtl.evaluate.curve import read_learning_curve
from medtl.search.run import failed_starts, halving_cost, plan_search
from medtl.search.space import defaults_from, load_space, parse_space

from conftest import JOBS, assert_user_error, cli_env, run_cli

SMOKE = os.path.join(JOBS, "smoke.yaml")
TINY = os.path.join(JOBS, "search", "tiny.yaml")
HEADS = os.path.join(JOBS, "search", "heads.yaml")


def defaults():
    cfg = load_config(SMOKE)
    return defaults_from(cfg.model.head, cfg.phases[0].learning_rate, cfg.train.loss.name)


# ----------------------------------------------------------------------------- the space


def test_shipped_spaces_load_and_heads_has_at_least_24_heads():
    heads = load_space(HEADS, defaults())
    assert heads.size >= 24 and heads.uses_conv
    assert len(heads.grid()) == heads.size
    assert len({heads.head(p).key() for p in heads.grid()}) == heads.size  # every grid point a distinct head
    tiny = load_space(TINY, defaults())
    assert tiny.size == 4 and not tiny.uses_conv


def test_space_choices_become_the_head():
    space = parse_space({"dense": [[], [512, 64]], "loss": ["bce", "focal"], "learning_rate": ["1e-4"]}, defaults())
    head = space.head({"dense": "512-64", "loss": "focal"})
    assert head.head.dense == (512, 64) and head.loss == "focal" and head.learning_rate == pytest.approx(1e-4)
    assert head.head.pooling == "avg"  # left out: the base config's


@pytest.mark.parametrize("raw, fragments", [
    (None, ["is empty", "pooling, conv_filters, dense"]),
    ({}, ["is empty"]),
    ([1, 2], ["must be a mapping"]),
    ({"pooling": ["avg"], "units": [64]}, ["unknown key 'units'", "valid keys are: pooling, conv_filters, dense"]),
    ({"pooling": ["mean"]}, ["'pooling.0'", "unknown pooling 'mean'", "avg, max, gem"]),
    ({"activation": ["relu", "tanh"]}, ["'activation.1'", "unknown activation 'tanh'", "relu, swish, gelu, elu"]),
    ({"loss": ["mse"]}, ["'loss.0'", "unknown loss 'mse'", "bce, weighted_bce, focal, asl"]),
    ({"dropout": 0.3}, ["'dropout'", "must be a list of choices"]),
    ({"dropout": [1.5]}, ["'dropout.0'", "[0, 1)"]),
    ({"conv_filters": ["wide"]}, ["'conv_filters.0'", "int >= 0"]),
    ({"dense": [512]}, ["'dense.0'", "list of layer sizes"]),
    ({"learning_rate": [0]}, ["'learning_rate.0'", "> 0"]),
    ({"batch_norm": ["yes"]}, ["'batch_norm.0'", "true or false"]),
    ({"pooling": []}, ["'pooling'", "no choices"]),
    ({"pooling": ["avg", "avg"]}, ["lists a choice twice"]),
])
def test_bad_spaces_name_the_key_and_valid_values(raw, fragments):
    with pytest.raises(ConfigError) as err:
        parse_space(raw, defaults())
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)


def test_budget_plan():
    cfg = load_config(SMOKE, ["phases.0.epochs=9"])
    space = load_space(HEADS, defaults())
    plan = plan_search(cfg, space, 8)
    assert plan.rungs == (1, 3, 9) and plan.budget_epochs == 72
    assert halving_cost(plan.trials, plan.rungs, 3) <= 72 < halving_cost(plan.trials + 1, plan.rungs, 3)
    with pytest.raises(ConfigError, match="less than one rung"):
        plan_search(cfg, space, 0.1)
    with pytest.raises(ConfigError, match="min_epochs"):
        plan_search(load_config(SMOKE, ["phases.0.epochs=9", "search.min_epochs=10"]), space, 8)


def test_a_second_look_judges_by_optunas_halving_rule_against_the_first_rung():
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.pruners._successive_halving import _is_trial_promotable_to_next_rung
    from optuna.trial import TrialState, create_trial

    from medtl.search.run import first_rung_scores, promotable

    others = [0.86, 0.85, 0.84, 0.83, 0.82, 0.81, 0.80, 0.79]
    # 9 values with eta 3 keep the best 3: the third best of the others and the new value is 0.84.
    assert promotable(0.84, others, 3) and not promotable(0.8399, others, 3)
    assert promotable(0.83, others, 2) and not promotable(0.8299, others, 2)  # 9 // 2 = 4: among the best 4
    assert promotable(0.1, [], 3)  # alone, as Optuna's pruner promotes its first trials
    for value in (0.1, 0.8, 0.84, 0.9):  # the same answers as Optuna's own rule
        for eta in (2, 3, 4):
            assert promotable(value, others, eta) == _is_trial_promotable_to_next_rung(
                value, others + [value], eta, optuna.study.StudyDirection.MAXIMIZE)

    study = optuna.create_study(direction="maximize")
    dist = {"learning_rate": CategoricalDistribution([0.01])}
    for values in ({1: 0.8, 3: 0.85}, {1: 0.7}, {3: 0.9}, {1: float("nan")}):  # reached the rung, or not
        study.add_trial(create_trial(state=TrialState.PRUNED, params={"learning_rate": 0.01}, distributions=dist,
                                     intermediate_values=values))
    assert first_rung_scores(study.get_trials(), 1) == {0: 0.8, 1: 0.7}
    assert first_rung_scores(study.get_trials(), 1, exclude=1) == {0: 0.8}


def _objective_on_curves(monkeypatch, curves: dict, overrides: list[str]):
    """medtl search's objective with scripted val AUROC per learning rate in place of training on the cache,
    one trial per learning rate in the given order; returns the study."""
    import optuna

    from medtl.search import run as search_run
    from medtl.search import trial as search_trial

    def scripted(cfg, head, manifest, train, val, shape, pooled, epochs, on_epoch):
        history = []
        for epoch, auroc in enumerate(curves[head.learning_rate][:epochs], 1):
            history.append(auroc)
            if not on_epoch(epoch, auroc):
                break
        return history

    monkeypatch.setattr(search_trial, "train_on_cache", scripted)
    cfg = load_config(SMOKE, overrides)
    space = parse_space({"heads": {"gap": [{"global_pool": "avg"}]}, "learning_rate": list(curves)}, defaults())
    plan = search_run.plan_search(cfg, space, len(curves))
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.SuccessiveHalvingPruner(
        min_resource=cfg.search.min_epochs, reduction_factor=cfg.search.reduction_factor))
    for lr in curves:
        study.enqueue_trial({"learning_rate": lr})
    index = {"meta": {"pooled": False}, "feature_shape": [3, 3, 8]}
    study.optimize(search_run.build_objective(cfg, space, plan, study, None, None, None, index, "",
                                              cfg.search.second_look_below), n_trials=len(curves))
    return study


def test_a_second_look_on_a_rung_is_the_pruners_and_none_is_taken_on_the_last_epoch(monkeypatch):
    # Ten heads that learn alike (first epochs 0.800-0.845), a slow starter and a head that cannot learn.
    curves = {round(0.010 + 0.001 * i, 3): [0.80 + 0.005 * i + 0.01 * e for e in range(4)] for i in range(10)}
    curves[0.1] = [0.50, 0.95, 0.96, 0.97]
    curves[0.2] = [0.40, 0.45, 0.46, 0.47]
    # reduction_factor 2: rungs at 1, 2 and 4 epochs, so the second look (2 epochs) is a rung of its own.
    trials = _objective_on_curves(monkeypatch, curves, ["phases.0.epochs=4", "search.reduction_factor=2"]).trials
    slow, dead = trials[10], trials[11]
    assert (slow.user_attrs["second_look"], slow.state.name, max(slow.intermediate_values)) == ("promoted", "COMPLETE", 4)
    assert (dead.user_attrs["second_look"], dead.state.name, max(dead.intermediate_values)) == ("pruned", "PRUNED", 2)
    # Rungs at 1 and 2 epochs: one more epoch would be the whole schedule, so both are pruned at the first.
    trials = _objective_on_curves(monkeypatch, curves, ["phases.0.epochs=2"]).trials
    assert [(t.state.name, max(t.intermediate_values), "second_look" in t.user_attrs) for t in trials[10:]] == [
        ("PRUNED", 1, False)] * 2


def test_the_bench_replay_gives_the_first_rungs_failed_starts_their_second_look():
    import numpy as np

    from medtl.bench.search import _second_looks

    # Ten heads' curves over 3 epochs. Heads 0-7 start at 0.80-0.87, heads 8 and 9 at 0.60 and 0.50: median
    # 0.825, one robust SD 1.4826 x 0.025 = 0.037, and heads 8 and 9 lie 6.1 and 8.8 of them under it.
    first = [0.80 + 0.01 * i for i in range(8)] + [0.60, 0.50]
    second = [v + 0.01 for v in first[:8]] + [0.90, 0.70]  # head 8 a slow starter, head 9 cannot learn
    curves = np.array([[a, b, b] for a, b in zip(first, second)])
    order = np.argsort(-curves[:, 0], kind="stable")  # 7, 6, ..., 0, 8, 9
    # eta 3 keeps 3 of 10. One epoch later head 8's 0.90 is among the best 3 of itself and the others' first
    # epochs (0.80-0.87, 0.50: the third best is 0.86); head 9's 0.70 is not (0.80-0.87, 0.60: 0.85).
    assert _second_looks(curves, order, 3, 1, 3, 3, 4.0).tolist() == [8]
    assert _second_looks(curves, order, 3, 1, 2, 3, 4.0).tolist() == [8, 9]  # epoch 2 is a rung: judged there
    assert _second_looks(curves, order, 3, 1, 3, 3, 0.0).tolist() == []  # second looks off
    assert _second_looks(curves, order, 9, 1, 2, 3, 4.0).tolist() == [9]  # a kept head needs no second look


def test_a_study_resumes_only_with_its_second_look_setting_and_old_studies_without_them():
    import types

    import optuna

    from medtl.errors import MedtlError
    from medtl.search.run import _check_same_search

    cfg = load_config(SMOKE, ["phases.0.epochs=2"])
    space = load_space(TINY, defaults())
    plan, whole = plan_search(cfg, space, 2), types.SimpleNamespace(fraction=1.0, digest="")
    new = optuna.create_study()
    assert _check_same_search(new, cfg, space, plan, whole) == 4.0  # a new study records its setting
    assert _check_same_search(new, cfg, space, plan, whole) == 4.0  # and resumes with it
    with pytest.raises(MedtlError, match="search.second_look_below"):
        _check_same_search(new, load_config(SMOKE, ["phases.0.epochs=2", "search.second_look_below=0"]), space,
                           plan, whole)
    fingerprint = json.loads(new.user_attrs["search"])
    del fingerprint["second_look_below"]  # what studies recorded before second looks
    old = optuna.create_study()
    old.set_user_attr("search", json.dumps(fingerprint, sort_keys=True))
    assert _check_same_search(old, cfg, space, plan, whole) == 0.0  # resumes as it began: no second looks
    restarted = optuna.create_study()  # a study of medtl 2026-12-05, which restarted failed starts instead
    restarted.set_user_attr("search", json.dumps(fingerprint | {"restart_below": 4.0}, sort_keys=True))
    with pytest.raises(MedtlError, match="restarted failed starts .* a new --workdir or --study-name"):
        _check_same_search(restarted, cfg, space, plan, whole)


def test_failed_starts_are_far_below_the_first_rungs_median(tmp_path):
    # Nine first-rung scores: median 0.83; absolute deviations 0.13, 0.03, 0.02, 0.01, 0, 0.01, 0.02, 0.03,
    # 0.04 have median 0.02, so one robust standard deviation is 1.4826 x 0.02 = 0.029652. Trial 8's 0.70
    # is 0.13 / 0.029652 = 4.38 of them under the median; the next lowest, 0.80, is 1.01.
    scores = {i: 0.80 + 0.01 * i for i in range(8)} | {8: 0.70}
    assert failed_starts(scores, 4.0) == [8]
    assert failed_starts(scores, 4.5) == []
    assert failed_starts(scores, 0.0) == []  # search.second_look_below: 0 turns second looks off
    assert failed_starts({i: scores[i] for i in (1, 2, 3, 4, 5, 6, 8)}, 1.0) == []  # 7 scores: too few to tell
    assert failed_starts({i: 0.8 for i in range(9)} | {9: 0.5}, 4.0) == []  # no spread to measure against
    assert failed_starts(scores | {9: float("nan")}, 4.0) == [8]  # an undefined AUROC is left out
    with pytest.raises(ConfigError, match="second_look_below"):
        load_config(SMOKE, ["search.second_look_below=-1"])
    renamed = tmp_path / "job.yaml"  # the key of medtl 2026-12-05, when failed starts were restarted
    renamed.write_text(yaml.safe_dump(yaml.safe_load(open(SMOKE)) | {"search": {"restart_below": 4}}))
    with pytest.raises(ConfigError, match="'search.restart_below' is now 'search.second_look_below'.*rename the key"):
        load_config(str(renamed))


# ----------------------------------------------------------------------------- bad input through the CLI


def search_cli(records, workdir, *extra, space=TINY, budget=2, env=None, cache=None):
    cache = cache or os.path.join(os.path.dirname(str(workdir)), "features")
    return run_cli("search", "--config", SMOKE, "--space", space, "--budget", budget, "--workdir", workdir,
                   "--set", f"data.records={records}", "--set", "phases.0.epochs=2",
                   "--set", f"search.feature_cache={cache}", *extra, env=env)


@pytest.mark.parametrize("case", ["empty", "unknown_key", "budget", "pooled_conv", "storage", "fractions",
                                  "fractions_key"])
def test_bad_input_is_one_line_at_start(case, records, tmp_path):
    space, budget, extra, fragments = TINY, 2, [], []
    if case == "fractions":
        extra, fragments = ["--fractions", "0.5,1.5"], ["--fractions '0.5,1.5'", "(0, 1]"]
    elif case == "fractions_key":
        extra, fragments = ["--set", "search.fractions=[0, 1]"], ["'search.fractions'", "(0, 1]"]
    elif case == "empty":
        space = tmp_path / "empty.yaml"
        space.write_text("# nothing yet\n")
        fragments = ["empty.yaml is empty"]
    elif case == "unknown_key":
        space = tmp_path / "bad.yaml"
        space.write_text("pooling: [avg, max]\nlayers: [1, 2]\n")
        fragments = ["unknown key 'layers'", "valid keys are"]
    elif case == "budget":
        budget, fragments = 0.2, ["--budget 0.2", "less than one rung"]
    elif case == "pooled_conv":
        space, extra = HEADS, ["--set", "search.pooled_cache=true"]
        fragments = ["conv_filters [128]", "search.pooled_cache"]
    else:
        extra, fragments = ["--storage", "nosuchdb://x"], ["search storage", "database URL"]
    r = search_cli(records, tmp_path / "run", *extra, space=space, budget=budget)
    assert_user_error(r, *fragments, exit_code=2)  # a usage error: a Job must not retry it
    assert not os.path.exists(tmp_path / "features")  # nothing extracted before the error


# ----------------------------------------------------------------------------- end to end


def finished_heads(workdir) -> list[str]:
    with sqlite3.connect(os.path.join(workdir, "study.db")) as db:
        rows = db.execute("select t.number, t.state, a.value_json from trials t join trial_user_attributes a "
                          "on a.trial_id = t.trial_id where a.key = 'head'").fetchall()
    return [(number, state, json.loads(head)) for number, state, head in rows]


@pytest.mark.slow
def test_search_resumes_reuses_the_cache_and_its_config_trains(records, tmp_path):
    run1, cache = tmp_path / "search1", tmp_path / "features"
    # 1. Killed in the middle of trial 2 (after its first epoch), as a node loss would.
    r = search_cli(records, run1, budget=4, env=cli_env(MEDTL_FAULTS="kill_trial:step=2,epoch=1"))
    assert r.returncode == -9, r.stderr
    assert "extracting EfficientNetB0 features" in r.stderr and "trial 0:" in r.stderr
    before = finished_heads(run1)
    assert [n for n, _, _ in before] == [0, 1, 2] and before[0][1] == "COMPLETE" and before[2][1] == "RUNNING"

    # 2. The same command resumes: trials 0 and 1 are kept, trial 2's head runs again, no head twice. The
    # retry has no grid point and finishes with one grid point left, where Optuna's grid sampler looks one up.
    r = search_cli(records, run1, budget=4)
    assert r.returncode == 0, r.stderr
    assert "resuming study 'medtl-head-search': 2 finished trial(s) kept, 1 interrupted trial(s) queued again" \
        in r.stderr
    assert "reusing the feature cache" in r.stderr and "extracting" not in r.stderr
    assert "trial 1:" not in r.stderr and "trial 3:" in r.stderr  # trial 3 is trial 2's head again
    after = finished_heads(run1)
    assert after[:2] == before[:2]
    done = [h for _, s, h in after if s in ("COMPLETE", "PRUNED")]
    assert len(done) == len(set(done)) == 4, r.stderr  # all 4 heads, each finished once
    assert [s for n, s, _ in after if n == 2] == ["FAIL"] and [h for n, _, h in after if n == 3] == [before[2][2]]

    # 3. Outputs: leaderboard, HTML with progress and importance, the best head as a job config.
    with open(run1 / "leaderboard.csv") as fh:
        board = list(csv.DictReader(fh))
    assert {"val_auroc_1ep", "val_auroc_2ep", "pooling", "dense", "head"} <= set(board[0])
    assert board[0]["epochs"] == "2" and board[0]["state"] == "complete"
    page = (run1 / "search.html").read_text()
    assert "Parameter importance" in page and page.count("data:image/png;base64") >= 2
    summary = json.loads((run1 / "search_summary.json").read_text())
    assert summary["explored"] == 4 and summary["spent_full_trainings"] <= 4 + 1e-9 and summary["rungs"] == [1, 2]
    assert summary["best"]["head"] == board[0]["head"]
    best = load_config(str(run1 / "best.yaml"))
    assert best.model.head.pooling == board[0]["pooling"] and best.phases[0].epochs == 2
    assert [p.name for p in best.phases] == ["head", "top"]  # the base config's unfreezing phase follows
    assert "patient" not in (run1 / "leaderboard.csv").read_text().lower()

    # 4. A second search over the same backbone, weights, size and records reuses the cache files.
    files = sorted(p for p in cache.rglob("*") if p.is_file())
    stamps = {p: p.stat().st_mtime_ns for p in files}
    r = search_cli(records, tmp_path / "search2", budget=1)
    assert r.returncode == 0, r.stderr
    assert "reusing the feature cache" in r.stderr and "extracting" not in r.stderr
    assert sorted(p for p in cache.rglob("*") if p.is_file()) == files
    assert {p: p.stat().st_mtime_ns for p in files} == stamps

    # 5. The emitted config trains with `medtl train` (phase 1 the found head, then the base's phases).
    r = run_cli("train", "--config", run1 / "best.yaml", "--workdir", tmp_path / "train")
    assert r.returncode == 0, r.stderr
    trained = json.loads((tmp_path / "train" / "train_summary.json").read_text())
    assert trained["epochs"] == 3
    saved = yaml.safe_load((tmp_path / "train" / "config.yaml").read_text())
    assert saved["model"]["head"]["pooling"] == board[0]["pooling"]


# One linear head at 12 learning rates: logistic regression on fixed features, so every start ends near the
# same fit and the first-rung scores sit close together.
LR_SPACE = """\
heads:
  gap: [{global_pool: avg}]
learning_rate: [1.0e-2, 1.1e-2, 1.2e-2, 1.3e-2, 1.4e-2, 1.5e-2, 1.6e-2, 1.7e-2, 1.8e-2, 1.9e-2, 2.0e-2, 2.1e-2]
"""


@pytest.mark.slow
def test_failed_starts_get_a_second_look_that_promotes_a_slow_starter_only(records, tmp_path):
    """Two trials start far below the others (MEDTL_FAULTS). Trial 9 trains away from the labels throughout
    (failed_start); trial 10 reports 0 after its first epoch and 1 after its second (slow_start). Each gets
    one more epoch and is judged again against the first rung's scores: trial 9 is pruned after it, trial 10
    is promoted and trains on. Rungs at 1 and 3 epochs, so the second look (2) is not a rung; the budget
    leaves room for every head."""
    space, run = tmp_path / "lr.yaml", tmp_path / "search"
    space.write_text(LR_SPACE)
    r = search_cli(records, run, "--set", "train.batch_size=4", "--set", "phases.0.epochs=3", space=space, budget=12,
                   env=cli_env(MEDTL_FAULTS="failed_start:step=9;slow_start:step=10"))
    assert r.returncode == 0, r.stderr[-3000:]
    with open(run / "leaderboard.csv") as fh:
        board = {int(row["trial"]): row for row in csv.DictReader(fh)}
    looks = {n: row["second_look"] for n, row in board.items() if row["second_look"]}
    assert len(board) == 12 and looks == {9: "pruned", 10: "promoted"}, r.stderr[-3000:]
    failing, slow = board[9], board[10]
    first = {n: float(row["val_auroc_1ep"]) for n, row in board.items()}
    assert first[9] < 0.5 <= min(v for n, v in first.items() if n < 9) and first[10] == 0.0
    assert (failing["state"], failing["epochs"]) == ("pruned", "2")  # one epoch more, then pruned
    assert (slow["state"], slow["epochs"]) == ("complete", "3")  # promoted: on to the full schedule
    for n, row in ((9, failing), (10, slow)):
        assert (f"trial {n}: {row['head']}: first-rung val macro AUROC {first[n]:.4f} lies over 4 robust standard "
                f"deviations under the median of {n + 1} trials") in r.stderr
    assert (f"trial 9: {failing['head']}: second look after 2 epoch(s): val macro AUROC "
            f"{float(failing['val_auroc_last']):.4f}, pruned\n") in r.stderr
    assert (f"trial 10: {slow['head']}: second look after 2 epoch(s): val macro AUROC 1.0000, promoted: a slow "
            "starter\n") in r.stderr
    assert failing["rank"] == "12"  # ranked by the rung it reached, the first, where it scored lowest of all
    summary = json.loads((run / "search_summary.json").read_text())
    assert summary["second_looks"] == {"promoted": 1, "pruned": 1} and summary["spent_full_trainings"] <= 12
    assert "2 failed start(s) given a second look one epoch later, 1 promoted" in (run / "search.html").read_text()


def _kendall_by_pairs(a: list, b: list) -> float:
    """Kendall's tau of two orders of the same heads (no ties), from concordant and discordant pairs."""
    import itertools

    pairs = list(itertools.combinations(a, 2))
    return sum(1 if (a.index(x) - a.index(y)) * (b.index(x) - b.index(y)) > 0 else -1 for x, y in pairs) / len(pairs)


@pytest.mark.slow
def test_subset_transfer_fractions(records, tmp_path):
    """--fractions: one search per nested subset of the cached train rows, rankings compared with the largest
    fraction's (checked here from leaderboard.csv by pair counting), the learning curve, bad fractions."""
    run, cache = tmp_path / "transfer", tmp_path / "features"
    r = search_cli(records, run, "--fractions", "0.3,0.6,1.0", "--set", "search.top_k=2", budget=2, cache=cache)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("extracting EfficientNetB0 features") == 1  # subsets are rows of one cache
    with open(run / "leaderboard.csv") as fh:
        board = list(csv.DictReader(fh))
    assert [b["fraction"] for b in board] == sorted((b["fraction"] for b in board), reverse=True)
    by_fraction = {f: [b["head"] for b in board if b["fraction"] == f] for f in ("0.3", "0.6", "1.0")}
    summary = json.loads((run / "search_summary.json").read_text())
    fractions = summary["fractions"]
    assert [f["fraction"] for f in fractions] == [0.3, 0.6, 1.0]
    images = [f["train_images"] for f in fractions]
    patients = [f["train_patients"] for f in fractions]
    assert images[0] < images[1] < images[2] == read_manifest(records).records("train")
    assert patients[0] < patients[1] < patients[2] == read_manifest(records).splits["train"].patients
    reference = by_fraction["1.0"]
    for f in fractions:
        mine = by_fraction[f"{f['fraction']:.1f}"]
        assert f["ranking"] == mine  # the leaderboard's order within the fraction
        common = [h for h in reference if h in mine]
        ordered = [h for h in mine if h in common]
        assert f["common_heads"] == len(common) >= 2
        assert f["kendall_tau"] == pytest.approx(_kendall_by_pairs(ordered, common))
        assert f["top_k_used"] == 2
        assert f["top_k_overlap"] == pytest.approx(len(set(ordered[:2]) & set(common[:2])) / 2)
        best = [b for b in board if b["fraction"] == f"{f['fraction']:.1f}" and b["rank"] == "1"][0]
        assert f["best_head"] == best["head"] and f["best_val_auroc"] == pytest.approx(float(best["val_auroc_last"]), abs=6e-6)  # the board rounds
    # The learning curve: the largest fraction's best head at every fraction; best.yaml points evaluate at it.
    curve = read_learning_curve(str(run / "learning_curve.json"))
    assert curve.head == summary["best"]["head"] and [p.fraction for p in curve.points] == [0.3, 0.6, 1.0]
    assert [p.train_images for p in curve.points] == images
    assert curve.points[-1].val_auroc == pytest.approx(summary["best"]["val_auroc"])
    assert load_config(str(run / "best.yaml")).evaluate.learning_curve == str(run / "learning_curve.json")
    page = (run / "search.html").read_text()
    assert "Subset transfer" in page and "Kendall" in page and html.escape(curve.verdict()) in page
    assert f"learning curve {curve.verdict()}" in r.stderr
    # The cache's rows carry the records' salted patient hashes, in the records' order.
    from medtl.search.cache import load_split, read_index

    folder = summary["feature_cache"]
    assert list(load_split(folder, read_index(folder), "train").patients) == _train_patients(records)
    # A fraction too small to keep a positive of every label: one line, before any trial (the cache is reused).
    r = search_cli(records, tmp_path / "small", "--fractions", "0.005,1.0", budget=2, cache=cache)
    assert_user_error(r, "fraction 0.005 of --fractions/search.fractions leaves label", "without positives",
                      exit_code=2)
    assert "trial 0" not in r.stderr and "reusing the feature cache" in r.stderr


def _train_patients(records) -> list[str]:
    from medtl.data.pipeline import build_dataset

    cfg = load_config(SMOKE, [f"data.records={records}"])
    return [p.decode() for batch in build_dataset(cfg, "train", training=False, with_ids=True)
            for p in batch[3].numpy()]


def test_search_help():
    r = run_cli("search", "--help")
    assert r.returncode == 0 and "--budget" in r.stdout and "--storage" in r.stdout and "--fractions" in r.stdout
    r = run_cli("bench", "search", "--help")
    assert r.returncode == 0 and "--trial-epochs" in r.stdout
