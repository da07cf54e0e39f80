"""The augmentation policy in the job config: defaults, YAML forms, and errors at load time."""
import os

import numpy as np
import pytest

from medtl.config import DEFAULT_AUGMENT, Transform, dump_config, load_config
from medtl.data.augment import BatchAugmenter, check_policy
from medtl.errors import ConfigError

from conftest import JOBS, assert_user_error, run_cli

MINIMAL = {"phases": [{"name": "head", "epochs": 1, "learning_rate": 1e-3}]}


def _load(augment, **data):
    return load_config(raw={**MINIMAL, "data": {"image_size": 64, "augment": augment, **data}})


def test_default_policy_suits_radiographs():
    cfg = load_config(raw=MINIMAL)
    assert cfg.data.augment == DEFAULT_AUGMENT
    names = [t.name for t in DEFAULT_AUGMENT]
    assert names == ["Affine", "RandomBrightnessContrast", "RandomGamma", "CLAHE", "GaussNoise"]
    assert not any("Flip" in n or "Transpose" in n for n in names)  # laterality matters
    affine = DEFAULT_AUGMENT[0].kwargs()
    assert max(abs(a) for a in affine["rotate"]) <= 10 and max(abs(s) for s in affine["translate_percent"]) <= 0.1
    assert check_policy(DEFAULT_AUGMENT, 380) == []


def test_yaml_forms_round_trip(tmp_path):
    cfg = _load(["CLAHE", {"Affine": {"rotate": [-5, 5], "p": 0.5}}, {"GaussNoise": None}])
    assert cfg.data.augment == (Transform("CLAHE"), Transform("Affine", (("rotate", (-5, 5)), ("p", 0.5))),
                                Transform("GaussNoise"))
    path = tmp_path / "job.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(str(path)) == cfg
    assert _load([]).data.augment == ()


def test_set_override_replaces_the_policy():
    cfg = load_config(os.path.join(JOBS, "smoke.yaml"), ["data.augment=[{RandomGamma: {gamma_limit: [90, 110]}}]"])
    assert cfg.data.augment == (Transform("RandomGamma", (("gamma_limit", (90, 110)),)),)


@pytest.mark.parametrize("augment, message", [
    (["Afine"], "'data.augment.0' names unknown transform 'Afine' (did you mean Affine?)"),
    (["RandomGamma", "clahe"], "'data.augment.1' names unknown transform 'clahe' (did you mean CLAHE?)"),
    (["Compose"], "'data.augment.0' names unknown transform 'Compose'"),
    ([{"Affine": {"rotate": "a lot"}}], "'data.augment.0' Affine: bad arguments: rotate='a lot': Input should be"),
    ([{"Affine": {"rotat": 5}}], "'data.augment.0' Affine: bad arguments: Argument(s) 'rotat' are not valid"),
    ([{"CLAHE": {"clip_limit": -1}}], "'data.augment.0' CLAHE: bad arguments: clip_limit=-1: All values"),
    ([{"GaussNoise": {"std_range": [0.1, 2]}}], "std_range=(0.1, 2): All values in (0.1, 2.0) must be >= 0 and <= 1"),
    (["RandomCrop"], "'data.augment.0' RandomCrop: bad arguments: height: is required; width: is required"),
    ([{"RandomCrop": {"height": 32, "width": 32}}],
     "'data.augment.0' RandomCrop turns a 64x64x1 uint8 image into 32x32x1 uint8; transforms must keep the size"),
    (["Mosaic"], "'data.augment.0' Mosaic fails on a 64x64 8-bit grayscale image: ValueError: Mosaic requires"),
    ([{"Affine": 3}], "'data.augment.0' must be a transform name or {Name: {argument: value}}"),
    ("CLAHE", "'data.augment' must be list of albumentations transforms"),
])
def test_bad_policy_is_a_config_error(augment, message):
    with pytest.raises(ConfigError) as err:
        _load(augment)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_image_size_below_the_backbone_minimum():
    with pytest.raises(ConfigError, match=r"'data.image_size' is 24 but EfficientNetB4 needs at least 32 px"):
        load_config(os.path.join(JOBS, "chestxray14_b4.yaml"), ["data.image_size=24"])


@pytest.mark.parametrize("raw, message", [
    ({"data": {"cache": ""}}, "'data.cache' must be none, memory or a folder"),
    ({"seed": -1}, "'seed' must be >= 0"),
    ({"data": {"deterministic": "yes"}}, "'data.deterministic' must be bool"),
])
def test_pipeline_options_are_checked(raw, message):
    with pytest.raises(ConfigError, match=message):
        load_config(raw={**MINIMAL, **raw})


def test_errors_come_before_any_data_is_read(tmp_path):
    # data.records does not exist: the policy error must win, i.e. come at config load.
    for override, fragment in (("data.augment=[Afine]", "'data.augment.0' names unknown transform 'Afine'"),
                               ("data.image_size=16", "'data.image_size' is 16 but EfficientNetB0 needs")):
        r = run_cli("train", "--config", os.path.join(JOBS, "smoke.yaml"), "--workdir", tmp_path / "run",
                    "--set", f"data.records={tmp_path / 'absent'}", "--set", override)
        assert_user_error(r, fragment)
        assert not (tmp_path / "run").exists()


def test_batch_augmenter_is_a_function_of_stream_position():
    policy = load_config(raw=MINIMAL).data.augment
    images = np.random.default_rng(0).integers(0, 256, (6, 48, 48, 1), dtype=np.uint8)
    a = BatchAugmenter(policy, (0, 0, 0))
    b = BatchAugmenter(policy, (0, 0, 0))
    out = a(images, np.arange(6))
    assert out.shape == images.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, b(images, np.arange(6)))
    # Image 3 alone at position 3 gets what it got inside the batch: order and batching do not matter.
    np.testing.assert_array_equal(b(images[3:4], np.array([3]))[0], out[3])
    assert not np.array_equal(a(images, np.arange(6, 12)), out)
    assert not np.array_equal(BatchAugmenter(policy, (1, 0, 0))(images, np.arange(6)), out)
