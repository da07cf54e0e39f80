"""Batch inference over a split: each rank predicts its shards, rank-order gather on all ranks."""
from __future__ import annotations

import numpy as np

from medtl import dist
from medtl.config import Config
from medtl.data.pipeline import build_dataset, split_size
from medtl.errors import MedtlError
from medtl.tf import tf


def predict_split(model: tf.keras.Model, cfg: Config, manifest: dict, split: str,
                  ctx: dist.Context) -> dict[str, np.ndarray]:
    """{'probs', 'labels', 'mask'}: (n, L) arrays for every record of `split`, checked against the manifest."""
    ds = build_dataset(cfg, split, ctx.rank, ctx.size, manifest, training=False)
    probs, labels, masks = [], [], []
    predict_fn = _predict_fn(model)
    for images, y, mask in ds:
        probs.append(predict_fn(images).numpy())
        labels.append(y.numpy())
        masks.append(mask.numpy())
    num_labels = len(manifest["labels"])
    local = {
        "probs": np.concatenate(probs) if probs else np.zeros((0, num_labels), np.float32),
        "labels": np.concatenate(labels) if labels else np.zeros((0, num_labels), np.float32),
        "mask": np.concatenate(masks) if masks else np.zeros((0, num_labels), np.float32),
    }
    out = {k: dist.allgather(ctx, v) for k, v in local.items()}
    expected = split_size(manifest, split)
    if len(out["probs"]) != expected:
        raise MedtlError(
            f"read {len(out['probs'])} records of split {split!r} but the manifest lists {expected}; "
            f"run `medtl verify {cfg.data.records}`"
        )
    return out


def _predict_fn(model):
    @tf.function(reduce_retracing=True)
    def fn(images):  # (batch, size, size, c) -> (batch, L) probabilities
        return tf.sigmoid(tf.cast(model(images, training=False), tf.float32))

    cache = getattr(model, "_medtl_predict_fn", None)
    if cache is None:
        model._medtl_predict_fn = fn
        cache = fn
    return cache
