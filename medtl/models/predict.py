"""Batch inference over a split: each rank predicts its shards, rank-order gather on all ranks.

Every record is counted once: the gathered count must equal the manifest's, and
no record key may appear twice.
"""
from __future__ import annotations

import weakref

import numpy as np

from medtl import dist
from medtl.config import Config
from medtl.data.manifest import Manifest
from medtl.data.pipeline import build_dataset, build_sample_dataset, pipeline_errors, records_in, sample_size
from medtl.errors import RunFailure
from medtl.tf import tf

# Salted hashes are hex strings of 20 characters (medtl.data.deid); gathered as fixed-width bytes.
ID_WIDTH = 32


def predict_split(model, cfg: Config, manifest: Manifest, split: str, ctx: dist.Context, tta: str = "none",
                  with_ids: bool = False, logits: bool = False, sample: int = 0) -> dict[str, np.ndarray]:
    """{'probs', 'labels', 'mask'}: (n, L) arrays for every record of `split`, checked against the manifest.

    `model` is a Keras model (logits) or a callable from images to probabilities (an exported model).
    with_ids adds 'patient' and 'key': (n,) salted hashes, to pair records across reports.
    logits (a Keras model, no TTA) adds 'logits', for the training loss on them. sample > 0 predicts the
    fixed sample of that many records instead (pipeline.build_sample_dataset; not with with_ids).
    """
    if sample:
        ds = build_sample_dataset(cfg, manifest, split, sample, ctx.rank, ctx.size)
    else:
        ds = build_dataset(cfg, split, ctx.rank, ctx.size, manifest, training=False, with_ids=with_ids)
    predict_fn = build_predict_fn(model, tta, logits)
    parts: dict[str, list] = {"probs": [], "labels": [], "mask": [], "patient": [], "key": [], "logits": []}
    with pipeline_errors():
        for batch in ds:
            images, y, mask = batch[:3]
            out = predict_fn(images)
            if logits:
                parts["logits"].append(out.numpy())
                out = tf.sigmoid(out)
            parts["probs"].append(out.numpy())
            parts["labels"].append(y.numpy())
            parts["mask"].append(mask.numpy())
            if with_ids:
                parts["patient"].append(_encode_ids(batch[3].numpy()))
                parts["key"].append(_encode_ids(batch[4].numpy()))
    num_labels = manifest.num_labels
    empty = {"probs": (0, num_labels), "labels": (0, num_labels), "mask": (0, num_labels),
             "patient": (0, ID_WIDTH), "key": (0, ID_WIDTH), "logits": (0, num_labels)}
    keys = ("probs", "labels", "mask") + (("patient", "key") if with_ids else ()) + (("logits",) if logits else ())
    local = {k: np.concatenate(parts[k]) if parts[k] else
             np.zeros(empty[k], np.uint8 if k in ("patient", "key") else np.float32) for k in keys}
    name = f"{split}_sample" if sample else split
    out = {k: dist.allgather(ctx, v, f"{name}_{k}") for k, v in local.items()}
    expected = sample_size(cfg, manifest, split, sample) if sample else records_in(cfg, manifest, split)
    _check_complete(out, expected, split, cfg.data.records)
    for k in ("patient", "key"):
        if k in out:
            out[k] = _decode_ids(out[k])
    if with_ids and len(set(out["key"])) != len(out["key"]):
        raise RunFailure(f"split {split!r} holds the same record key more than once; re-run `medtl ingest`")
    return out


def _check_complete(out: dict, expected: int, split: str, records: str) -> None:
    if len(out["probs"]) != expected:
        raise RunFailure(
            f"read {len(out['probs'])} records of split {split!r} but the manifest lists {expected}; "
            f"run `medtl verify {records}`"
        )


def _encode_ids(values: np.ndarray) -> np.ndarray:
    """(n,) bytes -> (n, ID_WIDTH) uint8, so Horovod can gather them (it has no string tensors)."""
    out = np.zeros((len(values), ID_WIDTH), np.uint8)
    for i, v in enumerate(values):
        raw = np.frombuffer(bytes(v)[:ID_WIDTH], np.uint8)
        out[i, :len(raw)] = raw
    return out


def _decode_ids(array: np.ndarray) -> np.ndarray:
    return np.array([bytes(row).rstrip(b"\0").decode("ascii") for row in array], dtype=f"<U{ID_WIDTH}")


_PREDICT_FNS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def build_predict_fn(model, tta: str = "none", logits: bool = False):
    """images (batch, size, size, c) in [0, 255] -> (batch, L) float32 probabilities (logits: the Keras
    model's float32 logits, no TTA).

    tta='flip' averages the probabilities of each image and its left-right mirror.
    A Keras model's tf.function is cached on it, so per-epoch validation does not retrace.
    """
    # Kept beside the model, not on it: a dict attribute would be tracked and break SavedModel export.
    cache = _PREDICT_FNS.setdefault(model, {}) if isinstance(model, tf.keras.Model) else {}
    if (tta, logits) not in cache:
        cache[(tta, logits)] = _make_predict_fn(model, tta, logits)
    return cache[(tta, logits)]


def _make_predict_fn(model, tta: str, logits: bool = False):
    is_keras = isinstance(model, tf.keras.Model)
    if logits:
        if not is_keras or tta != "none":
            raise ValueError("logits are for a Keras model without TTA")
        return _any_batch_size(tf.function(lambda images: tf.cast(model(images, training=False), tf.float32)))

    def probabilities(images):
        if is_keras:
            return tf.sigmoid(tf.cast(model(images, training=False), tf.float32))
        return model(images)

    @tf.function
    def fn(images):
        probs = probabilities(images)  # (batch, L)
        if tta == "flip":
            probs = (probs + probabilities(tf.image.flip_left_right(images))) / 2.0
        return probs

    return _any_batch_size(fn)


def _any_batch_size(fn):
    """`fn` (a tf.function of images), traced once for any batch size of the images it is first called with.
    A split's last, smaller batch then reuses that trace; reduce_retracing would trace the model a second
    time (about a second for EfficientNetB0 on 2 cores, in every evaluation and training run)."""
    traced = set()

    def call(images):
        kind = (tuple(images.shape[1:]), images.dtype)
        if kind not in traced:
            fn.get_concrete_function(tf.TensorSpec((None, *kind[0]), kind[1]))
            traced.add(kind)
        return fn(images)

    return call
