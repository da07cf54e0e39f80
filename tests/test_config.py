"""Config loading: typed fields, unknown keys, wrong types, --set overrides, shipped job files."""
import glob
import os

import pytest

from medtl.config import Config, Trainable, dump_config, load_config
from medtl.errors import ConfigError

from conftest import JOBS

MINIMAL = {"phases": [{"name": "head", "epochs": 1, "learning_rate": 1e-3}]}


def test_every_shipped_job_loads_and_round_trips(tmp_path):
    paths = sorted(glob.glob(os.path.join(JOBS, "*.yaml")) + glob.glob(os.path.join(JOBS, "heads", "*.yaml")))
    assert {"smoke.yaml", "chestxray14_b4.yaml", "demo.yaml", "best_b4.yaml"} <= {os.path.basename(p) for p in paths}
    for path in paths:
        cfg = load_config(path)
        assert isinstance(cfg, Config)
        out = tmp_path / (os.path.basename(path))
        out.write_text(dump_config(cfg))
        assert load_config(str(out)) == cfg


def test_production_default_is_b4_380_imagenet_mixed():
    cfg = load_config(os.path.join(JOBS, "chestxray14_b4.yaml"))
    assert (cfg.model.backbone, cfg.data.image_size, cfg.model.weights, cfg.train.precision) == (
        "EfficientNetB4", 380, "imagenet", "mixed_float16")
    assert [p.trainable.kind for p in cfg.phases][:2] == ["none", "top_blocks"]


def test_smoke_is_tiny():
    cfg = load_config(os.path.join(JOBS, "smoke.yaml"))
    assert cfg.model.backbone == "EfficientNetB0" and cfg.data.image_size == 64
    assert all(p.epochs == 1 for p in cfg.phases)


def test_unknown_key_names_key_and_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(raw={**MINIMAL, "model": {"haed": {}}})
    message = str(err.value)
    assert "'model.haed'" in message and "backbone, batchnorm_momentum, head, weights" in message


def test_batchnorm_momentum_of_1_is_refused():
    with pytest.raises(ConfigError, match=r"^'model.batchnorm_momentum' must be below 1 \(negative keeps each "
                                          r"layer's own\), got 1.0$"):
        load_config(raw={**MINIMAL, "model": {"batchnorm_momentum": 1.0}})
    with pytest.raises(ConfigError, match=r"^'model.batchnorm_momentum' must be below 1 .*, got nan$"):
        load_config(raw={**MINIMAL, "model": {"batchnorm_momentum": float("nan")}})


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match="unknown key 'epochs'.*valid keys at the top"):
        load_config(raw={**MINIMAL, "epochs": 3})


def test_wrong_type_names_key_expected_type_and_value():
    with pytest.raises(ConfigError) as err:
        load_config(raw={**MINIMAL, "train": {"batch_size": "big"}})
    assert str(err.value) == "'train.batch_size' must be int, got 'big' (str)"


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match="'data.image_size' must be int, got True"):
        load_config(raw={**MINIMAL, "data": {"image_size": True}})


def test_literal_choices_are_listed():
    with pytest.raises(ConfigError, match="'model.head.pooling' must be one of 'avg', 'max', 'gem', got 'mean'"):
        load_config(raw={**MINIMAL, "model": {"head": {"pooling": "mean"}}})


def test_yaml_scientific_notation_without_dot_is_a_float():
    cfg = load_config(raw={"phases": [{"name": "a", "epochs": 1, "learning_rate": "1e-4"}]})
    assert cfg.phases[0].learning_rate == pytest.approx(1e-4)


