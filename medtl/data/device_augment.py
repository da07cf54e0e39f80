"""The augmentation policy as batched TensorFlow ops, for `data.augment_on: device`: the training step runs
it on the accelerator, so the input pipeline's CPU cores only read, parse and batch (docs/training.md,
Augmentation on the device).

Each transform reads its arguments from albumentations' own object for the policy entry (so the ranges are
albumentations' after its validation and normalisation) and draws its values per image from stateless
random ops seeded by (seed, step): a step's augmentation does not depend on which device or thread runs it.
Images are (batch, size, size, 1) float32 in [0, 255]; each transform ends clipped to [0, 255], like
albumentations' uint8 arithmetic (without its rounding to integers).

Supported: HorizontalFlip, Affine (rotate, scale, translate_percent, keep_ratio; bilinear, constant 0
border, as albumentations' defaults), RandomBrightnessContrast, RandomGamma, GaussNoise and CLAHE (OpenCV's
algorithm: tile histograms clipped and redistributed, lookup tables interpolated bilinearly between tile
centres). Other transforms, or other arguments, are refused when the config is loaded
(medtl.data.policy.check_device_policy, which needs no TensorFlow).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from medtl.data.policy import TransformLike, instantiate

# One random algorithm on every device (auto_select may differ under XLA or on another device).
ALG = "philox"
def _uniform(seed, shape, low, high):
    from medtl.tf import tf

    return tf.random.stateless_uniform(shape, seed, minval=float(low), maxval=float(high), dtype=tf.float32, alg=ALG)


def _applied(seed, batch, p: float):
    """(batch, 1, 1, 1) bool: which images the transform applies to."""
    from medtl.tf import tf

    return tf.reshape(tf.random.stateless_uniform([batch], seed, alg=ALG) < float(p), (-1, 1, 1, 1))


def _flip(images, seed, batch, t):
    from medtl.tf import tf

    return tf.where(_applied(seed, batch, t.p), tf.reverse(images, axis=[2]), images)


def _affine(images, seed, batch, t):
    """Forward map: translate . centre . rotate . scale . uncentre; ImageProjectiveTransformV3 takes its inverse
    (output pixel -> input pixel)."""
    from medtl.tf import tf

    height, width = int(images.shape[1]), int(images.shape[2])
    s = tf.random.experimental.stateless_split(seed, 6, alg=ALG)
    angle = _uniform(s[0], [batch], *t.rotate) * (math.pi / 180.0)
    sx = _uniform(s[1], [batch], *t.scale["x"])
    sy = sx if t.keep_ratio else _uniform(s[2], [batch], *t.scale["y"])
    shift = t.translate_percent or {"x": (0.0, 0.0), "y": (0.0, 0.0)}  # None: not given, no translation
    tx = _uniform(s[3], [batch], *shift["x"]) * width
    ty = _uniform(s[4], [batch], *shift["y"]) * height
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    cos, sin = tf.cos(angle), tf.sin(angle)
    # Forward linear part A = R(angle) S(sx, sy), albumentations' rotation matrix [[cos, sin], [-sin, cos]];
    # offset b = c + t - A c.
    a00, a01, a10, a11 = cos * sx, sin * sy, -sin * sx, cos * sy
    b0 = cx + tx - (a00 * cx + a01 * cy)
    b1 = cy + ty - (a10 * cx + a11 * cy)
    det = a00 * a11 - a01 * a10
    i00, i01, i10, i11 = a11 / det, -a01 / det, -a10 / det, a00 / det
    j0, j1 = -(i00 * b0 + i01 * b1), -(i10 * b0 + i11 * b1)
    zeros = tf.zeros_like(angle)
    transforms = tf.stack([i00, i01, j0, i10, i11, j1, zeros, zeros], axis=1)
    warped = tf.raw_ops.ImageProjectiveTransformV3(images=images, transforms=transforms,
                                                    output_shape=tf.constant([height, width], tf.int32),
                                                    fill_value=tf.constant(0.0), interpolation="BILINEAR",
                                                    fill_mode="CONSTANT")
    return tf.where(_applied(s[5], batch, t.p), tf.clip_by_value(warped, 0.0, 255.0), images)


def _brightness_contrast(images, seed, batch, t):
    from medtl.tf import tf

    s = tf.random.experimental.stateless_split(seed, 3, alg=ALG)
    alpha = tf.reshape(1.0 + _uniform(s[0], [batch], *t.contrast_limit), (-1, 1, 1, 1))
    beta = tf.reshape(_uniform(s[1], [batch], *t.brightness_limit), (-1, 1, 1, 1))
    offset = beta * 255.0 if t.brightness_by_max else beta * tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
    out = tf.clip_by_value(images * alpha + offset, 0.0, 255.0)
    return tf.where(_applied(s[2], batch, t.p), out, images)


def _gamma(images, seed, batch, t):
    from medtl.tf import tf

    s = tf.random.experimental.stateless_split(seed, 2, alg=ALG)
    low, high = t.gamma_limit
    gamma = tf.reshape(_uniform(s[0], [batch], low / 100.0, high / 100.0), (-1, 1, 1, 1))
    out = 255.0 * tf.pow(images / 255.0, gamma)
    return tf.where(_applied(s[1], batch, t.p), out, images)


def _noise(images, seed, batch, t):
    from medtl.tf import tf

    s = tf.random.experimental.stateless_split(seed, 4, alg=ALG)
    std = tf.reshape(_uniform(s[0], [batch], *t.std_range) * 255.0, (-1, 1, 1, 1))
    mean = tf.reshape(_uniform(s[1], [batch], *t.mean_range) * 255.0, (-1, 1, 1, 1))
    noise = tf.random.stateless_normal(tf.shape(images), s[2], alg=ALG) * std + mean
    out = tf.clip_by_value(images + noise, 0.0, 255.0)
    return tf.where(_applied(s[3], batch, t.p), out, images)


def tile_histograms(tiles, deterministic: bool):
    """(n, pixels) float32 levels in 0..255 -> (n, 256) int32 counts. bincount (of tile index * 256 + level) is
    the fast way, but TensorFlow refuses it on a GPU under op determinism (data.deterministic); then the
    counts come from where each level starts in each tile's sorted levels."""
    from medtl.tf import tf

    n = tf.shape(tiles)[0]
    if deterministic:
        ordered = tf.cast(tf.sort(tiles, axis=-1), tf.int32)
        starts = tf.searchsorted(ordered, tf.tile(tf.range(257)[None], [n, 1]), side="left")
        return starts[:, 1:] - starts[:, :-1]
    ids = tf.cast(tiles, tf.int32) + tf.range(n)[:, None] * 256
    counts = tf.math.bincount(tf.reshape(ids, [-1]), minlength=n * 256, maxlength=n * 256)
    return tf.reshape(counts, (n, 256))


