"""Multi-label classification heads: the head's layer list (model.head) built on the base's feature map,
then the output Dense(num_labels) with float32 logits."""
from __future__ import annotations

from medtl.config import HeadConfig, HeadLayer
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


def build_layer(layer: HeadLayer, name: str) -> tf.keras.layers.Layer:
    """The Keras layer of one head layer (config.HeadLayer)."""
    k = tf.keras.layers
    if layer.kind == "conv":
        return k.Conv2D(layer.filters, layer.kernel, strides=layer.stride, padding=layer.padding,
                        activation=layer.activation, name=name)
    if layer.kind in ("max_pool", "avg_pool"):
        pool = k.MaxPooling2D if layer.kind == "max_pool" else k.AveragePooling2D
        return pool(layer.size, strides=layer.stride, padding=layer.padding, name=name)
    if layer.kind == "global_pool":
        if layer.pooling == "gem":
            return GeMPooling(name=name, dtype="float32")  # x ** p overflows float16
        return (k.GlobalAveragePooling2D if layer.pooling == "avg" else k.GlobalMaxPooling2D)(name=name)
    if layer.kind == "dense":
        return k.Dense(layer.units, activation=layer.activation, name=name)
    if layer.kind == "dropout":
        return k.Dropout(layer.rate, name=name)
    if layer.kind == "batch_norm":
        return k.BatchNormalization(name=name)
    if layer.kind == "flatten":
        return k.Flatten(name=name)
    raise AssertionError(layer.kind)  # config.HeadLayer admits no other type


def build_head(features, head: HeadConfig, num_labels: int, pooled: bool = False):
    """(batch, h, w, c) feature map -> (batch, num_labels) float32 logits. pooled: `features` are already
    (batch, c), pooled as the head's first layer (a global avg or max pool) would: what `medtl search` trains
    on a pooled feature cache."""
    layers = head.layer_list()
    x = features
    for index, layer in enumerate(layers):
        if pooled and index == 0:
            continue
        x = build_layer(layer, layer.name or f"head_{index}_{layer.kind}")(x)
    # float32 output keeps the loss stable under mixed precision.
    return tf.keras.layers.Dense(num_labels, dtype="float32", name="logits")(x)


def describe_head(model: tf.keras.Model, head: HeadConfig) -> str:
    """The built head's layer sequence and parameter count, for the log line at the start of training."""
    base = model.get_layer("backbone")
    # Counted over the layers after the base: the classifier itself also holds step counters and metric totals.
    params = sum(layer.count_params() for layer in model.layers[model.layers.index(base) + 1:])
    return f"{head.describe()} > dense({model.output_shape[-1]} logits): {params:,} parameters"