def test_phase_fields_and_trainable_forms():
    cfg = load_config(raw={"phases": [
        {"name": "a", "epochs": 1, "learning_rate": 1e-3, "trainable": "none"},
        {"name": "b", "epochs": 2, "learning_rate": 1e-4, "trainable": {"top_blocks": 3}},
        {"name": "c", "epochs": 1, "learning_rate": 1e-5, "trainable": "all"},
        {"name": "d", "epochs": 1, "learning_rate": 1e-5, "trainable": {"top_fraction": 0.25}},
        {"name": "e", "epochs": 1, "learning_rate": 1e-5, "trainable": {"regex": "^block7"}}]})
    assert [p.trainable for p in cfg.phases] == [
        Trainable("none"), Trainable("top_blocks", blocks=3), Trainable("all"),
        Trainable("top_fraction", fraction=0.25), Trainable("regex", pattern="^block7")]
    with pytest.raises(ConfigError, match="'phases.0.trainable' must be none, all, .top_blocks"):
        load_config(raw={"phases": [{"name": "a", "epochs": 1, "learning_rate": 1e-3, "trainable": "some"}]})
    for bad, message in (({"top_blocks": 0}, "top_blocks' must be an int >= 1"),
                         ({"top_fraction": 1.5}, "top_fraction' must be a number in"),
                         ({"regex": "block[7"}, "regex' is not a valid regular expression")):
        with pytest.raises(ConfigError, match=message):
            load_config(raw={"phases": [{"name": "a", "epochs": 1, "learning_rate": 1e-3, "trainable": bad}]})


def test_missing_required_phase_field():
    with pytest.raises(ConfigError, match="missing required key 'phases.0.learning_rate'"):
        load_config(raw={"phases": [{"name": "a", "epochs": 1}]})


def test_values_are_checked():
    with pytest.raises(ConfigError, match="'phases.0.learning_rate' must be > 0"):
        load_config(raw={"phases": [{"name": "a", "epochs": 1, "learning_rate": 0}]})
    with pytest.raises(ConfigError, match="'model.head.dropout' must be in"):
        load_config(raw={**MINIMAL, "model": {"head": {"dropout": 1.5}}})
    with pytest.raises(ConfigError, match="'phases' must list at least one phase"):
        load_config(raw={})
    with pytest.raises(ConfigError, match="'data.channels' must be 1 or 3"):
        load_config(raw={**MINIMAL, "data": {"channels": 2}})


def test_set_overrides_nested_values_and_list_items():
    cfg = load_config(os.path.join(JOBS, "smoke.yaml"), [
        "train.batch_size=8", "model.head.dense=[64, 32]", "phases.1.learning_rate=3e-5",
        "phases.1.trainable={top_blocks: 1}", "data.records=/tmp/x", "model.head.pooling=gem"])
    assert cfg.train.batch_size == 8
    assert cfg.model.head.dense == (64, 32)
    assert cfg.phases[1].learning_rate == pytest.approx(3e-5)
    assert cfg.phases[1].trainable == Trainable("top_blocks", blocks=1)
    assert cfg.data.records == "/tmp/x"
    assert cfg.model.head.pooling == "gem"


def test_later_set_wins():
    cfg = load_config(os.path.join(JOBS, "smoke.yaml"), ["seed=1", "seed=2"])
    assert cfg.seed == 2


@pytest.mark.parametrize("assignment, message", [
    ("train.batchsize=8", "unknown key 'train.batchsize'; valid keys under 'train' are: batch_size,"),
    ("phases.7.epochs=1", "'phases.7' does not exist; 'phases' has 2 entries"),
    ("phases.x.epochs=1", "'phases.x' must be a list index"),
    ("seed", "expected KEY=VALUE"),
    ("seed.x=1", "'seed' is not a mapping"),
    ("train.batch_size=abc", "'train.batch_size' must be int, got 'abc' (str)"),
])
def test_bad_set(assignment, message):
    with pytest.raises(ConfigError) as err:
        load_config(os.path.join(JOBS, "smoke.yaml"), [assignment])
    assert message in str(err.value)


def test_config_is_frozen():
    cfg = load_config(os.path.join(JOBS, "smoke.yaml"))
    with pytest.raises(Exception):
        cfg.seed = 3  # type: ignore[misc]


def test_dump_is_yaml_of_the_same_tree():
    cfg = load_config(os.path.join(JOBS, "smoke.yaml"))
    text = dump_config(cfg)
    assert "top_blocks: 2" in text and "batch_size: 16" in text


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("phases: [\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "absent.yaml"))


def test_docs_config_reference_is_current():
    from medtl.config import reference_markdown

    from conftest import REPO

    page = open(os.path.join(REPO, "docs", "config.md")).read()
    start = page.index("-->", page.index("<!-- config-reference:start")) + 3
    end = page.index("<!-- config-reference:end -->")
    assert page[start:end].strip() == reference_markdown(), "paste the output of `python -m medtl.config` between the markers"
