"""Model building and phased trainability, on tiny inputs with random weights."""
import os

import numpy as np
import pytest

from medtl.config import load_config
from medtl.errors import MedtlError
from medtl.models.backbones import BACKBONES, block_groups, build_backbone
from medtl.models.build import build_model, get_base, set_precision
from medtl.tf import tf
from medtl.train.phases import apply_phase

from conftest import JOBS


def _cfg(*overrides, job="smoke.yaml"):
    return load_config(os.path.join(JOBS, job), list(overrides))


def _base_trainable(model):
    return sorted({l.name for l in get_base(model).layers if l.trainable and l.trainable_weights})


def test_output_is_float32_logits_per_label():
    model = build_model(_cfg(), num_labels=5)
    out = model(np.zeros((2, 64, 64, 3), np.float32))
    assert out.shape == (2, 5) and out.dtype == tf.float32


def test_efficientnet_b4_builds_at_small_size():
    cfg = _cfg("data.image_size=64", job="chestxray14_b4.yaml")
    model = build_model(cfg, num_labels=14, weights="none")
    assert get_base(model).output_shape == (None, 2, 2, 1792)
    assert model.output_shape == (None, 14)
    groups = block_groups(get_base(model), "EfficientNetB4")
    assert len(groups) == 8  # stem + block1..block7
    assert groups[-1][-1].name == "top_activation"


def test_mixed_precision_keeps_float32_output():
    set_precision("mixed_float16")
    try:
        model = build_model(_cfg("model.head.pooling=gem", "model.head.conv_filters=16"), num_labels=3)
        assert get_base(model).get_layer("stem_conv").compute_dtype == "float16"
        assert model(np.zeros((1, 64, 64, 3), np.float32)).dtype == tf.float32
    finally:
        set_precision("float32")


@pytest.mark.parametrize("overrides, names", [
    ((), ["head_pool", "head_dropout_0", "head_dense_0", "head_dropout_out", "logits"]),
    (("model.head.pooling=gem", "model.head.conv_filters=8", "model.head.dense=[16, 8]",
      "model.head.batch_norm=true", "model.head.dropout=0"),
     ["head_conv", "head_pool", "head_pool_bn", "head_dense_0", "head_bn_0", "head_dense_1", "head_bn_1", "logits"]),
])
def test_head_options(overrides, names):
    model = build_model(_cfg(*overrides), num_labels=4)
    head = [l.name for l in model.layers if l.name.startswith("head_") or l.name == "logits"]
    assert head == names
    assert model(np.zeros((2, 64, 64, 3), np.float32)).shape == (2, 4)


def test_batchnorm_momentum_reaches_every_batchnorm_layer_and_the_training_step():
    cfg = _cfg("model.batchnorm_momentum=0.75", "model.head.dense=[8]", "model.head.batch_norm=true",
               "model.head.dropout=0")
    model = build_model(cfg, num_labels=2)
    layers = [l for l in model.submodules if isinstance(l, tf.keras.layers.BatchNormalization)]
    assert {l.name for l in layers} >= {"head_bn_0", "stem_bn"} and {l.momentum for l in layers} == {0.75}
    x = np.random.default_rng(0).uniform(0, 255, (4, 64, 64, 3)).astype(np.float32)
    # One training-mode call (stochastic depth makes each call differ), returning what head_bn_0 saw:
    # its moving mean goes from 0 to 0.75 * 0 + 0.25 * that batch's mean.
    probe = tf.keras.Model(model.input, [model.get_layer("head_dense_0").output, model.output])
    into_bn, _ = probe(x, training=True)
    np.testing.assert_allclose(model.get_layer("head_bn_0").moving_mean.numpy(),
                               0.25 * np.mean(into_bn.numpy(), axis=0), rtol=1e-4, atol=1e-6)
    # By default each layer keeps its own: Keras' 0.99, MobileNetV3's 0.999.
    default = build_model(_cfg("model.backbone=MobileNetV3Small", "model.head.dense=[8]",
                               "model.head.batch_norm=true"), num_labels=2)
    own = {l.name: l.momentum for l in default.submodules if isinstance(l, tf.keras.layers.BatchNormalization)}
    assert own["head_bn_0"] == 0.99 and {m for n, m in own.items() if not n.startswith("head_")} == {0.999}


