"""The full classifier: [0, 255] images -> backbone -> head -> (batch, num_labels) logits."""
from __future__ import annotations

from medtl.config import Config
from medtl.models.backbones import Preprocess, build_backbone, get_spec
from medtl.models.heads import build_head
from medtl.tf import tf


def set_precision(precision: str) -> None:
    """Set the global Keras dtype policy; call before building the model."""
    tf.keras.mixed_precision.set_global_policy(precision)


def build_model(cfg: Config, num_labels: int, weights: str | None = None) -> tf.keras.Model:
    """The classifier for `cfg`. `weights` overrides cfg.model.weights (e.g. none when a checkpoint follows)."""
    size, channels = cfg.data.image_size, cfg.data.channels
    spec = get_spec(cfg.model.backbone)
    inputs = tf.keras.Input((size, size, channels), name="image")  # (batch, size, size, channels) in [0, 255]
    x = Preprocess(spec.preprocess, name="preprocess")(inputs)
    base = build_backbone(cfg.model.backbone, weights or cfg.model.weights, size, channels)
    features = base(x)  # (batch, h, w, c) feature map
    logits = build_head(features, cfg.model.head, num_labels)
    return tf.keras.Model(inputs, logits, name="medtl_classifier")


def get_base(model: tf.keras.Model) -> tf.keras.Model:
    return model.get_layer("backbone")
