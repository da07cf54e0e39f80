"""Phased unfreezing: which layers of the base train in a phase, with BatchNorm kept frozen."""
from __future__ import annotations

from medtl.config import Config, PhaseConfig
from medtl.errors import ConfigError
from medtl.models.backbones import block_groups
from medtl.models.build import get_base
from medtl.tf import tf


def select_base_layers(base: tf.keras.Model, backbone: str, phase: PhaseConfig) -> list:
    """Layers of the base that the phase unfreezes (before the BatchNorm rule applies)."""
    spec = phase.trainable
    if spec.kind == "none":
        return []
    layers = [l for group in block_groups(base, backbone) for l in group]
    if spec.kind == "all":
        return layers
    groups = block_groups(base, backbone)
    blocks = groups[1:]  # groups[0] is the stem
    if spec.value > len(blocks):
        raise ConfigError(
            f"phase {phase.name!r}: top_blocks={spec.value} but {backbone} has {len(blocks)} blocks; "
            f"use at most {len(blocks)} or trainable: all"
        )
    return [l for group in blocks[-spec.value:] for l in group]


def apply_phase(model: tf.keras.Model, cfg: Config, phase: PhaseConfig) -> list[str]:
    """Set `trainable` for a phase; returns the names of the base layers that train.

    BatchNorm layers of the base stay frozen, which in tf.keras also keeps them in
    inference mode (moving statistics), unless the phase sets train_batch_norm.
    The head always trains. Recompile the model afterwards.
    """
    base = get_base(model)
    selected = select_base_layers(base, cfg.model.backbone, phase)
    chosen = {id(l) for l in selected}
    base.trainable = bool(selected)
    for layer in base.layers:
        is_bn = isinstance(layer, tf.keras.layers.BatchNormalization)
        layer.trainable = id(layer) in chosen and (phase.train_batch_norm or not is_bn)
    for layer in model.layers:
        if layer is not base:
            layer.trainable = True
    return [l.name for l in base.layers if l.trainable and l.weights]


def check_phases_trainable(model: tf.keras.Model, cfg: Config) -> None:
    """Fail before training when a phase would train nothing (e.g. top_blocks beyond the base)."""
    base = get_base(model)
    for phase in cfg.phases:
        select_base_layers(base, cfg.model.backbone, phase)