def clahe(images, clip_limits, tile_grid_size: tuple[int, int], deterministic: bool = False):
    """OpenCV's CLAHE on (batch, h, w, 1) float32 [0, 255] images (rounded to 8-bit levels for the
    histograms, as OpenCV's 8-bit CLAHE sees them), one clip limit per image: (batch, h, w, 1) float32.
    `deterministic` (TensorFlow's op determinism is on) counts the histograms without bincount."""
    from medtl.tf import tf

    batch = tf.shape(images)[0]
    height, width = int(images.shape[1]), int(images.shape[2])
    tiles_y, tiles_x = int(tile_grid_size[1]), int(tile_grid_size[0])
    finite = tf.math.is_finite(images)
    # (b, h, w) 8-bit levels as float32; a non-finite pixel counts as 0 here and is given back unchanged at the
    # end, so that the training step's check still sees it (and no NaN becomes an index).
    rounded = tf.clip_by_value(tf.round(tf.where(finite, images, 0.0)[..., 0]), 0.0, 255.0)
    levels = tf.cast(rounded, tf.int32)
    # OpenCV pads both sides by a whole remainder tile as soon as either side is not a multiple of its tiles.
    pad = height % tiles_y or width % tiles_x
    pad_y, pad_x = (tiles_y - height % tiles_y, tiles_x - width % tiles_x) if pad else (0, 0)
    padded = tf.pad(rounded, [[0, 0], [0, pad_y], [0, pad_x]], mode="REFLECT") if pad else rounded
    tile_h, tile_w = (height + pad_y) // tiles_y, (width + pad_x) // tiles_x
    area = tile_h * tile_w
    # The tiles are cut in float32: oneDNN's int32 transpose needs AVX-512 and logs an error line on other CPUs.
    tiled = tf.reshape(padded, (batch, tiles_y, tile_h, tiles_x, tile_w))
    tiled = tf.reshape(tf.transpose(tiled, (0, 1, 3, 2, 4)), (batch * tiles_y * tiles_x, area))
    hist = tf.reshape(tile_histograms(tiled, deterministic), (batch, tiles_y * tiles_x, 256))
    # OpenCV: clip = max(int(clipLimit * area / 256), 1); the excess is spread evenly, the remainder one
    # count at a time every 256 / remainder bins.
    clip = tf.maximum(tf.cast(clip_limits * area / 256.0, tf.int32), 1)[:, None, None]
    excess = tf.reduce_sum(tf.maximum(hist - clip, 0), axis=-1, keepdims=True)
    hist = tf.minimum(hist, clip) + excess // 256
    residual = excess % 256
    step = tf.maximum(256 // tf.maximum(residual, 1), 1)
    bins = tf.range(256)[None, None, :]
    hist += tf.cast(tf.logical_and(bins % step == 0, bins // step < residual), tf.int32)
    lut = tf.cast(tf.cumsum(hist, axis=-1), tf.float32) * (255.0 / area)
    lut = tf.clip_by_value(tf.round(lut), 0.0, 255.0)  # (b, tiles, 256): OpenCV's saturate_cast<uchar>
    lut = tf.reshape(lut, (batch, tiles_y, tiles_x, 256))
    # Each pixel: the four nearest tiles' mappings, weighted bilinearly by the distance to their centres.
    ty = tf.range(height, dtype=tf.float32) / tile_h - 0.5
    tx = tf.range(width, dtype=tf.float32) / tile_w - 0.5
    y1, x1 = tf.floor(ty), tf.floor(tx)
    wy, wx = ty - y1, tx - x1
    y1, x1 = tf.cast(y1, tf.int32), tf.cast(x1, tf.int32)
    y2, x2 = tf.minimum(y1 + 1, tiles_y - 1), tf.minimum(x1 + 1, tiles_x - 1)
    y1, x1 = tf.maximum(y1, 0), tf.maximum(x1, 0)

    def mapped(rows, cols):
        index = (rows[:, None] * tiles_x + cols[None, :]) * 256  # (h, w)
        flat = tf.reshape(lut, (batch, tiles_y * tiles_x * 256))
        return tf.gather(flat, index[None] + levels, batch_dims=1)

    top = mapped(y1, x1) * (1.0 - wx)[None, None, :] + mapped(y1, x2) * wx[None, None, :]
    bottom = mapped(y2, x1) * (1.0 - wx)[None, None, :] + mapped(y2, x2) * wx[None, None, :]
    out = top * (1.0 - wy)[None, :, None] + bottom * wy[None, :, None]
    return tf.where(finite, tf.round(out)[..., None], images)


def _clahe(images, seed, batch, t, deterministic: bool):
    from medtl.tf import tf

    s = tf.random.experimental.stateless_split(seed, 2, alg=ALG)
    applied = _applied(s[1], batch, t.p)
    limits = _uniform(s[0], [batch], *t.clip_limit)
    return tf.where(applied, clahe(images, limits, t.tile_grid_size, deterministic), images)


_APPLY: dict[str, Callable] = {"HorizontalFlip": _flip, "Affine": _affine,
                               "RandomBrightnessContrast": _brightness_contrast, "RandomGamma": _gamma,
                               "GaussNoise": _noise, "CLAHE": _clahe}  # CLAHE also takes `deterministic`


def build_device_augment(policy: Sequence[TransformLike], seed: int, deterministic: bool = False) -> Callable:
    """augment(images (b, h, w, 1) float32 in [0, 255], step int64) -> augmented images: the policy's transforms
    in order, image by image applied with their p, seeded by (seed, step). `deterministic`: only ops TensorFlow
    runs deterministically on a GPU under op determinism (data.deterministic)."""
    from medtl.tf import tf

    transforms: list[tuple[str, Any]] = [(t.name, instantiate(t)) for t in policy]
    base = tf.constant([int(seed) % (1 << 31), 0], tf.int64)

    def augment(images, step):
        batch = tf.shape(images)[0]
        seeds = tf.random.experimental.stateless_split(base + tf.stack([tf.constant(0, tf.int64),
                                                                        tf.cast(step, tf.int64)]),
                                                       max(len(transforms), 1), alg=ALG)
        for index, (name, t) in enumerate(transforms):
            if name == "CLAHE":
                images = _clahe(images, seeds[index], batch, t, deterministic)
            else:
                images = _APPLY[name](images, seeds[index], batch, t)
        return images

    return augment
