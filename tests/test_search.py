"""`medtl search`: the space file, bad input at start, the feature cache reused, resume after a kill,
and the emitted best.yaml trained by `medtl train`."""
from __future__ import annotations

import csv
import html
import json
import os
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


def test_a_failed_start_is_queued_once_and_a_restart_never(tmp_path):
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState, create_trial

    from medtl.search.run import queue_restarts
    from medtl.search.space import Head
    from medtl.search.trial import head_seed

    study = optuna.create_study(direction="maximize")
    dist = {"learning_rate": CategoricalDistribution([0.01, 0.02])}

    def add(score, **attrs):
        study.add_trial(create_trial(state=TrialState.PRUNED, params={"learning_rate": 0.01}, distributions=dist,
                                     intermediate_values={1: score}, user_attrs={"head": "h", **attrs}))

    for i in range(8):
        add(0.80 + 0.01 * i)
    add(0.50)  # trial 8: a failed start
    assert queue_restarts(study, 1, 4.0) == 1 and queue_restarts(study, 1, 4.0) == 0  # queued once
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [t.user_attrs["restart_of"] for t in waiting] == [8]
    add(0.40, restart_of=4)  # a restart that failed too is not restarted again
    add(0.45, stopped="budget")  # nor a trial the budget stopped
    assert queue_restarts(study, 1, 4.0) == 0
    head = Head(load_config(SMOKE).model.head, 0.01, "bce")
    assert head_seed(0, head, 1) != head_seed(0, head) == head_seed(0, head, 0)  # a restart starts elsewhere


def test_a_study_resumes_only_with_its_restart_setting_and_old_studies_without_restarts():
    import types

    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState, create_trial

    from medtl.errors import MedtlError
    from medtl.search.run import _check_same_search, _restarted_already

    cfg = load_config(SMOKE, ["phases.0.epochs=2"])
    space = load_space(TINY, defaults())
    plan, whole = plan_search(cfg, space, 2), types.SimpleNamespace(fraction=1.0, digest="")
    new = optuna.create_study()
    assert _check_same_search(new, cfg, space, plan, whole) == 4.0  # a new study records its setting
    with pytest.raises(MedtlError, match="search.restart_below"):
        _check_same_search(new, load_config(SMOKE, ["phases.0.epochs=2", "search.restart_below=0"]), space, plan, whole)
    old_fingerprint = json.loads(new.user_attrs["search"])
    del old_fingerprint["restart_below"]  # what studies recorded before restarts
    old = optuna.create_study()
    old.set_user_attr("search", json.dumps(old_fingerprint, sort_keys=True))
    assert _check_same_search(old, cfg, space, plan, whole) == 0.0  # resumes as it began: no restarts

    dist = {"learning_rate": CategoricalDistribution([0.01])}
    for attrs in ({"restart_of": 8, "stopped": "duplicate restart"}, {"restart_of": 8}):
        old.add_trial(create_trial(state=TrialState.PRUNED, params={"learning_rate": 0.01}, distributions=dist,
                                   user_attrs=attrs))
        began = _restarted_already(old, types.SimpleNamespace(number=99, user_attrs={"restart_of": 8}))
        assert began == ("stopped" not in attrs)  # a skipped duplicate does not count as the restart
    assert _check_same_search(old, cfg, space, plan, whole) == 4.0  # a study that restarted already goes on


