"""The augmentation policy's check against albumentations: names, arguments, one trial run; and what
data.augment_on: device can run (medtl.data.device_augment).

config.py calls it at load time, so a bad policy fails before any data is read. It imports
albumentations on first use and never TensorFlow or medtl.config (transforms are duck-typed:
`.name` and `.kwargs()`), so the config stays importable without either.
"""
from __future__ import annotations

import difflib
import warnings
from typing import Any, Protocol, Sequence


class TransformLike(Protocol):
    """What the check needs of medtl.config.Transform."""

    name: str

    def kwargs(self) -> dict[str, Any]: ...


def albumentations():
    import albumentations

    return albumentations


def transform_names() -> list[str]:
    """Every albumentations transform class a policy may name."""
    A = albumentations()
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


def instantiate(t: TransformLike, **override):
    """The albumentations object for `t`; unknown arguments are errors (strict), not warnings."""
    A = albumentations()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(A, t.name)(**{**t.kwargs(), **override}, strict=True)


def check_policy(policy: Sequence[TransformLike], image_size: int) -> list[tuple[str, str]]:
    """(key, message) for each transform that is unknown, has bad arguments, or cannot run on the
    training images (image_size x image_size, 8-bit, one channel) without changing their size."""
    import numpy as np

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
            instantiate(t)
            forced = instantiate(t, p=1.0)
        except (ValueError, TypeError) as exc:
            problems.append((key, f"{t.name}: bad arguments: {_describe(exc)}"))
            continue
        try:  # applied once now, so what would fail in the middle of training fails here
            out = albumentations().Compose([forced], seed=0)(image=probe)["image"]
        except Exception as exc:
            problems.append((key, f"{t.name} fails on a {image_size}x{image_size} 8-bit grayscale image: "
                                  f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
            continue
        if out.shape != probe.shape or out.dtype != np.uint8:
            problems.append((key, f"{t.name} turns a {image_size}x{image_size}x1 uint8 image into "
                                  f"{'x'.join(map(str, out.shape))} {out.dtype}; transforms must keep the size "
                                  "(images are resized to data.image_size before augmentation)"))
    return problems


# Transform -> the config arguments the device implementation honours (p everywhere).
DEVICE_TRANSFORMS: dict[str, frozenset[str]] = {
    "HorizontalFlip": frozenset({"p"}),
    "Affine": frozenset({"rotate", "scale", "translate_percent", "keep_ratio", "p"}),
    "RandomBrightnessContrast": frozenset({"brightness_limit", "contrast_limit", "brightness_by_max", "p"}),
    "RandomGamma": frozenset({"gamma_limit", "p"}),
    "GaussNoise": frozenset({"std_range", "mean_range", "p"}),
    "CLAHE": frozenset({"clip_limit", "tile_grid_size", "p"}),
}


def check_device_policy(policy: Sequence[TransformLike]) -> list[tuple[str, str]]:
    """(key, message) for each transform or argument data.augment_on: device cannot run."""
    problems = []
    for i, t in enumerate(policy):
        if t.name not in DEVICE_TRANSFORMS:
            problems.append((f"augment.{i}", f"{t.name} has no device implementation (data.augment_on: device runs "
                                             f"{', '.join(DEVICE_TRANSFORMS)}); remove it or use data.augment_on: cpu"))
            continue
        extra = sorted(set(t.kwargs()) - DEVICE_TRANSFORMS[t.name])
        if extra:
            problems.append((f"augment.{i}", f"{t.name}: argument(s) {', '.join(extra)} not supported on the device "
                                             f"(it takes {', '.join(sorted(DEVICE_TRANSFORMS[t.name]))}); remove them or use "
                                             "data.augment_on: cpu"))
    return problems
