"""data.augment_on: device: the policy's transforms as TensorFlow ops, each against albumentations' own output
(OpenCV's CLAHE for CLAHE) on the same image with the same drawn values, their probabilities and noise levels
against the numbers they are given, their seeding, and the config check of what the device cannot run."""
import numpy as np
import pytest

from medtl.config import Transform, load_config
from medtl.data.device_augment import build_device_augment, clahe
from medtl.data.policy import instantiate
from medtl.errors import ConfigError
from medtl.tf import tf

SIZE = 96


def _t(name, **args):
    return Transform(name, tuple(args.items()))


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """A smooth 8-bit image (bilinear sampling differs from OpenCV's fixed-point weights by under a level)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    return (127 + 60 * np.sin(xx / 7.0) + 50 * np.cos(yy / 11.0)).clip(0, 255).astype(np.uint8)[..., None]


def _device(policy, images, seed=0, step=0) -> np.ndarray:
    out = build_device_augment(policy, seed)(tf.constant(images, tf.float32), tf.constant(step, tf.int64))
    return out.numpy()


def _albumentations(t, image) -> np.ndarray:
    import albumentations as A

    return A.Compose([instantiate(t)], seed=0)(image=image)["image"].astype(np.float32)


@pytest.mark.parametrize("t, mean_within, max_within", [
    # Ranges of one value: albumentations and the device draw the same. Translations are whole pixels
    # (albumentations rounds them; the device does not need to).
    (_t("Affine", rotate=(5, 5), scale=(1.08, 1.08), translate_percent=(3 / SIZE, 3 / SIZE), p=1.0), 0.5, 4.0),
    (_t("Affine", rotate=(-6, -6), scale=(0.92, 0.92), translate_percent=(-6 / SIZE, -6 / SIZE), p=1.0), 0.5, 4.0),
    (_t("Affine", rotate=(0, 0), scale={"x": (1.1, 1.1), "y": (0.9, 0.9)}, p=1.0), 0.5, 4.0),
    (_t("RandomGamma", gamma_limit=(80, 80), p=1.0), 0.6, 1.0),
    (_t("RandomBrightnessContrast", brightness_limit=(0.1, 0.1), contrast_limit=(-0.1, -0.1), p=1.0), 0.6, 1.0),
    (_t("RandomBrightnessContrast", brightness_limit=(-0.2, -0.2), contrast_limit=(0.3, 0.3),
        brightness_by_max=False, p=1.0), 0.6, 1.0),
    (_t("CLAHE", clip_limit=(2, 2), tile_grid_size=(8, 8), p=1.0), 0.05, 1.0),
    (_t("HorizontalFlip", p=1.0), 0.0, 0.0),
])
def test_each_transform_gives_albumentations_image(image, t, mean_within, max_within):
    want = _albumentations(t, image)
    got = _device([t], image[None])[0]
    diff = np.abs(got - want)
    assert diff.mean() <= mean_within and diff.max() <= max_within, (diff.mean(), diff.max())


def test_clahe_is_opencvs_on_a_size_the_tiles_do_not_divide():
    import cv2

    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (2, 100, 100, 1), dtype=np.uint8)
    images[1] = (images[1] // 4) + 100  # a narrow histogram: the clip limit matters
    got = clahe(tf.constant(images, tf.float32), tf.constant([2.0, 3.5]), (8, 8)).numpy()
    # The histograms counted without bincount (for op determinism on a GPU) are the same.
    np.testing.assert_array_equal(got, clahe(tf.constant(images, tf.float32), tf.constant([2.0, 3.5]), (8, 8),
                                             deterministic=True).numpy())
    for i, limit in enumerate((2.0, 3.5)):
        want = cv2.createCLAHE(clipLimit=limit, tileGridSize=(8, 8)).apply(images[i, ..., 0])
        diff = np.abs(got[i, ..., 0] - want)
        assert diff.max() <= 1 and diff.mean() < 0.01


def test_clahe_pads_like_opencv_when_only_one_side_needs_it():
    """A 4 x 8 grid on 100 px: 100 is a multiple of 4, not of 8, and OpenCV pads both sides by a remainder tile."""
    import cv2

    image = np.random.default_rng(4).integers(40, 200, (1, 100, 100, 1), dtype=np.uint8)
    want = cv2.createCLAHE(clipLimit=2.5, tileGridSize=(4, 8)).apply(image[0, ..., 0])
    got = clahe(tf.constant(image, tf.float32), tf.constant([2.5]), (4, 8)).numpy()[0, ..., 0]
    assert np.abs(got - want).max() <= 1 and np.abs(got - want).mean() < 0.01


def test_probabilities_noise_and_seeding():
    grey = np.full((400, 16, 16, 1), 128.0, np.float32)
    brighten = [_t("RandomBrightnessContrast", brightness_limit=(0.2, 0.2), contrast_limit=(0, 0), p=0.3)]
    applied = (_device(brighten, grey)[:, 0, 0, 0] != 128.0).mean()
    assert abs(applied - 0.3) < 4 * np.sqrt(0.3 * 0.7 / 400)
    noisy = _device([_t("GaussNoise", std_range=(0.02, 0.02), mean_range=(0.1, 0.1), p=1.0)], grey) - 128.0
    assert noisy.std() == pytest.approx(0.02 * 255, rel=0.05) and noisy.mean() == pytest.approx(0.1 * 255, rel=0.05)
    # The same (seed, step) gives the same images; another step or seed others.
    policy = load_config(raw={"phases": [{"name": "p", "epochs": 1, "learning_rate": 1e-3}]}).data.augment
    batch = np.repeat(np.linspace(0, 255, 64 * 64, dtype=np.float32).reshape(1, 64, 64, 1), 4, axis=0)
    first = _device(policy, batch, seed=5, step=7)
    np.testing.assert_array_equal(first, _device(policy, batch, seed=5, step=7))
    assert not np.array_equal(first, _device(policy, batch, seed=5, step=8))
    assert not np.array_equal(first, _device(policy, batch, seed=6, step=7))
    assert first.min() >= 0 and first.max() <= 255


def test_the_config_refuses_what_the_device_cannot_run():
    base = {"data": {"augment_on": "device"}, "phases": [{"name": "p", "epochs": 1, "learning_rate": 1e-3}]}
    load_config(raw=base)  # the default policy runs on the device
    with pytest.raises(ConfigError, match=r"'data\.augment\.1' Sharpen has no device implementation .*"
                                          r"use data\.augment_on: cpu"):
        load_config(raw={**base, "data": {"augment_on": "device", "augment": ["HorizontalFlip", "Sharpen"]}})
    with pytest.raises(ConfigError, match=r"'data\.augment\.0' Affine: argument\(s\) shear not supported on the "
                                          r"device"):
        load_config(raw={**base, "data": {"augment_on": "device", "augment": [{"Affine": {"shear": 5}}]}})
    with pytest.raises(ConfigError, match=r"'data\.augment_on' must be one of cpu, device, got 'gpu'"):
        load_config(raw={**base, "data": {"augment_on": "gpu"}})
