"""Training augmentation: the config's albumentations policy, checked at load time and applied per batch.

Why per batch: one tf.numpy_function call per image cost about 0.6 ms of overhead on top of
the ~0.6 ms the default policy itself costs; one call per batch costs what a plain Python loop
does (docs/benchmarks.md). OpenCV releases the GIL inside each transform, so batches augment in
parallel on tf.data's threads.
"""
from __future__ import annotations

import difflib
import random
import threading
import warnings
from typing import Sequence

import numpy as np

from medtl.config import Transform
from medtl.tf import tf


def _albumentations():
    import albumentations

    return albumentations


def transform_names() -> list[str]:
    """Every albumentations transform class a policy may name."""
    A = _albumentations()
    return sorted(n for n in dir(A) if isinstance(getattr(A, n), type) and issubclass(getattr(A, n), A.BasicTransform)
                  and n != "BasicTransform" and not n.endswith("Transform"))


def _describe(exc: Exception) -> str:
    """One line from albumentations' (pydantic) validation error: argument, value, what is wrong."""
    cause = exc.__cause__
    if cause is None or not hasattr(cause, "errors"):
        return str(exc).splitlines()[0]
    values: dict[str, str] = {}
    messages: dict[str, list[str]] = {}
    for err in cause.errors():
        arg = str(err["loc"][0]) if err["loc"] else "arguments"
        values[arg] = "" if err["type"] == "missing" else f"={err.get('input')!r}"
        message = err["msg"].removeprefix("Value error, ") if err["type"] != "missing" else "is required"
        if message not in messages.setdefault(arg, []):
            messages[arg].append(message)
    return "; ".join(f"{arg}{values[arg]}: {' or '.join(m)}" for arg, m in messages.items())


def _instantiate(t: Transform, **override):
    """The albumentations object for `t`; unknown arguments are errors (strict), not warnings."""
    A = _albumentations()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(A, t.name)(**{**t.kwargs(), **override}, strict=True)


def check_policy(policy: Sequence[Transform], image_size: int) -> list[tuple[str, str]]:
    """(key, message) for each transform that is unknown, has bad arguments, or cannot run on the
    training images (image_size x image_size, 8-bit, one channel) without changing their size."""
    names = transform_names()
    probe = np.random.default_rng(0).integers(0, 256, (image_size, image_size, 1), dtype=np.uint8)
    problems = []
    for i, t in enumerate(policy):
        key = f"augment.{i}"
        if t.name not in names:
            close = difflib.get_close_matches(t.name, names, n=1) or [n for n in names if n.lower() == t.name.lower()]
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append((key, f"names unknown transform {t.name!r}{hint}; use an albumentations 2.0.8 "
                                  f"transform class, e.g. {', '.join(n for n in ('Affine', 'CLAHE', 'RandomGamma'))}"))
            continue
        try:
            _instantiate(t)
            forced = _instantiate(t, p=1.0)
        except (ValueError, TypeError) as exc:
            problems.append((key, f"{t.name}: bad arguments: {_describe(exc)}"))
            continue
        try:  # applied once now, so what would fail in the middle of training fails here
            out = _albumentations().Compose([forced], seed=0)(image=probe)["image"]
        except Exception as exc:
            problems.append((key, f"{t.name} fails on a {image_size}x{image_size} 8-bit grayscale image: "
                                  f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
            continue
        if out.shape != probe.shape or out.dtype != np.uint8:
            problems.append((key, f"{t.name} turns a {image_size}x{image_size}x1 uint8 image into "
                                  f"{'x'.join(map(str, out.shape))} {out.dtype}; transforms must keep the size "
                                  "(images are resized to data.image_size before augmentation)"))
    return problems


def build_compose(policy: Sequence[Transform]):
    return _albumentations().Compose([_instantiate(t) for t in policy], p=1.0)


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
