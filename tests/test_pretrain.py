"""`medtl pretrain` through the CLI on tiny data: the base file and its sidecar, `medtl train` starting from
it, and the refusals (no method, a method not built, another backbone or channel count, a damaged file)."""
import json
import os
import shutil

import pytest

from conftest import REPO, assert_user_error, run_cli

TINY = os.path.join(REPO, "tests", "reliability", "tiny.yaml")
# One epoch that trains every layer: what a supervised pretrain of the base does.
PRETRAIN_SET = ("--set", "phases=[{name: all, epochs: 1, learning_rate: 0.001, trainable: all}]")
# One head-only epoch: the base must stay exactly as loaded.
HEAD_ONLY_SET = ("--set", "phases=[{name: head, epochs: 1, learning_rate: 0.001, trainable: none}]")


def _pretrain(records, run, *extra):
    return run_cli("pretrain", "--config", TINY, "--workdir", run, "--set", f"data.records={records}",
                   *PRETRAIN_SET, *extra)


def _train(records, run, weights, *extra):
    return run_cli("train", "--config", TINY, "--workdir", run, "--set", f"data.records={records}",
                   "--set", f"model.weights={weights}", *HEAD_ONLY_SET, *extra)


@pytest.fixture(scope="module")
def base_run(records, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("pretrain") / "run")
    result = _pretrain(records, run, "--set", "pretrain.method=supervised")
    assert result.returncode == 0, result.stderr[-3000:]
    return run, result


@pytest.mark.slow
def test_pretrain_writes_base_and_sidecar(base_run, records):
    from medtl.data.manifest import read_manifest

    run, result = base_run
    base = os.path.join(run, "base.weights.h5")
    assert result.stdout.strip().splitlines()[-1] == base
    assert os.path.getsize(base) > 0
    meta = json.load(open(base + ".json"))
    assert meta["backbone"] == "MobileNetV3Small" and meta["channels"] == 3 and meta["image_size"] == 64
    assert meta["method"] == "supervised" and meta["epochs"] == 1
    assert meta["records_digest"] == read_manifest(records).digest()
    assert set(meta) == {"backbone", "image_size", "channels", "method", "epochs", "records_digest",
                         "medtl_version"}


@pytest.mark.slow
def test_train_from_base_starts_from_its_weights(base_run, records, tmp_path):
    import numpy as np

    from medtl.models.backbones import build_backbone
    from medtl.train.rundir import load_run

    base = os.path.join(base_run[0], "base.weights.h5")
    run = str(tmp_path / "target")
    result = _train(records, run, base)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = build_backbone("MobileNetV3Small", base, 64, 3).get_weights()
    random = build_backbone("MobileNetV3Small", "none", 64, 3).get_weights()
    trained = load_run(run)[2].get_layer("backbone").get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(expected, trained))  # head-only: the base is the file's
    assert not all(np.array_equal(a, b) for a, b in zip(random, trained))


