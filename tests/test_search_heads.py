"""`medtl search` over layer-list heads (`heads:` in the space file): parsing and its errors, the pooled
cache for heads that start with a global pool, and a search through the CLI."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from medtl.config import HeadConfig, HeadLayer, load_config
from medtl.errors import ConfigError
from medtl.search.space import defaults_from, load_space, parse_space

from conftest import JOBS, assert_user_error
from test_search import SMOKE, search_cli

RECIPES = os.path.join(JOBS, "search", "recipes.yaml")
CONV_POOL = [{"conv": {"filters": 8, "activation": "linear"}}, {"max_pool": 2}, {"global_pool": "avg"},
             {"dense": {"units": 8, "activation": "linear"}}]
GAP_DROPOUT = [{"global_pool": "avg"}, {"dense": 16}, {"dropout": 0.5}]


def short_defaults():
    cfg = load_config(SMOKE)
    return defaults_from(cfg.model.head, cfg.phases[0].learning_rate, cfg.train.loss.name)


def test_heads_combine_with_learning_rate_and_loss():
    space = parse_space({"heads": {"conv_pool": CONV_POOL, "gap_dropout": GAP_DROPOUT},
                         "learning_rate": [1.0e-3, 3.0e-4], "loss": ["bce", "focal"]}, short_defaults())
    assert space.size == 8 and list(space.choices) == ["heads", "learning_rate", "loss"]
    head = space.head({"heads": "conv_pool", "learning_rate": 3.0e-4, "loss": "focal"})
    assert head.head.layers[1] == HeadLayer("max_pool", size=2, stride=2)
    assert (head.learning_rate, head.loss) == (3.0e-4, "focal")
    assert head.key() == ("layers=conv(8,k1,linear) > max_pool(2) > global_pool(avg) > dense(8,linear),"
                          "lr=0.0003,loss=focal")
    assert space.uses_conv and HeadConfig(layers=space.head_lists["gap_dropout"]).pooled_start() == "avg"


def test_a_layer_list_job_searches_its_own_head_by_default():
    base = load_config(SMOKE, ["model.head={layers: [{global_pool: max}, {dense: 4}]}"]).model.head
    space = parse_space({"learning_rate": [1.0e-3, 1.0e-2]}, defaults_from(base, 1e-3, "bce"))
    assert space.size == 2 and space.head({"learning_rate": 1.0e-2}).head == base
    with pytest.raises(ConfigError, match="model.head is a layer list; list layer lists under heads"):
        parse_space({"dense": [[], [64]]}, defaults_from(base, 1e-3, "bce"))


def test_changing_a_named_heads_layers_changes_the_study_fingerprint():
    a = parse_space({"heads": {"h": GAP_DROPOUT, "g": CONV_POOL}}, short_defaults())
    b = parse_space({"heads": {"h": GAP_DROPOUT[:2], "g": CONV_POOL}}, short_defaults())
    assert a.choices == b.choices and a.fingerprint() != b.fingerprint()
    assert "head_layers" not in short_defaults().fingerprint()  # short-form studies resume as before


@pytest.mark.parametrize("raw, fragments", [
    ({"heads": {"a": GAP_DROPOUT}, "dense": [[], [8]]}, ["has both heads and dense"]),
    ({"heads": [GAP_DROPOUT]}, ["'heads'", "mapping of head name -> layer list"]),
    ({"heads": {"a b": GAP_DROPOUT}}, ["'heads.a b'", "a head name is letters"]),
    ({"heads": {"a": []}}, ["'heads.a'", "non-empty list of layers"]),
    ({"heads": {"a": [{"global_pool": "avg"}, {"dense": 8, "units": 3}]}}, ["'heads.a.1' must be a layer"]),
    ({"heads": {"a": [{"global_pool": "avg"}, {"dens": 8}]}}, ["'heads.a.1'", "unknown layer type 'dens'"]),
    ({"heads": {"a": [{"global_pool": "avg"}, {"dense": {"units": 8, "activation": "tanh"}}]}},
     ["'heads.a.1.dense.activation'", "unknown activation 'tanh'"]),
    ({"heads": {"a": [{"dense": 8}, {"global_pool": "avg"}]}}, ["'heads.a.0'", "gets the 4-D feature map"]),
    ({"heads": {"a": GAP_DROPOUT, "b": list(GAP_DROPOUT)}}, ["'heads.b'", "same layer list as 'heads.a'"]),
])
def test_bad_heads_name_the_head_and_layer(raw, fragments):
    with pytest.raises(ConfigError) as err:
        parse_space(raw, short_defaults())
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)


def test_heads_too_large_for_the_map_stop_at_start(records, tmp_path):
    r = search_cli(records, tmp_path / "run", space=RECIPES)  # a 3x3 conv on EfficientNetB0's 2x2 map at 64 px
    assert_user_error(r, "recipes.yaml", "'heads.conv3x3_gap_1024.0'", "3x3 kernel is larger than the 2x2 feature map",
                      exit_code=2)
    assert not os.path.exists(tmp_path / "features")


def test_a_pooled_cache_takes_only_heads_that_start_with_a_global_avg_or_max_pool():
    from medtl.search.run import check_space_fits_cache

    cfg = load_config(SMOKE, ["search.pooled_cache=true"])
    pooled = parse_space({"heads": {"gap_dropout": GAP_DROPOUT, "gmp": [{"global_pool": "max"}]}}, short_defaults())
    check_space_fits_cache(cfg, pooled)
    maps = parse_space({"heads": {"conv_pool": CONV_POOL, "gem": [{"global_pool": "gem"}], "gap": GAP_DROPOUT}},
                       short_defaults())
    with pytest.raises(ConfigError, match="head\\(s\\) conv_pool, gem do not start with global_pool avg or max"):
        check_space_fits_cache(cfg, maps)
    check_space_fits_cache(load_config(SMOKE), maps)  # the default spatial cache takes every head


def test_a_pooled_cache_trial_feeds_the_heads_own_global_pool(records):
    """On a pooled cache a head starting with global_pool max trains on the max-pooled vectors, avg on the
    averaged ones: here only the max vectors carry the labels."""
    from medtl.data.manifest import read_manifest
    from medtl.search.cache import SplitFeatures
    from medtl.search.trial import train_on_cache

    manifest = read_manifest(records)
    cfg = load_config(SMOKE, ["phases.0.epochs=4"])
    rng = np.random.default_rng(0)

    def split(n):
        labels = (rng.random((n, manifest.num_labels)) < 0.5).astype(np.float32)
        signal = np.concatenate([labels * 2 - 1, np.zeros((n, 8), np.float32)], axis=1)
        noise = rng.normal(size=signal.shape).astype(np.float32)
        return SplitFeatures({0: {"max": signal + 0.3 * noise, "avg": noise}}, labels, np.ones_like(labels),
                             np.array([f"p{i}" for i in range(n)]))

    train, val = split(256), split(128)
    space = parse_space({"heads": {"max": [{"global_pool": "max"}], "avg": [{"global_pool": "avg"}]},
                         "learning_rate": [0.05]}, short_defaults())
    shape = [manifest.num_labels + 8]
    on_max = train_on_cache(cfg, space.head({"heads": "max"}), manifest, train, val, shape, True, 4, lambda e, a: True)
    on_avg = train_on_cache(cfg, space.head({"heads": "avg"}), manifest, train, val, shape, True, 4, lambda e, a: True)
    assert on_max[-1] > 0.95 and on_avg[-1] < 0.7, (on_max, on_avg)


@pytest.fixture(scope="module")
def records96(studies, tmp_path_factory) -> str:
    """The shared studies at 96 px: EfficientNetB0 gives the 3x3 map every recipe fits (2x2 at 64 px)."""
    from medtl.data.ingest import IngestOptions, ingest

    out = str(tmp_path_factory.mktemp("records96"))
    ingest(IngestOptions(images=os.path.join(studies, "images"), labels=os.path.join(studies, "labels.csv"),
                         out=out, image_size=96, bit_depth=8, progress=False))
    return out


@pytest.mark.slow
def test_every_recipe_trains_through_the_cli(records96, tmp_path):
    """`medtl search` over jobs/search/recipes.yaml with one epoch per head and a budget of 32 full trainings:
    each of the 32 recipe heads (the practitioner's best and second best, the Dropout-after-Dense, Inception,
    Xception and Flatten recipes) is built with its exact layers on the base's spatial maps and trained."""
    run = tmp_path / "search"
    r = search_cli(records96, run, "--set", "data.image_size=96", "--set", "phases.0.epochs=1", space=RECIPES,
                   budget=32)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "32 heads in the space" in r.stderr and "spatial maps" in r.stderr
    with open(run / "leaderboard.csv") as fh:
        board = list(csv.DictReader(fh))
    recipes = load_space(RECIPES, short_defaults())
    assert sorted(row["heads"] for row in board) == sorted(recipes.head_lists)
    assert {row["head"] for row in board} == {recipes.head(p).key() for p in recipes.grid()}
    assert {row["state"] for row in board} == {"complete"} and {row["epochs"] for row in board} == {"1"}
    scores = [float(row["val_auroc_last"]) for row in board]
    assert all(0.0 <= v <= 1.0 for v in scores) and scores == sorted(scores, reverse=True)
    summary = json.loads((run / "search_summary.json").read_text())
    assert summary["best"]["head"] == board[0]["head"] and summary["spent_full_trainings"] == pytest.approx(32)
