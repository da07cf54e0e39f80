"""Heads as layer lists (model.head.layers) and the Inception/Xception backbones: the issue-19 recipes built
layer by layer, bad layer lists refused at config load through the CLI, the base's feature-map size against
Keras, Inception/Xception blocks for phased unfreezing, and a layer-list head trained by `medtl train`."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import yaml

from medtl.config import HeadConfig, HeadLayer, load_config
from medtl.errors import ConfigError
from medtl.search.space import Head, defaults_from, load_space

from conftest import JOBS, REPO, assert_user_error, run_cli

TINY = os.path.join(REPO, "tests", "reliability", "tiny.yaml")
RECIPES = os.path.join(JOBS, "search", "recipes.yaml")
B4_380 = (12, 12, 1792)  # EfficientNetB4's feature map at 380 px
LABELS = 4               # the issue's Dense(4)


def _dense(n_in, n_out):
    return n_in * n_out + n_out


def _conv(kernel, c_in, c_out):
    return kernel * kernel * c_in * c_out + c_out


# Each recipe of the issue: (Keras class, output shape without the batch, parameters, activation) per layer,
# the output Dense(4) last; shapes and counts worked out by hand on B4's 12x12x1792 map.
OUT_112, OUT_1024 = ("Dense", (LABELS,), _dense(112, LABELS), "linear"), ("Dense", (LABELS,), _dense(1024, LABELS), "linear")
RECIPE_LAYERS = {
    "best_b4": [("Conv2D", (12, 12, 448), _conv(1, 1792, 448), "linear"), ("MaxPooling2D", (6, 6, 448), 0, None),
                ("GlobalAveragePooling2D", (448,), 0, None), ("Dense", (112,), _dense(448, 112), "linear"), OUT_112],
    "second_b4": [("Conv2D", (12, 12, 448), _conv(1, 1792, 448), "linear"),
                  ("Conv2D", (6, 6, 224), _conv(2, 448, 224), "linear"),  # (12 - 2) // 2 + 1 = 6
                  ("GlobalAveragePooling2D", (224,), 0, None), ("Dense", (112,), _dense(224, 112), "linear"), OUT_112],
    **{f"dense{n}_dropout": [("GlobalAveragePooling2D", (1792,), 0, None), ("Dense", (n,), _dense(1792, n), "relu"),
                             ("Dropout", (n,), 0, None), ("Dense", (LABELS,), _dense(n, LABELS), "linear")]
       for n in (10, 64, 100, 512, 1000)},
    "conv3x3_gap_1024": [("Conv2D", (10, 10, 128), _conv(3, 1792, 128), "relu"),  # valid 3x3: 12 - 2
                         ("GlobalAveragePooling2D", (128,), 0, None), ("Dense", (1024,), _dense(128, 1024), "relu"),
                         OUT_1024],
    "gap_512": [("GlobalAveragePooling2D", (1792,), 0, None), ("Dense", (512,), _dense(1792, 512), "relu"),
                ("Dense", (LABELS,), _dense(512, LABELS), "linear")],
}
# Flatten on B4's map would need a 258048 x 2500 kernel (645M parameters): built on a 3x3x64 map instead.
FLATTEN_MAP = (3, 3, 64)
FLATTEN_LAYERS = [("Flatten", (576,), 0, None), ("Dense", (2500,), _dense(576, 2500), "relu"),
                  ("Dense", (500,), _dense(2500, 500), "relu"), ("Dense", (100,), _dense(500, 100), "relu"),
                  ("Dense", (LABELS,), _dense(100, LABELS), "linear")]


@pytest.fixture(scope="module")
def recipes():
    cfg = load_config(os.path.join(JOBS, "chestxray14_b4.yaml"))
    return load_space(RECIPES, defaults_from(cfg.model.head, 1e-3, "bce"))


def _built_layers(feature_shape, layers):
    from medtl.search.trial import build_trial_model

    model = build_trial_model(feature_shape, Head(HeadConfig(layers=layers), 1e-3, "bce"), LABELS, pooled=False)
    return model, [(type(l).__name__, tuple(l.output_shape[1:]), l.count_params(), l.get_config().get("activation"))
                   for l in model.layers[1:]]


@pytest.mark.parametrize("name", [*RECIPE_LAYERS, "flatten_2500_500_100"])
def test_each_recipe_builds_exactly_its_layers(recipes, name):
    shape, expected = (FLATTEN_MAP, FLATTEN_LAYERS) if name.startswith("flatten") else (B4_380, RECIPE_LAYERS[name])
    model, built = _built_layers(shape, recipes.head_lists[name])
    assert built == expected
    assert model.count_params() == sum(params for _, _, params, _ in expected)
    assert model.layers[-1].name == "logits" and model.layers[-1].dtype == "float32"


def test_recipes_space_has_32_heads_with_the_issues_recipes(recipes):
    assert recipes.size == len(recipes.head_lists) == 32 and set(recipes.searched) == {"heads"}
    described = {name: HeadConfig(layers=layers).describe() for name, layers in recipes.head_lists.items()}
    assert described["best_b4"] == "conv(448,k1,linear) > max_pool(2) > global_pool(avg) > dense(112,linear)"
    assert described["second_b4"] == \
        "conv(448,k1,linear) > conv(224,k2,s2,linear) > global_pool(avg) > dense(112,linear)"
    assert described["flatten_2500_500_100"] == "flatten > dense(2500,relu) > dense(500,relu) > dense(100,relu)"
    # The key names the layers, not the head's name: stable under renaming, readable in the leaderboard.
    assert recipes.head({"heads": "gap_512"}).key() == "layers=global_pool(avg) > dense(512,relu),lr=0.001,loss=bce"
    assert len({recipes.head(p).key() for p in recipes.grid()}) == 32


def test_the_shipped_head_jobs_are_the_recipes(recipes):
    best = load_config(os.path.join(JOBS, "heads", "best_b4.yaml"))
    assert (best.model.backbone, best.data.image_size) == ("EfficientNetB4", 380)
    assert best.model.head.layers == recipes.head_lists["best_b4"]
    second = load_config(os.path.join(JOBS, "heads", "second_b4.yaml"))
    assert second.model.head.layers == recipes.head_lists["second_b4"]
    inception = load_config(os.path.join(JOBS, "heads", "inceptionv3_conv.yaml"))
    assert (inception.model.backbone, inception.model.head.layers) == ("InceptionV3",
                                                                        recipes.head_lists["conv3x3_gap_1024"])
    for job, backbone in (("inceptionresnetv2_gap512", "InceptionResNetV2"), ("xception_gap512", "Xception")):
        cfg = load_config(os.path.join(JOBS, "heads", f"{job}.yaml"))
        assert (cfg.model.backbone, cfg.model.head.layers) == (backbone, recipes.head_lists["gap_512"])


def test_short_form_expands_to_the_documented_list():
    short = HeadConfig(pooling="gem", conv_filters=8, dense=(16, 4), activation="swish", dropout=0.3, batch_norm=True)
    assert [(layer.name, layer.describe()) for layer in short.layer_list()] == [
        ("head_conv", "conv(8,k1,swish)"), ("head_pool", "global_pool(gem)"), ("head_pool_bn", "batch_norm"),
        ("head_dropout_0", "dropout(0.3)"), ("head_dense_0", "dense(16,swish)"), ("head_bn_0", "batch_norm"),
        ("head_dropout_1", "dropout(0.3)"), ("head_dense_1", "dense(4,swish)"), ("head_bn_1", "batch_norm"),
        ("head_dropout_out", "dropout(0.3)")]
    assert [layer.describe() for layer in HeadConfig(dropout=0).layer_list()] == ["global_pool(avg)"]


def test_a_layer_list_round_trips_through_the_run_config(tmp_path):
    head = "{layers: [{conv: 8}, {avg_pool: {size: 2, stride: 1, padding: same}}, {global_pool: max}, batch_norm]}"
    cfg = load_config(TINY, [f"model.head={head}"])
    assert cfg.model.head.layers[0] == HeadLayer("conv", filters=8)  # a bare value sets the first field
    assert cfg.model.head.layers[1].stride == 1 and cfg.model.head.layers[1].padding == "same"
    from medtl.config import dump_config

    (tmp_path / "c.yaml").write_text(dump_config(cfg))
    assert load_config(str(tmp_path / "c.yaml")) == cfg
    saved = yaml.safe_load(dump_config(cfg))["model"]["head"]
    assert list(saved) == ["layers"] and saved["layers"][3] == "batch_norm"


def test_set_changes_a_layer_whole():
    best = os.path.join(JOBS, "heads", "best_b4.yaml")
    cfg = load_config(best, ["model.head.layers.0={conv: {filters: 16, activation: linear}}"])
    assert cfg.model.head.layers[0] == HeadLayer("conv", filters=16, activation="linear")
    with pytest.raises(ConfigError, match="'model.head.layers.0' is one value \\(head layer: .*set it whole"):
        load_config(best, ["model.head.layers.0.conv.filters=16"])


# ----------------------------------------------------------------------------- bad input, through the CLI


def _head(*layers: str) -> str:
    return "model.head={layers: [" + ", ".join(layers) + "]}"


@pytest.mark.parametrize("sets, fragments", [
    ([_head("{maxpool: 2}", "{global_pool: avg}")],
     ["'model.head.layers.0'", "unknown layer type 'maxpool'", "conv, max_pool, avg_pool, global_pool, flatten"]),
    ([_head("{global_pool: avg}", "{dense: {units: 8, activation: leaky}}")],
     ["'model.head.layers.1.dense.activation'", "unknown activation 'leaky'", "relu, swish, gelu, elu, linear"]),
    ([_head("{global_pool: mean}")], ["'model.head.layers.0.global_pool.pooling'", "avg, max, gem"]),
    ([_head("{conv: {filter: 8}}", "{global_pool: avg}")], ["'model.head.layers.0.conv'", "unknown field 'filter'"]),
    ([_head("{conv: {kernel: 3}}", "{global_pool: avg}")], ["'model.head.layers.0.conv.filters' is required"]),
    ([_head("{dropout: 1.5}", "{global_pool: avg}")], ["'model.head.layers.0.dropout.rate'", "[0, 1)"]),
    ([_head("{global_pool: avg}", "7")], ["'model.head.layers.1' must be a layer"]),
    # MobileNetV3Small at 64 px gives a 2x2 map.
    ([_head("{max_pool: 3}", "{global_pool: avg}")],
     ["'model.head.layers.0'", "3x3 window is larger than the 2x2 feature map", "MobileNetV3Small gives a 2x2"]),
    ([_head("{conv: 8}", "{max_pool: 2}", "{conv: {filters: 8, kernel: 2}}", "{global_pool: avg}")],
     ["'model.head.layers.2'", "2x2 kernel is larger than the 1x1 feature map"]),
    ([_head("{dense: 8}")], ["'model.head.layers.0'", "(dense(8,relu)) gets the 4-D feature map", "global_pool or flatten"]),
    ([_head("flatten", "{conv: 8}")], ["'model.head.layers.1'", "layers.0 (flatten) already made it a vector"]),
    ([_head("{global_pool: avg}", "{global_pool: max}")], ["'model.head.layers.1'", "(global_pool(max)) needs the 4-D"]),
    ([_head("{conv: 8}")], ["'model.head.layers.0'", "ends the head on the 4-D feature map"]),
    (["model.head.layers=[{global_pool: avg}]"], ["'model.head' has both layers and the short-form key(s) pooling",
                                                  "--set 'model.head={layers: [...]}'"]),
    (["model.backbone=InceptionV3", "data.image_size=74"],
     ["'data.image_size' is 74 but InceptionV3 needs at least 75 px"]),
    (["model.backbone=InceptionResNetV2"], ["'data.image_size' is 64 but InceptionResNetV2 needs at least 75 px"]),
    (["model.backbone=Xception", "data.image_size=70"], ["'data.image_size' is 70 but Xception needs at least 71 px"]),
])
def test_bad_heads_and_small_inception_are_one_line_errors(sets, fragments, tmp_path):
    args = ["train", "--config", TINY, "--workdir", tmp_path / "run"]
    for s in sets:
        args += ["--set", s]
    assert_user_error(run_cli(*args), "tiny.yaml", *fragments, exit_code=2)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- backbones


@pytest.mark.parametrize("name, size, side", [
    # Odd sizes, where rounding up (ceil) and down (floor) part: ceil(97/32) = 4.
    ("EfficientNetB0", 97, 4), ("EfficientNetB0", 380, 12), ("ResNet50", 97, 4), ("MobileNetV2", 97, 4),
    ("MobileNetV3Small", 33, 2),
    # DenseNet: two stride-2 layers round up, three 2x2 average pools round down: 97 -> 49 -> 25 -> 12 -> 6 -> 3.
    ("DenseNet121", 97, 3),
    ("ConvNeXtTiny", 97, 3),  # floor(97 / 32)
    # Inception: 140 -> 69 -> 67 -> 33 -> 31 -> 15 -> 7 -> 3 (valid 3x3 convs and pools).
    ("InceptionV3", 140, 3),
])
def test_feature_map_size_matches_keras(name, size, side):
    from medtl.models.backbones import build_backbone
    from medtl.models.specs import feature_map_size

    assert feature_map_size(name, size) == side
    assert build_backbone(name, "none", size, 3).output_shape[1:3] == (side, side)


_models: dict = {}


def _small_model(backbone: str, size: int):
    """(config, classifier with 3 labels) at `size` px, built once per module (InceptionResNetV2 takes 8 s)."""
    from medtl.models.build import build_model

    if backbone not in _models:
        cfg = load_config(TINY, [f"model.backbone={backbone}", f"data.image_size={size}"])
        _models[backbone] = cfg, build_model(cfg, num_labels=3)
    return _models[backbone]


def _after(layers, name):
    """The layers after the one called `name` (in the base's order)."""
    names = [l.name for l in layers]
    return layers[names.index(name) + 1:]


@pytest.mark.parametrize("backbone, size, side, channels, blocks, top", [
    # (top_blocks N, the last layer of the block below them): the layers after it are the top N blocks.
    ("InceptionV3", 75, 1, 2048, 11, [(1, "mixed9"), (2, "mixed8"), (3, "mixed7")]),
    ("InceptionResNetV2", 75, 1, 1536, 43, [(1, "block8_9_ac"), (3, "block8_7_ac"), (10, "mixed_7a"), (11, "block17_20_ac")]),
    ("Xception", 71, 3, 2048, 13, [(1, "block13_pool"), (2, "block12_sepconv3_bn")]),
])
def test_inception_and_xception_build_small_with_their_blocks(backbone, size, side, channels, blocks, top):
    from medtl.models.backbones import block_groups
    from medtl.models.build import get_base
    from medtl.tf import tf
    from medtl.train.phases import apply_phase

    cfg, model = _small_model(backbone, size)
    base = get_base(model)
    assert base.output_shape == (None, side, side, channels) and model.output_shape == (None, 3)
    assert model(np.full((1, size, size, 3), 128.0, np.float32)).shape == (1, 3)
    groups = block_groups(base, backbone)
    assert len(groups) - 1 == blocks
    layers = [l for l in base.layers if not isinstance(l, tf.keras.layers.InputLayer)]
    assert [l for g in groups for l in g] == layers  # every layer once, in order
    if backbone != "Xception":  # the stem: five conv-BN-ReLU, two max pools, up to the fork into the first block
        assert len(groups[0]) == 17 and isinstance(groups[0][-1], tf.keras.layers.MaxPooling2D)
    else:
        assert [l.name for l in groups[0]][-1] == "block1_conv2_act"
    for n, below in top:
        phase = load_config(TINY, [f"model.backbone={backbone}", f"data.image_size={size}",
                                   f"phases.1.trainable={{top_blocks: {n}}}"]).phases[1]
        trained = apply_phase(model, cfg, phase)
        expected = [l.name for l in _after(layers, below)
                    if l.weights and not isinstance(l, tf.keras.layers.BatchNormalization)]
        assert trained == expected, (n, trained[:3], expected[:3])
    assert groups[-1][-1].name == {"InceptionV3": "mixed10", "InceptionResNetV2": "conv_7b_ac",
                                   "Xception": "block14_sepconv2_act"}[backbone]


def test_phased_unfreezing_trains_inceptions_top_blocks_only():
    """One step of phase 2 ({top_blocks: 2}) changes mixed9/mixed10 and the head, nothing below, no BN statistics."""
    from medtl.models.build import get_base
    from medtl.tf import tf
    from medtl.train.phases import apply_phase

    cfg, model = _small_model("InceptionV3", 75)
    apply_phase(model, cfg, cfg.phases[1])
    model.compile(optimizer=tf.keras.optimizers.SGD(0.1), loss=tf.keras.losses.BinaryCrossentropy(from_logits=True))
    base = get_base(model)
    top = {l.name for l in _after(base.layers, "mixed8")}
    before = {l.name: [w.copy() for w in l.get_weights()] for l in base.layers if l.weights}
    images = np.random.default_rng(0).uniform(0, 255, (4, 75, 75, 3)).astype(np.float32)
    model.train_on_batch(images, np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]], np.float32))
    changed = {l.name for l in base.layers if l.weights and any(
        not np.array_equal(a, b) for a, b in zip(before[l.name], l.get_weights()))}
    assert changed and changed <= top
    assert not any(isinstance(base.get_layer(n), tf.keras.layers.BatchNormalization) for n in changed)
    assert any(base.get_layer(n).name.startswith("conv2d") for n in changed)


