"""Phased unfreezing: which layers of the base train in a phase, with BatchNorm kept frozen."""
from __future__ import annotations

import re

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
    groups = block_groups(base, backbone)
    layers = [l for group in groups for l in group]
    if spec.kind == "all":
        return layers
    if spec.kind == "top_fraction":
        # Counted over layers that have weights, so "the top 20%" means 20% of what can learn.
        learnable = [l for l in layers if l.weights]
        count = max(1, int(round(spec.fraction * len(learnable))))
        first = layers.index(learnable[-count])
        return layers[first:]
    if spec.kind == "regex":
        pattern = re.compile(spec.pattern)
        chosen = [l for l in layers if pattern.search(l.name)]
        if not any(l._trainable_weights for l in chosen):
            examples = ", ".join([l.name for l in layers if l.weights][-3:])
            raise ConfigError(
                f"phase {phase.name!r}: trainable regex {spec.pattern!r} matches no layer with weights in "
                f"{backbone} (names look like {examples})"
            )
        return chosen
    blocks = groups[1:]  # groups[0] is the stem
    if spec.blocks > len(blocks):
        raise ConfigError(
            f"phase {phase.name!r}: top_blocks={spec.blocks} but {backbone} has {len(blocks)} blocks; "
            f"use at most {len(blocks)} or trainable: all"
        )
    return [l for group in blocks[-spec.blocks:] for l in group]


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
    """Fail before any data is read when a phase selects nothing it names (a regex matching no
    layer, top_blocks beyond the base)."""
    base = get_base(model)
    for phase in cfg.phases:
        select_base_layers(base, cfg.model.backbone, phase)


def trainable_variable_names(model: tf.keras.Model) -> list[str]:
    """What the optimizer will update, for the run folder and the tests."""
    return [v.name for v in model.trainable_variables]