@pytest.mark.slow
def test_mismatched_or_damaged_base_is_refused(base_run, records, tmp_path):
    base = os.path.join(base_run[0], "base.weights.h5")
    assert_user_error(_train(records, str(tmp_path / "a"), base, "--set", "model.backbone=EfficientNetB0"),
                      base, "MobileNetV3Small with 3 channel(s)", "EfficientNetB0 with 3 channel(s)", exit_code=2)
    assert_user_error(_train(records, str(tmp_path / "b"), base, "--set", "data.channels=1"),
                      "MobileNetV3Small with 3 channel(s)", "MobileNetV3Small with 1 channel(s)", exit_code=2)

    truncated = str(tmp_path / "truncated.weights.h5")
    with open(base, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read()[: os.path.getsize(base) // 2])
    shutil.copy(base + ".json", truncated + ".json")
    assert_user_error(_train(records, str(tmp_path / "c"), truncated), truncated, "truncated or corrupt",
                      "re-run", exit_code=2)


def test_pretrain_needs_a_built_method(records, tmp_path):
    run = str(tmp_path / "run")
    assert_user_error(_pretrain(records, run), "pretrain.method is missing", "supervised", exit_code=2)
    assert_user_error(_pretrain(records, run, "--set", "pretrain.method=moco"), "pretrain.method",
                      "not built yet", exit_code=2)
    assert_user_error(_pretrain(records, run, "--set", "pretrain.method=magic"), "pretrain.method",
                      "supervised", exit_code=2)
    assert not os.path.exists(os.path.join(run, "base.weights.h5"))


def test_plain_weights_file_without_sidecar_has_no_meta(tmp_path):
    from medtl.models import basefile

    plain = tmp_path / "imagenet_notop.h5"
    plain.write_bytes(b"")
    assert basefile.read_meta(str(plain)) is None
    basefile.check_fits(str(plain), "EfficientNetB0", 3)  # a user's own .h5: loaded unchecked, as before



# Transfer, measured: records whose findings a small base learns in a few epochs at 32 px (the heart's size
# and the basal fluid level), for an archive and a target set with no patient in common.
TRANSFER_FINDINGS = "Cardiomegaly,Effusion"
# EfficientNetB0, not tiny.yaml's MobileNetV3Small: the latter's BatchNorm moving averages (momentum 0.999)
# are still near their initial values after a few dozen steps, so its inference-mode outputs are constant.
TRANSFER_JOB = ("--set", "model.backbone=EfficientNetB0", "--set", "data.image_size=32", "--set", "train.batch_size=16",
                "--set", "data.augment=[]", "--set", "model.head.dense=[]", "--set", "evaluate.bootstrap=0",
                "--set", "data.deterministic=true")


@pytest.fixture(scope="module")
def transfer_records(tmp_path_factory):
    from medtl.data.ingest import IngestOptions, ingest
    from medtl.data.synth import synthesize

    root = tmp_path_factory.mktemp("transfer")
    out = {}
    for name, seed, first, n in (("archive", 21, 1_000_000, 600), ("target", 22, 1, 400)):
        synthesize(str(root / name), n, seed=seed, size=64, first_patient=first)
        out[name] = str(root / f"{name}-records")
        ingest(IngestOptions(images=str(root / name / "images"), labels=str(root / name / "labels.csv"),
                             out=out[name], image_size=32, val_fraction=0.3, test_fraction=0.0, shard_mb=0.5,
                             label_names=tuple(TRANSFER_FINDINGS.split(",")), progress=False))
    return out


def _head_only_val_auroc(run: str) -> float:
    rows = [json.loads(line) for line in open(os.path.join(run, "history.jsonl"))]
    assert rows and {row["phase"] for row in rows} == {"head"}
    return max(row["val_auroc"] for row in rows)


@pytest.mark.slow
def test_head_on_a_pretrained_base_beats_a_random_base(transfer_records, tmp_path):
    """`medtl pretrain` on the archive, then the same head-only phase on the target from its base file and from
    a random base of the same architecture: the pretrained base's features must serve the head clearly better."""
    base_run = str(tmp_path / "base")
    r = run_cli("pretrain", "--config", TINY, "--workdir", base_run, "--set", f"data.records={transfer_records['archive']}",
                "--set", "pretrain.method=supervised", *TRANSFER_JOB,
                "--set", "phases=[{name: all, epochs: 3, learning_rate: 0.002, trainable: all, train_batch_norm: true}]")
    assert r.returncode == 0, r.stderr[-3000:]
    base = os.path.join(base_run, "base.weights.h5")
    head = ("--set", "phases=[{name: head, epochs: 3, learning_rate: 0.003, trainable: none}]")
    scores = {}
    for name, weights in (("pretrained", base), ("random", "none")):
        run = str(tmp_path / name)
        r = run_cli("train", "--config", TINY, "--workdir", run, "--set", f"data.records={transfer_records['target']}",
                    "--set", f"model.weights={weights}", *TRANSFER_JOB, *head)
        assert r.returncode == 0, r.stderr[-3000:]
        scores[name] = _head_only_val_auroc(run)
    # The short from-scratch pretraining follows the float order of its ops: without data.deterministic it gave
    # 0.81 here, 0.63 on another machine, and 0.55 (a failure) in a suite run on 3 workers. Deterministic ops,
    # measured: 0.86 against 0.52 after 6 epochs of pretraining, the same to 4 digits with two busy loops beside
    # it; after the 3 epochs here (to save suite time), 0.78 against 0.52. The random base stays near chance.
    assert scores["pretrained"] >= 0.6 and scores["pretrained"] >= scores["random"] + 0.05, scores


SMALL_SPACE = """\
heads:
  gap: [{global_pool: avg}]
  gmp: [{global_pool: max}]
  gap_dense: [{global_pool: avg}, {dense: {units: 16, activation: relu}}, {dropout: 0.2}]
  conv_pool: [{conv: {filters: 16, kernel: 1, activation: linear}}, {max_pool: {size: 2, stride: 2}},
              {global_pool: avg}, {dense: {units: 8, activation: linear}}]
"""


def _check_replay(row: dict, scores: dict) -> None:
    """Each replayed schedule's share of draws within 0.01 of the best, against every draw enumerated here."""
    import itertools

    curves = {k: v["history"] for k, v in row["scores"].items()}
    assert all(len(c) == 2 and c[-1] == scores[k] for k, c in curves.items())  # phases.0.epochs=2
    best = max(scores.values())
    schedules = [(x["min_epochs"], x["reduction_factor"]) for x in row["replay"]]
    assert schedules == [(1, 2), (1, 3), (2, 2), (2, 3)]  # min_epochs 3 > the 2 epochs of a full training
    for x in row["replay"]:
        # a budget of 2 full trainings = 4 epochs: min_epochs 1, 3 heads at 1 epoch, then the best one for the
        # second; min_epochs 2: 2 heads for both epochs, no halving.
        assert (x["trials"], x["rungs"]) == {(1, 2): (3, [1, 2]), (1, 3): (3, [1, 2]), (2, 2): (2, [2]),
                                             (2, 3): (2, [2])}[(x["min_epochs"], x["reduction_factor"])]
        hits = []
        for drawn in itertools.combinations(sorted(curves), x["trials"]):
            alive = list(drawn)
            for rung in x["rungs"][:-1]:
                alive = sorted(alive, key=lambda k: -curves[k][rung - 1])[:max(1, len(alive) // x["reduction_factor"])]
            hits.append(best - max(scores[k] for k in alive) <= 0.01)
        assert x["within_goal"] == pytest.approx(sum(hits) / len(hits), abs=0.06), (x, hits)


@pytest.mark.slow
def test_bench_search_on_a_pretrained_base_per_seed_with_subset_transfer(base_run, records, tmp_path):
    """`medtl bench search` on a base file: per seed, the N/4 search's head against the exhaustive pass, and the
    subset's ranking against the full split's (Kendall's tau re-counted here by pairs from every head's score)."""
    from test_search import _kendall_by_pairs

    space = tmp_path / "space.yaml"
    space.write_text(SMALL_SPACE)
    base = os.path.join(base_run[0], "base.weights.h5")
    work = tmp_path / "work"
    r = run_cli("bench", "search", "--config", TINY, "--space", space, "--records", records, "--base", base,
                "--seeds", "0,1", "--fraction", "0.5", "--budget", "2", "--trial-epochs", "1",
                "--set", "phases.0.epochs=2", "--keep", work)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.load(open(work / "bench_search.json"))
    assert results["base"] == base and [row["seed"] for row in results["seeds"]] == [0, 1]
    assert f"base {base}" in r.stdout and "goal: the N/4 search's head within 0.01 of the exhaustive best" in r.stdout
    for row in results["seeds"]:
        scores = {k: v["auroc"] for k, v in row["scores"].items()}
        assert len(scores) == 4
        best = max(scores.values())
        assert row["best_auroc"] == best and row["gap"] == pytest.approx(best - scores[row["chosen"]])
        assert row["rank"] == 1 + sum(v > scores[row["chosen"]] for v in scores.values())
        part = {k: v["auroc"] for k, v in row["subset_scores"].items()}
        full_order, part_order = (sorted(d, key=lambda k: (-d[k], k)) for d in (scores, part))
        if len(set(scores.values())) == 4 and len(set(part.values())) == 4:  # no ties: tau by pair counting
            assert row["kendall_tau"] == pytest.approx(_kendall_by_pairs(part_order, full_order))
        assert row["subset_best"] == part_order[0] and row["subset_gap"] == pytest.approx(best - scores[part_order[0]])
        assert f"| {row['seed']} | " in r.stdout
        _check_replay(row, scores)
    assert "successive-halving schedules replayed on each seed's exhaustive curves" in r.stdout
    from medtl.data.manifest import read_manifest

    train = read_manifest(records).splits["train"]
    assert 0.5 * train.records <= results["subset"]["images"] < train.records
    assert results["subset"]["patients"] < train.patients
    # Random weights are refused: the benchmark's rankings must come from a pretrained base.
    r = run_cli("bench", "search", "--config", TINY, "--space", space, "--records", records)
    assert_user_error(r, "bench search compares heads on a pretrained base", "--base FILE")
    assert_user_error(run_cli("bench", "search", "--config", TINY, "--space", space, "--seeds", "0,0"), "--seeds")
    assert_user_error(run_cli("bench", "search", "--config", TINY, "--space", space, "--fraction", "0"), "--fraction")