# ----------------------------------------------------------------------------- through `medtl train`


@pytest.mark.slow
def test_a_layer_list_head_trains_through_the_cli(records, tmp_path):
    from medtl.data.manifest import read_manifest

    run = tmp_path / "run"
    head = _head("{conv: {filters: 16, kernel: 1, activation: linear}}", "{max_pool: {size: 2, stride: 2}}",
                 "{global_pool: avg}", "{dense: {units: 8, activation: linear}}")
    r = run_cli("train", "--config", TINY, "--workdir", run, "--set", f"data.records={records}", "--set", head,
                "--set", "phases=[{name: head, epochs: 1, learning_rate: 1.0e-3}]")
    assert r.returncode == 0, r.stderr[-3000:]
    labels = read_manifest(records).num_labels
    # MobileNetV3Small's map at 64 px is 2x2x576: conv 1x1 576 -> 16, max pool -> 1x1, dense 16 -> 8, output 8 -> L.
    params = (576 * 16 + 16) + (16 * 8 + 8) + (8 * labels + labels)
    line = (f"train: head conv(16,k1,linear) > max_pool(2) > global_pool(avg) > dense(8,linear) > "
            f"dense({labels} logits): {params:,} parameters")
    assert line in r.stderr, r.stderr[-3000:]
    saved = yaml.safe_load((run / "config.yaml").read_text())["model"]["head"]
    assert saved["layers"][1] == {"max_pool": {"size": 2, "stride": 2, "padding": "valid"}}
    trainable = json.loads((run / "trainable.json").read_text())["head"]
    assert {re.sub(r"/.*", "", v) for v in trainable} == {"head_0_conv", "head_3_dense", "logits"}
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert len(history) == 1 and np.isfinite(history[0]["loss"])
