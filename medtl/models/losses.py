"""Multi-label losses on logits that honour a per-label mask (passed as Keras sample_weight)."""
from __future__ import annotations

from medtl.tf import tf


@tf.keras.utils.register_keras_serializable(package="medtl")
class MaskedBCE(tf.keras.losses.Loss):
    """Binary cross-entropy from logits, per label. Returns (batch, num_labels) so that a
    (batch, num_labels) sample_weight mask zeroes uncertain labels; the mean is over all entries."""

    def __init__(self, name: str = "bce", **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):  # (batch, L) labels, (batch, L) logits -> (batch, L)
        y_true = tf.cast(y_true, tf.float32)
        return tf.nn.sigmoid_cross_entropy_with_logits(labels=y_true, logits=tf.cast(y_pred, tf.float32))


def build_loss(name: str = "bce") -> tf.keras.losses.Loss:
    return MaskedBCE()
