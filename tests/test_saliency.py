"""Grad-CAM (medtl.models.saliency) on untrained models: it matches a hand computation, builds for every
backbone family medtl offers, and gives float32 maps under mixed_float16. The trained-model check (the
map points at the finding) is in test_clinical_cli.py."""
import cv2
import numpy as np
import pytest

from medtl.config import load_job_config
from medtl.models.specs import BACKBONES

from conftest import REPO


def _model(backbone: str, size: int, labels: int = 3, precision: str = "float32"):
    from medtl.models.build import build_model, set_precision

    cfg = load_job_config(f"{REPO}/tests/reliability/tiny.yaml",
                          ["data.records=/nonexistent", f"model.backbone={backbone}", f"data.image_size={size}",
                           "model.head.dense=[]", "model.head.dropout=0.0"])
    set_precision(precision)
    try:
        return build_model(cfg, labels, weights="none")
    finally:
        set_precision("float32")


def _images(size: int, n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype(np.float32)


def _interpolate(cam: np.ndarray, centres: np.ndarray, size: int) -> np.ndarray:
    """A (h, w) map at the pixels of a size x size image, its cells at `centres` (continuous pixel
    coordinates), linear between them and held beyond them (np.interp, rows then columns)."""
    pixels = np.arange(size) + 0.5
    rows = np.stack([np.interp(pixels, centres, cam[:, j]) for j in range(cam.shape[1])], axis=1)
    return np.stack([np.interp(pixels, centres, rows[i]) for i in range(size)])


def test_gradcam_matches_hand_computation():
    """Average pooling then one dense layer: d logit_k / d A[h, w, c] = W[c, k] / (H W), so the map is
    ReLU(sum_c W[c, k] A[..., c]) resized bilinearly to the image (cells at their share's centre), scaled to its maximum."""
    from medtl.models.saliency import build_gradcam_fn
    from medtl.tf import tf

    size = 96
    model = _model("MobileNetV3Small", size)
    kernel = np.random.default_rng(1).normal(0, 1, model.get_layer("logits").kernel.shape).astype(np.float32)
    model.get_layer("logits").kernel.assign(kernel)
    images = _images(size)
    got = build_gradcam_fn(model)(tf.constant(images)).numpy()
    assert got.shape == (2, size, size, 3) and got.dtype == np.float32

    base = model.get_layer("backbone")
    features = base(model.get_layer("preprocess")(images), training=False).numpy()  # (2, 3, 3, c)
    assert features.shape[1:3] == (3, 3)
    centres = 32 * np.arange(3) + 16.0  # a bilinear resize of 3 cells to 96 px: cell j stands for [32j, 32j + 32)
    for b in range(2):
        for k in range(3):
            cam = np.maximum(features[b] @ kernel[:, k], 0)  # the 1/(HW) factor cancels in the scaling
            if cam.max() == 0:
                np.testing.assert_array_equal(got[b, ..., k], 0)
                continue
            want = _interpolate(cam, centres, size)
            np.testing.assert_allclose(got[b, ..., k], want / want.max(), atol=2e-4)
    peaks = got.max(axis=(1, 2))  # (2, 3)
    assert np.isclose(peaks, 1.0).sum() >= 2  # most maps are not empty: the comparison compared something


def _families() -> list[str]:
    """One backbone per family: specs sharing preprocessing, block structure and constructor arguments."""
    seen = {}
    for name, spec in BACKBONES.items():
        seen.setdefault((spec.preprocess, spec.block_regex, spec.kwargs), name)
    return list(seen.values())


def test_every_backbone_belongs_to_a_tested_family():
    families = _families()
    assert len(families) == 11, families
    assert {"EfficientNetB0", "EfficientNetV2B0", "ResNet50", "ResNet50V2", "DenseNet121", "MobileNetV2",
            "MobileNetV3Small", "ConvNeXtTiny", "InceptionV3", "InceptionResNetV2", "Xception"} == set(families)


@pytest.mark.parametrize("backbone", _families())
def test_gradcam_builds_for_each_backbone_family(backbone):
    from medtl.models.saliency import build_gradcam_fn
    from medtl.tf import tf

    size = max(64, BACKBONES[backbone].min_size)  # Inception and Xception need 75 and 71 px
    maps = build_gradcam_fn(_model(backbone, size, labels=2))(tf.constant(_images(size, n=1))).numpy()
    assert maps.shape == (1, size, size, 2) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1


def test_gradcam_under_mixed_float16_is_float32_and_matches_float32():
    from medtl.models.saliency import build_gradcam_fn
    from medtl.tf import tf

    size = 96
    full = _model("ResNet50V2", size)
    half = _model("ResNet50V2", size, precision="mixed_float16")
    assert half.get_layer("backbone").output.dtype == tf.float16
    half.set_weights(full.get_weights())
    images = tf.constant(_images(size))
    want = build_gradcam_fn(full)(images).numpy()
    got = build_gradcam_fn(half)(images).numpy()
    assert got.dtype == np.float32 and np.isfinite(got).all()
    assert want.max() > 0
    np.testing.assert_allclose(got, want, atol=0.05)


def test_overlay_keeps_the_image_where_the_map_is_cold():
    from medtl.models.saliency import OVERLAY_FLOOR, overlay

    image = np.tile(np.linspace(0, 255, 32, dtype=np.float32), (32, 1))
    heat = np.zeros((32, 32), np.float32)
    heat[:8, :8] = 1.0
    out = overlay(image, heat)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    cold = heat < OVERLAY_FLOOR
    np.testing.assert_array_equal(out[cold], np.repeat(np.round(image[cold])[:, None], 3, axis=1))
    hot = out[:8, :8].astype(int)
    assert (hot.max(axis=-1) - hot.min(axis=-1)).min() > 40  # coloured: JET red over grey