def test_batchnorm_momentum_reaches_the_search_trial_and_the_simclr_model():
    """Head trials on cached features and `medtl pretrain --method simclr` build their own models: the option
    reaches their BatchNorm layers too, and by default leaves each layer's own."""
    from medtl.models.contrastive import build_simclr_model
    from medtl.search.space import Head
    from medtl.search.trial import build_trial_model

    cfg = _cfg("model.batchnorm_momentum=0.75", "model.head.dense=[8]", "model.head.batch_norm=true")

    def momenta(model):
        return {l.name: l.momentum for l in model.submodules if isinstance(l, tf.keras.layers.BatchNormalization)}

    head = Head(cfg.model.head, 1e-3, "bce")
    trial = momenta(build_trial_model((2, 2, 16), head, 2, False, cfg.model.batchnorm_momentum))
    assert "head_bn_0" in trial and set(trial.values()) == {0.75}
    assert set(momenta(build_trial_model((2, 2, 16), head, 2, False)).values()) == {0.99}
    simclr = momenta(build_simclr_model(cfg, weights="none"))
    assert "stem_bn" in simclr and set(simclr.values()) == {0.75}


def test_phase_none_trains_only_the_head():
    cfg = _cfg()
    model = build_model(cfg, num_labels=3)
    apply_phase(model, cfg, cfg.phases[0])
    assert _base_trainable(model) == []
    names = {v.name.split("/")[0] for v in model.trainable_variables}
    assert names == {"head_dense_0", "logits"}


def test_phase_top_blocks_trains_top_blocks_with_batchnorm_frozen():
    cfg = _cfg()
    model = build_model(cfg, num_labels=3)
    apply_phase(model, cfg, cfg.phases[1])  # {top_blocks: 2}
    trained = _base_trainable(model)
    assert trained and all(n.startswith(("block6", "block7", "top_")) for n in trained)
    assert any(n.startswith("block6") for n in trained) and "top_conv" in trained
    assert not any(n.startswith("block5") for n in trained)
    bn = [l for l in get_base(model).layers if isinstance(l, tf.keras.layers.BatchNormalization)]
    assert bn and not any(l.trainable for l in bn)
    # Every non-BN layer with weights in block6/block7/top trains.
    expected = sorted(l.name for l in get_base(model).layers if l.weights and l.name.startswith(
        ("block6", "block7", "top_")) and not isinstance(l, tf.keras.layers.BatchNormalization))
    assert trained == expected


def test_phase_all_and_batchnorm_option():
    cfg = _cfg("phases.1.trainable=all")
    model = build_model(cfg, num_labels=3)
    apply_phase(model, cfg, cfg.phases[1])
    base = get_base(model)
    learnable = [l for l in base.layers if l._trainable_weights]  # weights that can ever train
    non_bn = [l.name for l in learnable if not isinstance(l, tf.keras.layers.BatchNormalization)]
    assert _base_trainable(model) == sorted(non_bn)
    cfg = _cfg("phases.1.trainable=all", "phases.1.train_batch_norm=true")
    model = build_model(cfg, num_labels=3)
    apply_phase(model, cfg, cfg.phases[1])
    assert _base_trainable(model) == sorted(l.name for l in get_base(model).layers if l._trainable_weights)


def test_phase_switch_back_to_frozen():
    cfg = _cfg()
    model = build_model(cfg, num_labels=3)
    apply_phase(model, cfg, cfg.phases[1])
    apply_phase(model, cfg, cfg.phases[0])
    assert _base_trainable(model) == []


def test_too_many_top_blocks_is_an_error():
    from medtl.train.phases import check_phases_trainable

    cfg = _cfg("phases.1.trainable={top_blocks: 9}")
    model = build_model(cfg, num_labels=3)
    with pytest.raises(MedtlError, match="top_blocks=9 but EfficientNetB0 has 7 blocks"):
        check_phases_trainable(model, cfg)


@pytest.mark.parametrize("name, blocks", [("ResNet50", 4), ("DenseNet121", 4), ("MobileNetV2", 16),
                                          ("MobileNetV3Small", 11), ("EfficientNetV2B0", 6)])
def test_other_backbones_have_block_structure(name, blocks):
    base = build_backbone(name, "none", 64, 3)
    groups = block_groups(base, name)
    assert len(groups) - 1 == blocks
    assert sum(len(g) for g in groups) == len(base.layers) - 1  # every layer but the input


def test_unknown_backbone():
    with pytest.raises(MedtlError, match="unknown backbone 'efficientnetb0' \\(did you mean EfficientNetB0\\?\\)"):
        build_model(_cfg("model.backbone=efficientnetb0"), num_labels=2)
    assert "EfficientNetB4" in BACKBONES


def test_weights_from_file_round_trip(tmp_path):
    base = build_backbone("EfficientNetB0", "none", 64, 3)
    path = str(tmp_path / "base.h5")
    base.save_weights(path)
    loaded = build_backbone("EfficientNetB0", path, 64, 3)
    for a, b in zip(base.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(MedtlError, match="weights file .*missing.h5 does not exist"):
        build_backbone("EfficientNetB0", str(tmp_path / "missing.h5"), 64, 3)
    with pytest.raises(MedtlError, match="does not fit ResNet50"):
        build_backbone("ResNet50", path, 64, 3)
