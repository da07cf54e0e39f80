"""Multi-label losses on logits for imbalanced findings.

Each returns per-label losses, shape (batch, num_labels), so that the label mask,
passed by the input pipeline as Keras' sample_weight with the same shape, zeroes
uncertain or missing labels. Keras then averages over all entries.
"""
from __future__ import annotations

import numpy as np

from medtl.config import LossConfig
from medtl.data.manifest import Manifest
from medtl.errors import MedtlError
from medtl.tf import tf


def _logs(y_pred):
    """(log p, log (1 - p), p) from logits, computed stably."""
    logits = tf.cast(y_pred, tf.float32)
    return tf.math.log_sigmoid(logits), tf.math.log_sigmoid(-logits), tf.sigmoid(logits)


@tf.keras.utils.register_keras_serializable(package="medtl")
class MaskedBCE(tf.keras.losses.Loss):
    """Binary cross-entropy: -[w y log p + (1 - y) log(1 - p)], with w = 1 or per-label positive weights."""

    def __init__(self, pos_weight=None, name: str = "bce", **kwargs):
        super().__init__(name=name, **kwargs)
        self.pos_weight = None if pos_weight is None else [float(w) for w in pos_weight]

    def call(self, y_true, y_pred):  # (batch, L) labels, (batch, L) logits -> (batch, L)
        y = tf.cast(y_true, tf.float32)
        log_p, log_not_p, _ = _logs(y_pred)
        positive = y * log_p
        if self.pos_weight is not None:
            positive = positive * tf.constant(self.pos_weight, tf.float32)
        return -(positive + (1.0 - y) * log_not_p)

    def get_config(self):
        return {**super().get_config(), "pos_weight": self.pos_weight}


@tf.keras.utils.register_keras_serializable(package="medtl")
class FocalLoss(tf.keras.losses.Loss):
    """Focal loss (Lin et al., 2017): -alpha_t (1 - p_t)^gamma log p_t; alpha < 0 disables alpha."""

    def __init__(self, gamma: float = 2.0, alpha: float = -1.0, name: str = "focal", **kwargs):
        super().__init__(name=name, **kwargs)
        self.gamma, self.alpha = float(gamma), float(alpha)

    def call(self, y_true, y_pred):
        y = tf.cast(y_true, tf.float32)
        log_p, log_not_p, p = _logs(y_pred)
        positive = -y * tf.pow(1.0 - p, self.gamma) * log_p
        negative = -(1.0 - y) * tf.pow(p, self.gamma) * log_not_p
        if self.alpha >= 0:
            positive, negative = self.alpha * positive, (1.0 - self.alpha) * negative
        return positive + negative

    def get_config(self):
        return {**super().get_config(), "gamma": self.gamma, "alpha": self.alpha}


@tf.keras.utils.register_keras_serializable(package="medtl")
class AsymmetricLoss(tf.keras.losses.Loss):
    """Asymmetric loss (Ridnik et al., 2021): positives -(1 - p)^g+ log p; negatives, with the
    shifted probability p_m = max(p - clip, 0), -p_m^g- log(1 - p_m)."""

    def __init__(self, gamma_pos: float = 0.0, gamma_neg: float = 4.0, clip: float = 0.05, name: str = "asl",
                 **kwargs):
        super().__init__(name=name, **kwargs)
        self.gamma_pos, self.gamma_neg, self.clip = float(gamma_pos), float(gamma_neg), float(clip)

    def call(self, y_true, y_pred):
        y = tf.cast(y_true, tf.float32)
        log_p, log_not_p, p = _logs(y_pred)
        positive = -y * tf.pow(1.0 - p, self.gamma_pos) * log_p
        if self.clip > 0:
            p_m = tf.maximum(p - self.clip, 0.0)
            log_not_pm = tf.math.log(tf.clip_by_value(1.0 - p_m, 1e-8, 1.0))
        else:
            p_m, log_not_pm = p, log_not_p
        negative = -(1.0 - y) * tf.pow(p_m, self.gamma_neg) * log_not_pm
        return positive + negative

    def get_config(self):
        return {**super().get_config(), "gamma_pos": self.gamma_pos, "gamma_neg": self.gamma_neg, "clip": self.clip}


def positive_weights(manifest: Manifest, max_weight: float) -> np.ndarray:
    """(num_labels,) (1 - p) / p from the train split's prevalence over known labels, capped."""
    train = manifest.splits["train"]
    weights = []
    for name in manifest.labels:
        p = train.prevalence.get(name)
        if not p:
            raise MedtlError(f"label {name!r} has no positives in the train split; weighted_bce cannot weight it. "
                             "Use loss bce/focal/asl or re-ingest with more data")
        weights.append(min((1.0 - p) / p, max_weight))
    return np.array(weights, np.float32)


def build_loss(cfg: LossConfig, manifest: Manifest | None = None) -> tf.keras.losses.Loss:
    if cfg.name == "bce":
        return MaskedBCE()
    if cfg.name == "weighted_bce":
        if manifest is None:
            raise MedtlError("weighted_bce needs the data manifest for the label prevalence")
        return MaskedBCE(pos_weight=positive_weights(manifest, cfg.max_pos_weight), name="weighted_bce")
    if cfg.name == "focal":
        return FocalLoss(cfg.gamma, cfg.alpha)
    return AsymmetricLoss(cfg.gamma_pos, cfg.gamma_neg, cfg.clip)
