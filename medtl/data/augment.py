"""Training augmentation: the config's albumentations policy applied per batch (checked at config load
by medtl.data.policy).

Why per batch: one tf.numpy_function call per image cost about 0.6 ms of overhead on top of
the ~0.6 ms the default policy itself costs; one call per batch costs what a plain Python loop
does (docs/benchmarks.md). OpenCV releases the GIL inside each transform, so batches augment in
parallel on tf.data's threads.
"""
from __future__ import annotations

import random
import threading
from typing import Sequence

import numpy as np

from medtl.config import Transform
from medtl.data.policy import albumentations, check_policy, instantiate  # noqa: F401  (check_policy: re-exported)
from medtl.tf import tf


def build_compose(policy: Sequence[Transform]):
    return albumentations().Compose([instantiate(t) for t in policy], p=1.0)


class BatchAugmenter:
    """Applies the policy to each image of a batch. Image i is augmented with a generator seeded by
    (seed_parts..., indices[i]), so the result depends on the image's stream position, not on
    which tf.data thread runs it or when."""

    def __init__(self, policy: Sequence[Transform], seed_parts: Sequence[int]):
        self.policy = tuple(policy)
        self.seed_parts = tuple(int(s) for s in seed_parts)
        self._local = threading.local()  # one Compose per thread: its random state is set per image

    def _compose(self):
        compose = getattr(self._local, "compose", None)
        if compose is None:
            compose = self._local.compose = build_compose(self.policy)
        return compose

    def __call__(self, images: np.ndarray, indices: np.ndarray) -> np.ndarray:
        # images (batch, size, size, 1) uint8; indices (batch,) int64 stream positions
        compose = self._compose()
        out = np.empty_like(images)
        for i, index in enumerate(indices):
            rng = np.random.default_rng((*self.seed_parts, int(index)))
            compose.set_random_state(rng, random.Random(int(rng.integers(1 << 62))))
            out[i] = compose(image=images[i])["image"]
        return out


def build_augment_fn(policy: Sequence[Transform], seed_parts: Sequence[int]):
    """A tf.data map function over batches of (indices, (images uint8, labels, mask))."""
    augmenter = BatchAugmenter(policy, seed_parts)

    def augment_fn(indices, batch):
        images, labels, mask = batch  # (batch, size, size, 1) uint8
        out = tf.numpy_function(augmenter, [images, indices], tf.uint8, stateful=False, name="augment")
        return tf.ensure_shape(out, images.shape), labels, mask

    return augment_fn


def build_views_fn(policy: Sequence[Transform], seed_parts: Sequence[int]):
    """A tf.data map function over batches of (indices, images uint8 (n, size, size, 1)) -> (2n, size, size, 1):
    every image augmented twice by `policy`, independently (self-supervised views a, then views b)."""
    view_a = BatchAugmenter(policy, (*seed_parts, 0))
    view_b = BatchAugmenter(policy, (*seed_parts, 1))

    def two_views(images: np.ndarray, indices: np.ndarray) -> np.ndarray:
        return np.concatenate([view_a(images, indices), view_b(images, indices)], axis=0)

    def views_fn(indices, images):
        out = tf.numpy_function(two_views, [images, indices], tf.uint8, stateful=False, name="views")
        return tf.ensure_shape(out, [2 * images.shape[0], *images.shape[1:]])

    return views_fn