def test_failed_starts_are_far_below_the_first_rungs_median():
    # Nine first-rung scores: median 0.83; absolute deviations 0.13, 0.03, 0.02, 0.01, 0, 0.01, 0.02, 0.03,
    # 0.04 have median 0.02, so one robust standard deviation is 1.4826 x 0.02 = 0.029652. Trial 8's 0.70
    # is 0.13 / 0.029652 = 4.38 of them under the median; the next lowest, 0.80, is 1.01.
    scores = {i: 0.80 + 0.01 * i for i in range(8)} | {8: 0.70}
    assert failed_starts(scores, 4.0) == [8]
    assert failed_starts(scores, 4.5) == []
    assert failed_starts(scores, 0.0) == []  # search.restart_below: 0 turns restarts off
    assert failed_starts({i: scores[i] for i in (1, 2, 3, 4, 5, 6, 8)}, 1.0) == []  # 7 scores: too few to tell
    assert failed_starts({i: 0.8 for i in range(9)} | {9: 0.5}, 4.0) == []  # no spread to measure against
    assert failed_starts(scores | {9: float("nan")}, 4.0) == [8]  # an undefined AUROC is left out
    with pytest.raises(ConfigError, match="restart_below"):
        load_config(SMOKE, ["search.restart_below=-1"])


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
    # 1. Killed in the middle of trial 1 (after its first epoch), as a node loss would.
    r = search_cli(records, run1, budget=4, env=cli_env(MEDTL_FAULTS="kill_trial:step=1,epoch=1"))
    assert r.returncode == -9, r.stderr
    assert "extracting EfficientNetB0 features" in r.stderr and "trial 0:" in r.stderr
    before = finished_heads(run1)
    assert [(n, s) for n, s, _ in before] == [(0, "COMPLETE"), (1, "RUNNING")]

    # 2. The same command resumes: trial 0 is kept, trial 1's head runs again, no head twice.
    r = search_cli(records, run1, budget=4)
    assert r.returncode == 0, r.stderr
    assert "resuming study 'medtl-head-search': 1 finished trial(s) kept, 1 interrupted trial(s) queued again" \
        in r.stderr
    assert "reusing the feature cache" in r.stderr and "extracting" not in r.stderr
    assert "trial 0:" not in r.stderr and "trial 2:" in r.stderr  # trial 2 is trial 1's head again
    after = finished_heads(run1)
    assert after[0] == before[0]
    done = [h for _, s, h in after if s in ("COMPLETE", "PRUNED")]
    assert len(done) == len(set(done)) == 4, r.stderr  # all 4 heads, each finished once
    assert [s for n, s, _ in after if n == 1] == ["FAIL"] and [h for n, _, h in after if n == 2] == [before[1][2]]

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
def test_a_failed_start_is_restarted_once_with_a_new_initialisation(records, tmp_path):
    """Trial 10's first attempt is made to fail (MEDTL_FAULTS failed_start: it trains away from the labels).
    Its first-rung score lies far under the other 10; the search queues it once more with a new
    initialisation, which learns like the others, and reports the restart. The restart runs while one head
    of the grid is left, where Optuna's grid sampler looks up a grid point that a restart does not have."""
    space, run = tmp_path / "lr.yaml", tmp_path / "search"
    space.write_text(LR_SPACE)
    r = search_cli(records, run, "--set", "train.batch_size=4", space=space, budget=9,
                   env=cli_env(MEDTL_FAULTS="failed_start:step=10"))
    assert r.returncode == 0, r.stderr[-3000:]
    with open(run / "leaderboard.csv") as fh:
        board = {int(row["trial"]): row for row in csv.DictReader(fh)}
    failed, restarts = board[10], [row for row in board.values() if row["restart_of"]]
    assert [(row["trial"], row["restart_of"]) for row in restarts] == [("11", "10")], r.stderr[-3000:]
    again = restarts[0]
    assert again["head"] == failed["head"] and failed["state"] == "pruned"
    others = sorted(float(row["val_auroc_1ep"]) for n, row in board.items() if n not in (10, 11))
    assert float(failed["val_auroc_1ep"]) < 0.5 < others[0]  # trained away from the labels, the others towards
    assert float(again["val_auroc_1ep"]) >= others[0]  # the new start learns like the others
    assert (f"trial 10: {failed['head']}: first-rung val macro AUROC {float(failed['val_auroc_1ep']):.4f} lies "
            "over 4 robust standard deviations under the median of 11 trials") in r.stderr
    summary = json.loads((run / "search_summary.json").read_text())
    assert summary["restarts"] == 1 and summary["spent_full_trainings"] <= 9 + 1e-9
    assert summary["explored"] == 12 and len(board) == 13  # the last head ran after the restart
    assert "1 failed start(s) restarted with a new initialisation" in (run / "search.html").read_text()


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
