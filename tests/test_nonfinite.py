"""The train step's finite check: a NaN batch is skipped whatever the CPU's kernels make of it.

On CPUs where TensorFlow turns oneDNN on by default (AVX512_VNNI, AVX512_BF16 or AMX: recent
Intel Xeons), the graph optimiser fuses Conv/DepthwiseConv + frozen BatchNorm + ReLU into one
oneDNN kernel whose ReLU maps NaN to 0, so NaN inputs can give a finite loss and finite
gradients. The guard must not depend on NaN reaching the loss.
"""
import numpy as np
import pytest

from medtl.models.build import Classifier
from medtl.tf import tf


def _conv_bn_relu_classifier():
    """The pattern oneDNN fuses: Conv2D -> frozen BatchNorm -> ReLU, then a small head."""
    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input((16, 16, 3))
    conv = tf.keras.layers.Conv2D(4, 3, padding="same", use_bias=False)
    bn = tf.keras.layers.BatchNormalization()
    # A frozen base, as in the head phase: no gradient reaches the conv (whose own gradient would
    # carry its NaN input), and BatchNorm runs in inference mode, the form oneDNN fuses.
    conv.trainable = bn.trainable = False
    x = tf.keras.layers.ReLU()(bn(conv(inputs)))
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    logits = tf.keras.layers.Dense(2, dtype="float32")(x)
    return Classifier(inputs, logits)


def _fit_one_batch(model, images):
    labels = np.array([[1, 0], [0, 1]] * 2, dtype=np.float32)
    layer_weights = [v for layer in model.layers for v in layer.weights]  # not the model's step counters
    before = [v.numpy().copy() for v in layer_weights]
    model.fit(tf.data.Dataset.from_tensors((images, labels)), epochs=1, verbose=0)
    changed = any(not np.array_equal(a, v.numpy()) for a, v in zip(before, layer_weights))
    return int(model.nonfinite_total.numpy()), changed


@pytest.mark.parametrize("precision", ["float32", "mixed_float16"])
def test_nan_batch_is_skipped_and_a_good_batch_is_applied(precision):
    tf.keras.mixed_precision.set_global_policy(precision)
    try:
        model = _conv_bn_relu_classifier()
        model.compile(optimizer=tf.keras.optimizers.SGD(0.1), loss=tf.keras.losses.BinaryCrossentropy(True))
        skipped, changed = _fit_one_batch(model, np.full((4, 16, 16, 3), np.nan, np.float32))
        assert (skipped, changed) == (1, False)
        assert int(model.nonfinite_streak.numpy()) == 1
        skipped, changed = _fit_one_batch(model, np.random.default_rng(0).uniform(0, 255, (4, 16, 16, 3))
                                          .astype(np.float32))
        assert (skipped, changed) == (1, True)  # applied; the streak restarts
        assert int(model.nonfinite_streak.numpy()) == 0
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")


def test_an_infinite_input_value_is_enough():
    model = _conv_bn_relu_classifier()
    model.compile(optimizer=tf.keras.optimizers.SGD(0.1), loss=tf.keras.losses.BinaryCrossentropy(True))
    images = np.random.default_rng(1).uniform(0, 255, (4, 16, 16, 3)).astype(np.float32)
    images[2, 5, 5, 1] = np.inf
    assert _fit_one_batch(model, images) == (1, False)


def test_a_nan_batch_is_skipped_when_the_device_step_prepares_the_inputs():
    """data.augment_on: device: the check looks at the stream's batch before the step's preparation, which
    may make a NaN image finite (here a map that zeroes non-finite pixels); the real policy with CLAHE on every
    image neither fails on NaN pixels nor hides them."""
    from medtl.config import Transform
    from medtl.data.device_augment import build_device_augment

    gray = np.random.default_rng(2).uniform(0, 255, (4, 16, 16, 1)).astype(np.float32)
    gray[1, 3, 3, 0] = np.nan
    hiding = _conv_bn_relu_classifier()
    hiding.compile(optimizer=tf.keras.optimizers.SGD(0.1), loss=tf.keras.losses.BinaryCrossentropy(True))
    hiding.prepare_inputs = lambda x, step: tf.image.grayscale_to_rgb(tf.where(tf.math.is_finite(x), x, 0.0))
    assert _fit_one_batch(hiding, gray) == (1, False)

    policy = (Transform("CLAHE", (("clip_limit", (2, 2)), ("tile_grid_size", (4, 4)), ("p", 1.0))),
              Transform("Affine", (("rotate", (-5, 5)), ("p", 1.0))))
    augment = build_device_augment(policy, 0)
    out = augment(tf.constant(gray), tf.constant(0, tf.int64)).numpy()
    assert np.isnan(out[1]).any() and np.isfinite(np.delete(out, 1, axis=0)).all()
    real = _conv_bn_relu_classifier()
    real.compile(optimizer=tf.keras.optimizers.SGD(0.1), loss=tf.keras.losses.BinaryCrossentropy(True))
    real.prepare_inputs = lambda x, step: tf.image.grayscale_to_rgb(augment(x, step))
    assert _fit_one_batch(real, gray) == (1, False)
    gray[1, 3, 3, 0] = 7.0
    assert _fit_one_batch(real, gray) == (1, True)  # a finite batch is applied (the count stays 1)
