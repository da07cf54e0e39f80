"""Each multi-label loss against values worked out by hand, and the label mask."""
import math

import numpy as np
import pytest

from medtl.config import LossConfig
from medtl.data.manifest import Manifest, SplitInfo
from medtl.errors import MedtlError
from medtl.models.losses import AsymmetricLoss, FocalLoss, MaskedBCE, build_loss, positive_weights
from medtl.tf import tf

# Two labels for one image. Logit 0 -> p = 0.5; logit ln(3) -> p = 0.75.
Y = np.array([[1.0, 0.0]], np.float32)
Z = np.array([[0.0, math.log(3.0)]], np.float32)


def _elementwise(loss):
    return loss.call(tf.constant(Y), tf.constant(Z)).numpy()[0]


def test_bce_by_hand():
    # -log 0.5 for the positive; -log(1 - 0.75) = log 4 for the negative.
    np.testing.assert_allclose(_elementwise(MaskedBCE()), [math.log(2), math.log(4)], rtol=1e-6)


def test_weighted_bce_by_hand():
    np.testing.assert_allclose(_elementwise(MaskedBCE(pos_weight=[3.0, 7.0])), [3 * math.log(2), math.log(4)],
                               rtol=1e-6)


def test_focal_by_hand():
    # gamma 2: positive (1 - 0.5)^2 log 2 = 0.25 log 2; negative 0.75^2 log 4 = 0.5625 log 4.
    np.testing.assert_allclose(_elementwise(FocalLoss(gamma=2.0)), [0.25 * math.log(2), 0.5625 * math.log(4)],
                               rtol=1e-6)
    # alpha 0.25 weights positives by 0.25 and negatives by 0.75.
    np.testing.assert_allclose(_elementwise(FocalLoss(gamma=2.0, alpha=0.25)),
                               [0.0625 * math.log(2), 0.421875 * math.log(4)], rtol=1e-6)
    # gamma 0 and no alpha is plain BCE.
    np.testing.assert_allclose(_elementwise(FocalLoss(gamma=0.0)), _elementwise(MaskedBCE()), rtol=1e-6)


def test_asymmetric_by_hand():
    # Positive: (1 - 0.5)^1 log 2 with gamma_pos 1. Negative: p_m = 0.75 - 0.05 = 0.7,
    # 0.7^4 * -log(0.3).
    got = _elementwise(AsymmetricLoss(gamma_pos=1.0, gamma_neg=4.0, clip=0.05))
    np.testing.assert_allclose(got, [0.5 * math.log(2), 0.7 ** 4 * -math.log(0.3)], rtol=1e-5)
    # An easy negative below the margin costs nothing.
    easy = AsymmetricLoss(clip=0.2).call(tf.constant([[0.0]]), tf.constant([[math.log(0.1 / 0.9)]])).numpy()
    assert easy[0, 0] == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("loss", [MaskedBCE(), MaskedBCE(pos_weight=[2.0, 2.0]), FocalLoss(), AsymmetricLoss()])
def test_mask_zeroes_masked_labels(loss):
    y = tf.constant([[1.0, 0.0], [0.0, 1.0]])
    z = tf.constant([[2.0, -1.0], [0.5, 3.0]])
    mask = tf.constant([[1.0, 0.0], [0.0, 1.0]])
    per_entry = loss.call(y, z).numpy()
    masked = float(loss(y, z, sample_weight=mask))
    assert masked == pytest.approx((per_entry * mask.numpy()).sum() / per_entry.size, rel=1e-6)
    # Changing a masked label changes nothing.
    y2 = tf.constant([[1.0, 1.0], [1.0, 1.0]])
    assert float(loss(y2, z, sample_weight=mask)) == pytest.approx(masked, rel=1e-6)


def test_masked_labels_give_no_gradient():
    z = tf.Variable([[0.3, -0.2]])
    with tf.GradientTape() as tape:
        value = MaskedBCE()(tf.constant([[1.0, 1.0]]), z, sample_weight=tf.constant([[1.0, 0.0]]))
    grad = tape.gradient(value, z).numpy()
    assert grad[0, 0] != 0 and grad[0, 1] == 0


def _manifest(prevalence: dict) -> Manifest:
    return Manifest(labels=tuple(prevalence), stored_image_size=32, bit_depth=16,
                    splits={"train": SplitInfo(prevalence=prevalence)})


def test_positive_weights_from_manifest():
    manifest = _manifest({"a": 0.2, "b": 0.001})
    np.testing.assert_allclose(positive_weights(manifest, 50.0), [4.0, 50.0])
    loss = build_loss(LossConfig(name="weighted_bce", max_pos_weight=10.0), manifest)
    assert loss.pos_weight == [4.0, 10.0]
    manifest = _manifest({"a": 0.2, "b": 0.0})
    with pytest.raises(MedtlError, match="label 'b' has no positives"):
        positive_weights(manifest, 50.0)
