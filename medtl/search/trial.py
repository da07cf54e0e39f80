"""One head trial: train a head for some epochs and score it by val macro AUROC after each epoch.

The same loop runs on cached features (`medtl search`) and, for `medtl bench search`, on images
through the frozen base, so the two cost the same work but the base's forward pass.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Callable, Iterator

import numpy as np

from medtl.config import Config
from medtl.data.manifest import Manifest
from medtl.models.build import set_batchnorm_momentum
from medtl.models.heads import build_head
from medtl.models.metrics import ranking_metrics
from medtl.search.cache import SplitFeatures
from medtl.search.space import Head
from medtl.tf import tf

VAL_CHUNK = 512


def head_seed(seed: int, head: Head) -> int:
    """Initialisation and shuffling depend on the head, not on when its trial runs."""
    digest = hashlib.sha256(f"{seed}:{head.key()}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def macro_auroc(labels: np.ndarray, probs: np.ndarray, mask: np.ndarray) -> float:
    """Mean AUROC over labels with both classes among known entries (NaN if none has)."""
    values = []
    for i in range(labels.shape[1]):
        known = mask[:, i] > 0
        auroc, _ = ranking_metrics(labels[known, i], probs[known, i])
        if auroc is not None:
            values.append(auroc)
    return float(np.mean(values)) if values else math.nan


def build_trial_model(feature_shape, head: Head, num_labels: int, pooled: bool,
                      batchnorm_momentum: float = -1.0) -> tf.keras.Model:
    """The head alone on cached features; its BatchNorm layers get model.batchnorm_momentum, as in build_model."""
    inputs = tf.keras.Input(tuple(feature_shape), name="features")
    # (batch, c) pooled by the cache as the head's first layer would, or (batch, h, w, c) -> (batch, L)
    logits = build_head(inputs, head.head, num_labels, pooled=pooled)
    model = tf.keras.Model(inputs, logits, name="head_trial")
    if batchnorm_momentum >= 0:
        set_batchnorm_momentum(model, batchnorm_momentum)
    return model


def build_train_step(model: tf.keras.Model, loss_fn, optimizer):
    @tf.function
    def train_step(x, y, mask):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = loss_fn(y, logits, sample_weight=mask)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return train_step


def run_epochs(model, cfg: Config, head: Head, manifest: Manifest, steps_per_epoch: int, epochs: int,
               batches: Callable[[int], Iterator], val_probs: Callable[[], tuple],
               on_epoch: Callable[[int, float], bool]) -> list[float]:
    """Train `model` (its trainable part) for up to `epochs`; after each, on_epoch(epoch, val AUROC)
    returns False to stop. batches(epoch) yields (x, labels, mask); val_probs() -> (labels, probs, mask)."""
    from medtl.models.losses import build_loss
    from medtl.train.loop import build_optimizer

    phase = cfg.phases[0]
    optimizer = build_optimizer(phase, head.learning_rate, steps_per_epoch)
    loss_fn = build_loss(dataclasses.replace(cfg.train.loss, name=head.loss), manifest)
    step = build_train_step(model, loss_fn, optimizer)
    history = []
    for epoch in range(epochs):
        for x, y, mask in batches(epoch):
            step(x, y, mask)
        labels, probs, mask = val_probs()
        history.append(macro_auroc(labels, probs, mask))
        if not on_epoch(epoch + 1, history[-1]):
            break
    return history


def train_on_cache(cfg: Config, head: Head, manifest: Manifest, train: SplitFeatures, val: SplitFeatures,
                   feature_shape, pooled: bool, epochs: int, on_epoch: Callable[[int, float], bool]) -> list[float]:
    """A head trial on cached features: epoch e trains on copy e mod (1 + augmented copies)."""
    seed = head_seed(cfg.seed, head)
    tf.keras.utils.set_random_seed(seed)
    key = head.head.pooled_start() if pooled else "maps"
    model = build_trial_model(feature_shape, head, manifest.num_labels, pooled, cfg.model.batchnorm_momentum)
    n = len(train.labels)
    batch_size = min(cfg.train.batch_size, n)
    steps = n // batch_size
    copies = sorted(train.features)

    def batches(epoch):
        x_all = train.features[copies[epoch % len(copies)]][key]
        order = np.random.default_rng((seed, epoch)).permutation(n)
        for s in range(steps):
            idx = np.sort(order[s * batch_size:(s + 1) * batch_size])
            yield x_all[idx], train.labels[idx], train.mask[idx]

    x_val = val.features[0][key]

    def val_probs():
        logits = [model(x_val[i:i + VAL_CHUNK], training=False).numpy() for i in range(0, len(x_val), VAL_CHUNK)]
        return val.labels, 1.0 / (1.0 + np.exp(-np.concatenate(logits))), val.mask

    return run_epochs(model, cfg, head, manifest, steps, epochs, batches, val_probs, on_epoch)


def train_with_base(cfg: Config, head: Head, manifest: Manifest, epochs: int,
                    on_epoch: Callable[[int, float], bool]) -> list[float]:
    """The same trial with the frozen base run on the images every epoch (no augmentation)."""
    from medtl.data.pipeline import build_dataset, records_in
    from medtl.models.build import build_model
    from medtl.search.space import with_head
    from medtl.train.phases import apply_phase

    cfg = dataclasses.replace(with_head(cfg, head), data=dataclasses.replace(cfg.data, augment=(), augment_on="cpu"))
    tf.keras.utils.set_random_seed(head_seed(cfg.seed, head))
    model = build_model(cfg, manifest.num_labels)
    apply_phase(model, cfg, cfg.phases[0])  # base frozen, BatchNorm in inference mode
    steps = records_in(cfg, manifest, "train") // cfg.train.batch_size
    train_ds = iter(build_dataset(cfg, "train", manifest=manifest, training=True))
    val_ds = build_dataset(cfg, "val", manifest=manifest, training=False)

    def batches(epoch):
        for _ in range(steps):
            yield next(train_ds)

    def val_probs():
        labels, probs, masks = [], [], []
        for images, y, mask in val_ds:
            probs.append(tf.sigmoid(model(images, training=False)).numpy())
            labels.append(y.numpy())
            masks.append(mask.numpy())
        return np.concatenate(labels), np.concatenate(probs), np.concatenate(masks)

    return run_epochs(model, cfg, head, manifest, steps, epochs, batches, val_probs, on_epoch)
