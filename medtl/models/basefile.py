"""The pretrained base, `medtl pretrain`'s output: a backbone weights file (include_top=False layout, what
`model.weights: PATH` loads) and its JSON sidecar `<file>.json`. This module alone reads and writes both.

The sidecar says what the base was pretrained as and on (a manifest digest, never an identifier), so a job
that builds another backbone or channel count is refused before any training starts.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields

import medtl
from medtl.errors import MedtlError
from medtl.utils import fs
from medtl.utils.log import warning

SIDECAR_SUFFIX = ".json"


@dataclass(frozen=True)
class BaseMeta:
    """What a base weights file holds (its sidecar)."""

    # The tf.keras.applications backbone name the weights fit.
    backbone: str
    # Input side (pixels) and channels it was pretrained at; conv bases run at other sizes too.
    image_size: int
    channels: int
    # The pretraining method (pretrain.method), and the epochs trained over all phases.
    method: str
    epochs: int
    # Manifest.digest() of the records it was pretrained on.
    records_digest: str
    medtl_version: str

    @classmethod
    def from_dict(cls, raw: dict, where: str) -> "BaseMeta":
        names = [f.name for f in fields(cls)]
        missing = [name for name in names if name not in raw]
        if missing:
            raise MedtlError(f"base sidecar {where} lacks {', '.join(missing)}; re-run `medtl pretrain`, or delete "
                             "the sidecar to load the weights unchecked")
        return cls(**{name: raw[name] for name in names})


def sidecar_path(weights: str) -> str:
    return weights + SIDECAR_SUFFIX


def read_meta(weights: str) -> BaseMeta | None:
    """The sidecar of a base weights file, or None when it has none (a plain Keras .h5 a user brings)."""
    path = sidecar_path(weights)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MedtlError(f"base sidecar {path} is unreadable ({str(exc)[:80]}); re-run `medtl pretrain`, or delete "
                         "the sidecar to load the weights unchecked") from None
    if not isinstance(raw, dict):
        raise MedtlError(f"base sidecar {path} must hold a JSON object; re-run `medtl pretrain`")
    return BaseMeta.from_dict(raw, path)


def check_fits(weights: str, backbone: str, channels: int, image_size: int | None = None) -> None:
    """Refuse a base whose sidecar names another backbone or channel count than the job builds; warn when
    it was pretrained at another input size (the weights fit any size, but its features were learned at one)."""
    meta = read_meta(weights)
    if meta is None:
        return
    if meta.backbone == backbone and meta.channels == channels:
        if image_size is not None and meta.image_size != image_size:
            warning(f"base file {weights} was pretrained at {meta.image_size} px and this job builds "
                    f"{image_size} px: it loads, but its features were learned at {meta.image_size} px; set "
                    f"data.image_size={meta.image_size}, or pretrain at {image_size} px, if the head learns poorly")
        return
    raise MedtlError(
        f"base file {weights} was pretrained for {meta.backbone} with {meta.channels} channel(s); this job builds "
        f"{backbone} with {channels} channel(s): set model.backbone={meta.backbone} and data.channels="
        f"{meta.channels}, or pretrain a base for this job with `medtl pretrain`")


def damaged(weights: str, exc: Exception) -> MedtlError:
    """The error for a base file that cannot be read at all (truncated or corrupt)."""
    return MedtlError(f"base file {weights} is truncated or corrupt ({str(exc).splitlines()[0][:120]}); copy it "
                      "again, or re-run the `medtl pretrain` that wrote it")


def write_base(backbone_model, meta: BaseMeta, path: str) -> None:
    """Write the backbone's weights to `path` and the sidecar beside it, each atomically (weights first, so
    a sidecar never describes a missing or partial file)."""
    # Keras picks the format from the suffix; the temporary name keeps ".weights.h5".
    stem = path[: -len(".weights.h5")] if path.endswith(".weights.h5") else path
    with fs.atomic_path(path, stem + ".tmp.weights.h5") as tmp:
        backbone_model.save_weights(tmp)
    fs.write_text_atomic(sidecar_path(path), json.dumps(asdict(meta), indent=2, sort_keys=True) + "\n")


def make_meta(cfg, method: str, epochs: int, records_digest: str) -> BaseMeta:
    return BaseMeta(backbone=cfg.model.backbone, image_size=cfg.data.image_size, channels=cfg.data.channels,
                    method=method, epochs=int(epochs), records_digest=records_digest,
                    medtl_version=medtl.__version__)
