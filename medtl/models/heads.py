"""Multi-label classification heads: pooling, optional 1x1 conv, inner dense layers, dropout."""
from __future__ import annotations

from medtl.config import HeadConfig
from medtl.tf import tf


@tf.keras.utils.register_keras_serializable(package="medtl")
class GeMPooling(tf.keras.layers.Layer):
    """Generalised-mean pooling with a learned exponent p (Radenovic et al., 2018)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.p_init, self.eps = p, eps

    def build(self, input_shape):
        self.p = self.add_weight(name="p", shape=(), dtype="float32",
                                 initializer=tf.keras.initializers.Constant(self.p_init))
        super().build(input_shape)

    def call(self, x):  # (batch, h, w, c) -> (batch, c)
        pooled = tf.reduce_mean(tf.pow(tf.maximum(x, self.eps), self.p), axis=[1, 2])
        return tf.pow(pooled, 1.0 / self.p)

    def get_config(self):
        return {**super().get_config(), "p": self.p_init, "eps": self.eps}


def build_head(features, head: HeadConfig, num_labels: int):
    """(batch, h, w, c) feature map -> (batch, num_labels) float32 logits."""
    x = features
    if head.conv_filters:
        x = tf.keras.layers.Conv2D(head.conv_filters, 1, activation=head.activation, name="head_conv")(x)
    if head.pooling == "avg":
        x = tf.keras.layers.GlobalAveragePooling2D(name="head_pool")(x)
    elif head.pooling == "max":
        x = tf.keras.layers.GlobalMaxPooling2D(name="head_pool")(x)
    else:
        x = GeMPooling(name="head_pool", dtype="float32")(x)  # x ** p overflows float16
    return build_head_top(x, head, num_labels)


def build_head_top(pooled, head: HeadConfig, num_labels: int):
    """The head after pooling: (batch, c) pooled features -> (batch, num_labels) float32 logits.
    Also what `medtl search` trains on a pooled feature cache."""
    x = pooled
    if head.batch_norm:
        x = tf.keras.layers.BatchNormalization(name="head_pool_bn")(x)
    for i, units in enumerate(head.dense):
        if head.dropout:
            x = tf.keras.layers.Dropout(head.dropout, name=f"head_dropout_{i}")(x)
        x = tf.keras.layers.Dense(units, activation=head.activation, name=f"head_dense_{i}")(x)
        if head.batch_norm:
            x = tf.keras.layers.BatchNormalization(name=f"head_bn_{i}")(x)
    if head.dropout:
        x = tf.keras.layers.Dropout(head.dropout, name="head_dropout_out")(x)
    # float32 output keeps the loss stable under mixed precision.
    return tf.keras.layers.Dense(num_labels, dtype="float32", name="logits")(x)
