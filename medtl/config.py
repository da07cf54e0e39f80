"""Job configs: typed, frozen dataclasses loaded from YAML, with `--set` overrides.

The YAML tree in jobs/*.yaml mirrors these classes. Every field has a comment;
docs/config.md's reference table is generated from the same comments. Imports neither
TensorFlow nor albumentations: the policy check (medtl.data.policy) loads albumentations
only when a config with augmentation is validated.
"""
from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from medtl import jobfiles
from medtl.data.fields import SAFE_FIELDS
from medtl.data.policy import check_device_policy, check_policy
from medtl.data.subsets import fractions_problem
from medtl.errors import ConfigError
from medtl.models.specs import BACKBONES, feature_map_size, spatial_size

_MISSING = dataclasses.MISSING


@dataclass(frozen=True)
class Trainable:
    """Which part of the base a phase trains.

    YAML forms: `none`, `all`, `{top_blocks: N}` (the backbone's last N blocks, e.g.
    EfficientNet's block7, block6, ... with top_conv), `{top_fraction: F}` (the top F
    of the base's layers), `{regex: PATTERN}` (layers whose name matches).
    """

    kind: Literal["none", "all", "top_blocks", "top_fraction", "regex"] = "none"
    blocks: int = 0
    fraction: float = 0.0
    pattern: str = ""
    yaml_type = "none, all, {top_blocks: N}, {top_fraction: F} or {regex: PATTERN}"

    @classmethod
    def from_yaml(cls, raw: Any, key: str) -> "Trainable":
        if raw in ("none", "all"):
            return cls(kind=raw)
        if isinstance(raw, dict) and len(raw) == 1:
            (kind, value), = raw.items()
            if kind == "top_blocks":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ConfigError(f"'{key}.top_blocks' must be an int >= 1, got {value!r}")
                return cls(kind=kind, blocks=value)
            if kind == "top_fraction":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                    raise ConfigError(f"'{key}.top_fraction' must be a number in (0, 1], got {value!r}")
                return cls(kind=kind, fraction=float(value))
            if kind == "regex":
                if not isinstance(value, str) or not value:
                    raise ConfigError(f"'{key}.regex' must be a non-empty pattern, got {value!r}")
                try:
                    re.compile(value)
                except re.error as exc:
                    raise ConfigError(f"'{key}.regex' is not a valid regular expression ({exc}): {value!r}") from None
                return cls(kind=kind, pattern=value)
        raise ConfigError(f"'{key}' must be {cls.yaml_type}, got {raw!r}")

    def to_yaml(self) -> Any:
        if self.kind in ("none", "all"):
            return self.kind
        value = {"top_blocks": self.blocks, "top_fraction": self.fraction, "regex": self.pattern}[self.kind]
        return {self.kind: value}


def _freeze(value: Any) -> Any:
    """YAML lists -> tuples, so a transform's arguments are immutable and comparable."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclass(frozen=True)
class Transform:
    """One albumentations transform of the augmentation policy: class name and keyword arguments.

    YAML forms: `Name` or `{Name: {argument: value, ...}}`. Checked against albumentations
    by Config.check (medtl.data.policy.check_policy).
    """

    name: str
    args: tuple[tuple[str, Any], ...] = ()
    yaml_type = "albumentations transforms: Name or {Name: {arg: value}}"

    @classmethod
    def from_yaml(cls, raw: Any, key: str) -> "Transform":
        if isinstance(raw, str) and raw:
            return cls(raw)
        if isinstance(raw, dict) and len(raw) == 1:
            (name, args), = raw.items()
            if args is None:
                args = {}
            if isinstance(name, str) and isinstance(args, dict) and all(isinstance(k, str) for k in args):
                return cls(name, tuple((k, _freeze(v)) for k, v in args.items()))
        raise ConfigError(
            f"'{key}' must be a transform name or {{Name: {{argument: value}}}}, e.g. "
            f"{{Affine: {{rotate: [-7, 7]}}}}; got {raw!r}"
        )

    def to_yaml(self) -> Any:
        return {self.name: {k: _thaw(v) for k, v in self.args}} if self.args else self.name

    def kwargs(self) -> dict[str, Any]:
        return dict(self.args)


def _t(name: str, **args: Any) -> Transform:
    return Transform(name, tuple((k, _freeze(v)) for k, v in args.items()))


# The default training augmentation, for chest radiographs (albumentations names and arguments).
# No HorizontalFlip: laterality is anatomy in a chest X-ray. The heart, aortic arch and gastric
# bubble sit on the left, so a mirrored film looks like dextrocardia / situs inversus (a finding
# in itself), and a model trained on mirrored films learns to ignore the side of a finding.
DEFAULT_AUGMENT: tuple[Transform, ...] = (
    # Patient positioning: small rotations, shifts and magnification differences.
    _t("Affine", rotate=(-7, 7), translate_percent=(-0.05, 0.05), scale=(0.9, 1.1), p=0.7),
    # Exposure and post-processing differ between machines and sites.
    _t("RandomBrightnessContrast", brightness_limit=0.1, contrast_limit=0.1, p=0.5),
    _t("RandomGamma", gamma_limit=(85, 118), p=0.3),
    # Some sites send contrast-enhanced (CLAHE-like) films.
    _t("CLAHE", clip_limit=(1, 2), tile_grid_size=(8, 8), p=0.2),
    # Light detector noise.
    _t("GaussNoise", std_range=(0.01, 0.03), p=0.2),
)


AUGMENT_ON = ("cpu", "device")


@dataclass(frozen=True)
class DataConfig:
    # Folder (or s3:// / gs:// prefix) holding the shards and manifest.json written by `medtl ingest`.
    records: str = ""
    # Side of the square image the model sees, in pixels. Shards are resized to it on the fly.
    image_size: int = 224
    # Accept a data.image_size larger than the records' stored size (the images are then upsampled, and
    # hold no more detail than stored); false refuses such a job. See docs/training.md, Input pipeline.
    allow_upsample: bool = False
    # 3 to feed grayscale studies to ImageNet-style backbones (gray repeated), or 1.
    channels: int = 3
    # Training shuffle buffer, in records.
    shuffle_buffer: int = 1024
    # Training augmentation: albumentations transforms applied in order to each training image (never
    # to val/test); [] turns it off. The default suits chest radiographs (see docs/training.md, Augmentation).
    augment: tuple[Transform, ...] = DEFAULT_AUGMENT
    # Where training augments: cpu (albumentations in the input pipeline, any transform) or device (the same
    # policy as batched TensorFlow ops in the training step, on the GPU when there is one, with the scaling and
    # gray to RGB; the input pipeline then only reads, decodes and batches). device runs HorizontalFlip, Affine,
    # RandomBrightnessContrast, RandomGamma, GaussNoise and CLAHE; see docs/training.md, Augmentation on the device.
    augment_on: str = "cpu"
    # Keep decoded, resized images (before augmentation) after the first pass: none, memory, or a
    # folder for cache files on local disk. For datasets that fit; see docs/training.md, Input pipeline.
    cache: str = "none"
    # Read, shuffle and augment in a fixed order and make TensorFlow ops deterministic, so runs with the
    # same seed and ranks give the same weights (a little slower: no out-of-order parallelism).
    deterministic: bool = False
    # Train on this fraction of the train split's patients (nested, patient-level subsets ordered by the seed:
    # a smaller fraction's patients are inside a larger one's), for learning curves and label budgets; 1 = all.
    train_fraction: float = 1.0

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if not 1 <= self.image_size <= 4096:
            problems.append(("image_size", f"must be in [1, 4096] pixels, got {self.image_size}"))
        if self.channels not in (1, 3):
            problems.append(("channels", f"must be 1 or 3, got {self.channels}"))
        if self.shuffle_buffer < 1:
            problems.append(("shuffle_buffer", f"must be >= 1, got {self.shuffle_buffer}"))
        if not self.cache.strip():
            problems.append(("cache", "must be none, memory or a folder, got ''"))
        if not 0 < self.train_fraction <= 1:
            problems.append(("train_fraction", f"must be in (0, 1], got {self.train_fraction}"))
        if self.augment_on not in AUGMENT_ON:
            problems.append(("augment_on", f"must be one of {', '.join(AUGMENT_ON)}, got {self.augment_on!r}"))
        return problems


# The activations a head's conv and dense layers take (linear: none).
HEAD_ACTIVATIONS = ("relu", "swish", "gelu", "elu", "linear")
GLOBAL_POOLINGS = ("avg", "max", "gem")
PADDINGS = ("valid", "same")
# Each layer type's fields, in order, with their defaults; the first field is the one a bare value sets
# ({dense: 512} is {dense: {units: 512}}). None: required. A pool's stride 0 means its size.
HEAD_LAYER_FIELDS: dict[str, dict[str, Any]] = {
    "conv": {"filters": None, "kernel": 1, "stride": 1, "padding": "valid", "activation": "relu"},
    "max_pool": {"size": None, "stride": 0, "padding": "valid"},
    "avg_pool": {"size": None, "stride": 0, "padding": "valid"},
    "global_pool": {"pooling": None},
    "flatten": {},
    "dense": {"units": None, "activation": "relu"},
    "dropout": {"rate": None},
    "batch_norm": {},
}
_FIELD_CHOICES = {"padding": PADDINGS, "activation": HEAD_ACTIVATIONS, "pooling": GLOBAL_POOLINGS}
_SPATIAL = ("conv", "max_pool", "avg_pool")  # keep the map 4-D
_VECTORISE = ("global_pool", "flatten")       # 4-D map -> vector


@dataclass(frozen=True)
class HeadLayer:
    """One layer of a head's layer list (model.head.layers); docs/training.md, Heads, has every field.

    YAML forms: `flatten`, `batch_norm`, `{type: value}` (the type's first field: `{dense: 512}`,
    `{global_pool: avg}`, `{max_pool: 2}`, `{dropout: 0.5}`, `{conv: 448}`) or `{type: {field: value}}`,
    e.g. `{conv: {filters: 224, kernel: 2, stride: 2, activation: linear}}`.
    """

    kind: str
    filters: int = 0          # conv
    units: int = 0            # dense
    size: int = 0             # max_pool, avg_pool: window side
    kernel: int = 1           # conv: kernel side
    stride: int = 1           # conv, pools (a pool's default is its size)
    padding: str = "valid"    # conv, pools
    activation: str = "relu"  # conv, dense
    rate: float = 0.0         # dropout
    pooling: str = "avg"      # global_pool
    name: str = ""            # the Keras layer name; "" = head_<index>_<type> (the short form names its layers)
    yaml_type = "head layer: flatten, batch_norm, {type: value} or {type: {field: value}}"

    @classmethod
    def from_yaml(cls, raw: Any, key: str) -> "HeadLayer":
        if isinstance(raw, str) and raw in HEAD_LAYER_FIELDS and not HEAD_LAYER_FIELDS[raw]:
            return cls(raw)
        if isinstance(raw, dict) and len(raw) == 1:
            (kind, value), = raw.items()
        elif isinstance(raw, str):
            kind, value = raw, None
        else:
            raise ConfigError(f"'{key}' must be a layer: flatten, batch_norm, {{type: value}} or "
                              f"{{type: {{field: value}}}}, e.g. {{dense: {{units: 512, activation: relu}}}}; got {raw!r}")
        if kind not in HEAD_LAYER_FIELDS:
            raise ConfigError(f"'{key}': unknown layer type {kind!r}; valid types are: {', '.join(HEAD_LAYER_FIELDS)}")
        fields = HEAD_LAYER_FIELDS[kind]
        if value is None or value == {}:
            value = {}
        elif not isinstance(value, dict):
            if not fields:
                raise ConfigError(f"'{key}': {kind} takes no settings; write it as {kind}, got {raw!r}")
            value = {next(iter(fields)): value}
        unknown = [f for f in value if f not in fields]
        if unknown:
            takes = f"takes: {', '.join(fields)}" if fields else "takes no settings"
            raise ConfigError(f"'{key}.{kind}': unknown field {unknown[0]!r}; {kind} {takes}")
        values = {f: value.get(f, default) for f, default in fields.items()}
        for f, v in values.items():
            values[f] = _layer_field(f"{key}.{kind}.{f}", f, v, kind)
        if kind in ("max_pool", "avg_pool") and values["stride"] == 0:
            values["stride"] = values["size"]
        return cls(kind, **values)

    def to_yaml(self) -> Any:
        fields = HEAD_LAYER_FIELDS[self.kind]
        return {self.kind: {f: getattr(self, f) for f in fields}} if fields else self.kind

    def describe(self) -> str:
        """A short readable form for logs and search keys: conv(448,k1,linear), max_pool(2), dense(112,relu)."""
        same = ",same" if self.padding == "same" else ""
        if self.kind == "conv":
            stride = f",s{self.stride}" if self.stride != 1 else ""
            return f"conv({self.filters},k{self.kernel}{stride}{same},{self.activation})"
        if self.kind in ("max_pool", "avg_pool"):
            stride = f",s{self.stride}" if self.stride != self.size else ""
            return f"{self.kind}({self.size}{stride}{same})"
        if self.kind == "global_pool":
            return f"global_pool({self.pooling})"
        if self.kind == "dense":
            return f"dense({self.units},{self.activation})"
        if self.kind == "dropout":
            return f"dropout({self.rate:g})"
        return self.kind


def _layer_field(key: str, name: str, value: Any, kind: str) -> Any:
    """A head layer field's value, checked (ConfigError naming `key` otherwise)."""
    if value is None:
        raise ConfigError(f"'{key}' is required, e.g. {{{kind}: {{{name}: {_LAYER_EXAMPLE[name]}}}}}")
    if name in _FIELD_CHOICES:
        if value not in _FIELD_CHOICES[name]:
            raise ConfigError(f"'{key}': unknown {name} {value!r}; valid values are: {', '.join(_FIELD_CHOICES[name])}")
        return value
    if name == "rate":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ConfigError(f"'{key}' must be a number in [0, 1), got {value!r}")
        return float(value)
    least = 0 if (name == "stride" and kind != "conv") else 1  # a pool's stride 0: its size
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"'{key}' must be an int >= 1, got {value!r}")
    return value


_LAYER_EXAMPLE = {"filters": 448, "units": 512, "size": 2, "pooling": "avg", "rate": 0.5}


@dataclass(frozen=True)
class HeadConfig:
    # The head as a list of layers from the base's feature map up, e.g. [{conv: {filters: 448, activation: linear}}, {max_pool: 2}, {global_pool: avg}, {dense: 112}]; types: conv, max_pool, avg_pool, global_pool, flatten, dense, dropout, batch_norm (docs/training.md, Heads). medtl appends the output Dense(num_labels). When given, leave out the short-form keys below.
    layers: tuple[HeadLayer, ...] = ()
    # Short form (used when layers is empty): global pooling of the base's feature map: avg, max, or gem (generalised mean, p learned).
    pooling: Literal["avg", "max", "gem"] = "avg"
    # Short form: filters of a 1x1 conv applied to the feature map before pooling; 0 means no conv.
    conv_filters: int = 0
    # Short form: sizes of the inner dense layers between pooling and the output layer, e.g. [512] or [].
    dense: tuple[int, ...] = ()
    # Short form: activation of the 1x1 conv and inner dense layers.
    activation: Literal["relu", "swish", "gelu", "elu", "linear"] = "relu"
    # Short form: dropout rate before each dense layer (inner and output); 0 disables it.
    dropout: float = 0.2
    # Short form: batch norm after pooling and after each inner dense layer.
    batch_norm: bool = False

    SHORT_FORM = ("pooling", "conv_filters", "dense", "activation", "dropout", "batch_norm")

    @classmethod
    def check_raw(cls, raw: dict, prefix: str) -> None:
        """The two forms are exclusive: a layer list next to short-form keys would leave some of them unused."""
        short = [k for k in cls.SHORT_FORM if k in raw]
        if raw.get("layers") and short:
            raise ConfigError(
                f"'{prefix}' has both layers and the short-form key(s) {', '.join(short)}; give one form (the layer "
                f"list holds the pooling, dense layers and dropout itself). With --set, set the whole head: "
                f"--set '{prefix}={{layers: [...]}}'")

    def to_yaml(self) -> dict:
        if self.layers:
            return {"layers": [layer.to_yaml() for layer in self.layers]}
        return {name: to_tree(getattr(self, name)) for name in self.SHORT_FORM}

    def layer_list(self) -> tuple[HeadLayer, ...]:
        """The head's layers below the output Dense. The short form expands to: [conv 1x1 (head_conv)] ->
        global pool (head_pool) -> [batch_norm (head_pool_bn)] -> per inner size i: [dropout (head_dropout_i)]
        -> dense (head_dense_i) -> [batch_norm (head_bn_i)] -> [dropout (head_dropout_out)]."""
        if self.layers:
            return self.layers
        act, rate = self.activation, self.dropout
        out = [HeadLayer("conv", filters=self.conv_filters, activation=act, name="head_conv")] if self.conv_filters else []
        out.append(HeadLayer("global_pool", pooling=self.pooling, name="head_pool"))
        if self.batch_norm:
            out.append(HeadLayer("batch_norm", name="head_pool_bn"))
        for i, units in enumerate(self.dense):
            if rate:
                out.append(HeadLayer("dropout", rate=rate, name=f"head_dropout_{i}"))
            out.append(HeadLayer("dense", units=units, activation=act, name=f"head_dense_{i}"))
            if self.batch_norm:
                out.append(HeadLayer("batch_norm", name=f"head_bn_{i}"))
        if rate:
            out.append(HeadLayer("dropout", rate=rate, name="head_dropout_out"))
        return tuple(out)

    def describe(self) -> str:
        """The layer sequence, e.g. conv(448,k1,linear) > max_pool(2) > global_pool(avg) > dense(112,linear)."""
        return " > ".join(layer.describe() for layer in self.layer_list())

    def pooled_start(self) -> str | None:
        """avg or max when the head starts with that global pool (it can train on a pooled feature cache)."""
        first = self.layer_list()[0]
        return first.pooling if first.kind == "global_pool" and first.pooling in ("avg", "max") else None

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if not 0.0 <= self.dropout < 1.0:
            problems.append(("dropout", f"must be in [0, 1), got {self.dropout}"))
        if self.conv_filters < 0:
            problems.append(("conv_filters", f"must be >= 0, got {self.conv_filters}"))
        if any(units < 1 for units in self.dense):
            problems.append(("dense", f"sizes must be >= 1, got {list(self.dense)}"))
        return problems + head_shape_problems(self.layer_list(), None)


def head_shape_problems(layers: typing.Sequence[HeadLayer], side: int | None) -> list[tuple[str, str]]:
    """(layers.I, problem) for a layer that cannot follow the ones before it on a side x side feature map
    (side None: the order alone: conv/pools on a vector, dense on a 4-D map, two global pools)."""
    vector_at = None  # index of the layer that made the map a vector
    for i, layer in enumerate(layers):
        where, what = f"layers.{i}", f"({layer.describe()})"
        if layer.kind in _SPATIAL + _VECTORISE and vector_at is not None:
            return [(where, f"{what} needs the 4-D feature map, but layers.{vector_at} "
                            f"({layers[vector_at].describe()}) already made it a vector; conv and pooling layers go "
                            "before the one global_pool or flatten")]
        if layer.kind == "dense" and vector_at is None:
            return [(where, f"{what} gets the 4-D feature map; put a global_pool or flatten before it")]
        if layer.kind in _VECTORISE:
            vector_at = i
        elif layer.kind in _SPATIAL and side is not None:
            window, called = (layer.kernel, "kernel") if layer.kind == "conv" else (layer.size, "window")
            if layer.padding == "valid" and window > side:
                return [(where, f"{what} does not fit: its {window}x{window} {called} is larger than the {side}x{side} "
                                f"feature map it gets; use a smaller {called}, padding: same, or a larger data.image_size")]
            side = spatial_size(side, window, layer.stride, layer.padding)
    if layers and vector_at is None:
        return [(f"layers.{len(layers) - 1}", f"({layers[-1].describe()}) ends the head on the 4-D feature map; "
                                              "add a global_pool or flatten (the output Dense needs a vector)")]
    return []


@dataclass(frozen=True)
class ModelConfig:
    # A tf.keras.applications backbone name, e.g. EfficientNetB4, EfficientNetB0, ResNet50, DenseNet121, InceptionV3, InceptionResNetV2, Xception (docs/training.md, Backbones).
    backbone: str = "EfficientNetB0"
    # Base weights: imagenet (Keras cache ~/.keras/models, downloaded if online), none (random), or a .h5 path.
    weights: str = "imagenet"
    # The multi-label classification head on top of the base.
    head: HeadConfig = field(default_factory=HeadConfig)
    # Momentum of every BatchNorm layer's moving mean and variance, base and head; negative keeps each
    # layer's own (Keras' 0.99, MobileNets' 0.999). A short run leaves such statistics short of the data's
    # (0.99 after 100 steps still holds 37% of its start), so the model that validates and exports is not
    # the one that trained; 0.9 converges in ~50 steps.
    batchnorm_momentum: float = -1.0

    def check(self) -> list[tuple[str, str]]:
        if not self.batchnorm_momentum < 1:  # NaN too
            return [("batchnorm_momentum", f"must be below 1 (negative keeps each layer's own), got "
                                           f"{self.batchnorm_momentum}")]
        return []


@dataclass(frozen=True)
class LossConfig:
    # bce; weighted_bce (positives weighted by the train split's (1-p)/p from the manifest);
    # focal (Lin et al. 2017); asl (asymmetric loss, Ridnik et al. 2021). All honour the label mask.
    name: Literal["bce", "weighted_bce", "focal", "asl"] = "bce"
    # weighted_bce: cap on a label's positive weight (rare labels would otherwise dominate).
    max_pos_weight: float = 50.0
    # focal: focusing exponent gamma.
    gamma: float = 2.0
    # focal: weight of positives (negatives get 1 - alpha); a negative value disables it.
    alpha: float = -1.0
    # asl: focusing exponent for positives.
    gamma_pos: float = 0.0
    # asl: focusing exponent for negatives.
    gamma_neg: float = 4.0
    # asl: probability margin shifted off easy negatives.
    clip: float = 0.05

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if self.max_pos_weight < 1:
            problems.append(("max_pos_weight", f"must be >= 1, got {self.max_pos_weight}"))
        for name in ("gamma", "gamma_pos", "gamma_neg"):
            if getattr(self, name) < 0:
                problems.append((name, f"must be >= 0, got {getattr(self, name)}"))
        if self.alpha > 1:
            problems.append(("alpha", f"must be <= 1 (negative disables it), got {self.alpha}"))
        if not 0 <= self.clip < 1:
            problems.append(("clip", f"must be in [0, 1), got {self.clip}"))
        return problems


@dataclass(frozen=True)
class TrainConfig:
    # Images per rank per step. The global batch is this times the number of Horovod ranks.
    batch_size: int = 32
    # float32, or mixed_float16 for GPUs (the head's output stays float32; loss scaling is dynamic).
    precision: Literal["float32", "mixed_float16"] = "float32"
    # How learning rates grow with the number of ranks: linear (x ranks), sqrt, or none.
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    # Compile the train step with XLA.
    jit_compile: bool = False
    # Send gradients between ranks as float16 (halves allreduce traffic).
    fp16_allreduce: bool = False
    # The multi-label loss.
    loss: LossConfig = field(default_factory=LossConfig)
    # Epoch checkpoints kept (the newest); the best weights are kept as well.
    keep_checkpoints: int = 2
    # Consecutive steps with a non-finite loss or gradient (updates skipped) before training stops.
    nonfinite_patience: int = 20
    # Seconds a rank waits inside one training step for the others before ending the job, naming the ranks that did not reach the step (0 waits forever).
    stall_shutdown_seconds: int = 120
    # TensorFlow intra-op threads per rank; 0 lets TensorFlow choose.
    intra_op_threads: int = 0
    # TensorFlow inter-op threads per rank; 0 lets TensorFlow choose.
    inter_op_threads: int = 0
    # Train images scored each epoch for the train AUROC beside val's (a fixed sample, un-augmented; the whole train split when it is smaller); 0 turns it off.
    train_eval_images: int = 1000

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if self.train_eval_images < 0:
            problems.append(("train_eval_images", f"must be >= 0 (0 = off), got {self.train_eval_images}"))
        for name in ("batch_size", "keep_checkpoints", "nonfinite_patience"):
            if getattr(self, name) < 1:
                problems.append((name, f"must be >= 1, got {getattr(self, name)}"))
        for name in ("stall_shutdown_seconds", "intra_op_threads", "inter_op_threads"):
            if getattr(self, name) < 0:
                problems.append((name, f"must be >= 0, got {getattr(self, name)}"))
        return problems


@dataclass(frozen=True)
class PhaseConfig:
    # Name of the phase, used in logs, history.jsonl and checkpoint names.
    name: str
    # Epochs to train in this phase.
    epochs: int
    # Base learning rate (for one rank; scaled by train.lr_scaling).
    learning_rate: float
    # What of the base trains: none (head only), all, {top_blocks: N}, {top_fraction: F} or {regex: PATTERN}.
    trainable: Trainable = field(default_factory=Trainable)
    # Let BatchNorm layers of the base train (batch statistics). Off keeps them in inference mode.
    train_batch_norm: bool = False
    # Learning-rate schedule within the phase: cosine (decay to 0 over the phase) or constant.
    schedule: Literal["cosine", "constant"] = "cosine"
    # Epochs of linear warmup from 0 to the learning rate at the start of the phase (may be fractional).
    warmup_epochs: float = 0.0
    # adam, adamw (decoupled weight decay) or sgd (with momentum).
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    # Decoupled weight decay (adamw, sgd); 0 disables it.
    weight_decay: float = 0.0
    # sgd: momentum.
    momentum: float = 0.9
    # Stop the phase when val macro AUROC has not improved for this many epochs; 0 never stops early.
    early_stopping_patience: int = 0

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if self.weight_decay < 0:
            problems.append(("weight_decay", f"must be >= 0, got {self.weight_decay}"))
        if self.early_stopping_patience < 0:
            problems.append(("early_stopping_patience", f"must be >= 0, got {self.early_stopping_patience}"))
        if self.weight_decay and self.optimizer == "adam":
            problems.append(("weight_decay", "needs optimizer adamw or sgd (adam has no decoupled decay)"))
        if not 0 <= self.warmup_epochs <= self.epochs:
            problems.append(("warmup_epochs", f"must be in [0, epochs], got {self.warmup_epochs}"))
        if self.epochs < 1:
            problems.append(("epochs", f"must be >= 1, got {self.epochs}"))
        if not self.learning_rate > 0:
            problems.append(("learning_rate", f"must be > 0, got {self.learning_rate}"))
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.name):
            problems.append(("name", f"must be letters, digits, _ or -, got {self.name!r}"))
        return problems


@dataclass(frozen=True)
class EvaluateConfig:
    # How `medtl evaluate` picks each label's operating threshold on the val split: youden (max sensitivity + specificity - 1), sensitivity or specificity (reach evaluate.target), or f1 (max F1).
    threshold_policy: Literal["youden", "sensitivity", "specificity", "f1"] = "youden"
    # Target for the sensitivity and specificity policies, e.g. 0.9 for 90% sensitivity on val.
    target: float = 0.9
    # Test-time augmentation: none, or flip (mean probability of the image and its left-right mirror).
    tta: Literal["none", "flip"] = "none"
    # Bootstrap resamples of patients for the confidence intervals and `medtl compare`; 0 turns intervals off.
    bootstrap: int = 1000
    # Confidence level of the bootstrap intervals.
    confidence: float = 0.95
    # Seed of the bootstrap resampling (the same seed gives the same intervals).
    seed: int = 0
    # Equal-width probability bins of the reliability diagram and the expected calibration error.
    calibration_bins: int = 10
    # The report flags overfitting when val AUROC falls while train AUROC rises for this many consecutive epochs of a phase.
    overfit_patience: int = 3
    # The report also flags overfitting when train macro AUROC exceeds val macro AUROC by more than this at the best epoch or the last.
    overfit_gap: float = 0.1
    # A learning_curve.json of `medtl search --fractions` (best.yaml sets it): the overfitting advice says from it whether more data would help; '' for none.
    learning_curve: str = ""
    # Per-label calibration fitted on val before the thresholds are tuned: none, temperature (logit / T), platt (logistic on the logit) or isotonic (non-decreasing, piecewise linear). Used in the report, the export and `medtl predict`.
    calibration: Literal["none", "temperature", "platt", "isotonic"] = "none"
    # Fields kept at ingest (--keep-fields) to report AUROC and AUPRC by subgroup, e.g. [sex, age_band, site].
    subgroups: tuple[str, ...] = ()
    # Subgroups with fewer patients are merged into "other", and "other" is suppressed when it is still smaller (fewer would give intervals too wide to flag anything, and small cells can single out patients).
    subgroup_min_patients: int = 30
    # Grad-CAM overlays in the report: per label, the top true positives, false positives and false negatives at the thresholds. Off by default: image pixels can carry burned-in text (names, dates).
    saliency: bool = False
    # With evaluate.saliency: overlays per label and category (true positive, false positive, false negative).
    saliency_examples: int = 3

    def check(self) -> list[tuple[str, str]]:
        problems = []
        unknown = [f for f in self.subgroups if f not in SAFE_FIELDS]
        if unknown:
            problems.append(("subgroups", f"names unknown field(s) {', '.join(map(repr, unknown))}; fields are: "
                                          f"{', '.join(SAFE_FIELDS)}"))
        if self.subgroup_min_patients < 1:
            problems.append(("subgroup_min_patients", f"must be >= 1, got {self.subgroup_min_patients}"))
        if self.overfit_patience < 1:
            problems.append(("overfit_patience", f"must be >= 1, got {self.overfit_patience}"))
        if not 0.0 < self.overfit_gap < 1.0:
            problems.append(("overfit_gap", f"must be in (0, 1), got {self.overfit_gap}"))
        if not 0.0 < self.target < 1.0:
            problems.append(("target", f"must be in (0, 1), got {self.target}"))
        if self.bootstrap != 0 and self.bootstrap < 50:
            problems.append(("bootstrap", f"must be 0 (off) or >= 50, got {self.bootstrap}"))
        if not 0.5 <= self.confidence < 1.0:
            problems.append(("confidence", f"must be in [0.5, 1), got {self.confidence}"))
        if not 2 <= self.calibration_bins <= 100:
            problems.append(("calibration_bins", f"must be in [2, 100], got {self.calibration_bins}"))
        if not 1 <= self.saliency_examples <= 20:
            problems.append(("saliency_examples", f"must be in [1, 20], got {self.saliency_examples}"))
        return problems


@dataclass(frozen=True)
class SearchConfig:
    # Folder of the feature cache (`medtl search`), shared by searches: one subfolder per backbone, weights, image size and records.
    feature_cache: str = "~/.cache/medtl/features"
    # Cache pooled feature vectors instead of spatial maps (far smaller; heads with a 1x1 conv then cannot be searched).
    pooled_cache: bool = False
    # Feature cache precision: float32 (exact), or float16 (half the space; fine for ImageNet bases, whose features are O(1), not for a random base's ~1e-6).
    cache_dtype: Literal["float32", "float16"] = "float32"
    # Augmented copies of each train image in the cache (data.augment applied, seeded), besides the plain one.
    augmented_copies: int = 0
    # How heads are drawn from the space: grid (every head once, in seeded random order), tpe or random (seeded).
    sampler: Literal["grid", "tpe", "random"] = "grid"
    # Successive halving: a rung keeps the best 1/reduction_factor of the heads that reached it.
    reduction_factor: int = 3
    # Epochs of the first rung; later rungs are min_epochs x reduction_factor^k, the last one phase 1's epochs.
    min_epochs: int = 1
    # A trial pruned at the first rung whose val AUROC there lies more than this many robust standard deviations (1.4826 x MAD) below the median of the first rung's scores is a failed start: it trains one more epoch and is judged again against the first rung (a second look). 0 turns this off; it needs 8 first-rung scores and a first rung at least 2 epochs short of the full schedule.
    second_look_below: float = 4.0
    # Subset transfer: fractions of the train split's patients (nested, e.g. [0.1, 0.3, 1.0]) to run the search on, each against the largest; [] searches the whole split once. `--fractions` sets it.
    fractions: tuple[float, ...] = ()
    # Subset transfer: the top-k overlap compares the best k heads of each fraction with the largest fraction's.
    top_k: int = 5

    @classmethod
    def check_raw(cls, raw: dict, prefix: str) -> None:
        if "restart_below" in raw:  # the key of medtl 2026-12-05
            raise ConfigError(f"'{prefix}.restart_below' is now '{prefix}.second_look_below': a failed start trains "
                              "one more epoch and is judged again instead of restarting; rename the key")

    def check(self) -> list[tuple[str, str]]:
        problems = []
        problem = fractions_problem(self.fractions)
        if problem:
            problems.append(("fractions", problem))
        if self.top_k < 1:
            problems.append(("top_k", f"must be >= 1, got {self.top_k}"))
        if self.augmented_copies < 0:
            problems.append(("augmented_copies", f"must be >= 0, got {self.augmented_copies}"))
        if self.reduction_factor < 2:
            problems.append(("reduction_factor", f"must be >= 2, got {self.reduction_factor}"))
        if self.min_epochs < 1:
            problems.append(("min_epochs", f"must be >= 1, got {self.min_epochs}"))
        if not self.second_look_below >= 0:
            problems.append(("second_look_below", f"must be >= 0 (0 turns second looks off), got "
                                                  f"{self.second_look_below}"))
        if not self.feature_cache.strip():
            problems.append(("feature_cache", "must be a folder, got ''"))
        return problems


# Pretraining methods medtl knows of; only those in PRETRAIN_METHODS are built.
PRETRAIN_METHODS = ("supervised", "simclr")
_PRETRAIN_NOT_BUILT = ("moco", "byol", "dino")

# The self-supervised (simclr) views' photometric transforms, after the random resized crop that
# pretrain.crop_scale sets. Stronger than DEFAULT_AUGMENT, since two views of one film must differ
# enough to make matching them a task, yet radiograph-sensible: no colour jitter (grayscale), no
# mirror unless data.augment has HorizontalFlip (laterality is anatomy), no solarize or cutout.
SIMCLR_AUGMENT: tuple[Transform, ...] = (
    # Positioning differences.
    _t("Affine", rotate=(-10, 10), p=0.5),
    # SimCLR's colour distortion, reduced to what a radiograph has: exposure and contrast.
    _t("RandomBrightnessContrast", brightness_limit=0.3, contrast_limit=0.3, p=0.8),
    _t("RandomGamma", gamma_limit=(70, 140), p=0.5),
    # Detector resolution and noise differ between machines.
    _t("GaussianBlur", blur_limit=(3, 5), sigma_limit=(0.1, 1.5), p=0.5),
    _t("GaussNoise", std_range=(0.01, 0.05), p=0.3),
)


def negatives_per_anchor(per_rank_batch_size: int, ranks: int) -> int:
    """Each anchor's negatives: both views of every other image of the global batch."""
    return 2 * per_rank_batch_size * ranks - 2


def check_views_batch(per_rank_batch_size: int, ranks: int) -> None:
    """NT-Xent needs other images in the batch to contrast with: 2 per rank, which gives every anchor at least
    negatives_per_anchor(2, 1) = 2 negatives on any number of ranks."""
    if per_rank_batch_size < 2 or negatives_per_anchor(per_rank_batch_size, ranks) < 2:
        raise ConfigError(
            f"train.batch_size={per_rank_batch_size} is too small for pretrain.method=simclr: each rank needs at "
            "least 2 images per step (the other images' views are an anchor's negatives); set "
            "train.batch_size=2 or more (32 or more per rank learns better)")


@dataclass(frozen=True)
class PretrainConfig:
    # `medtl pretrain`'s method: supervised (train the base with the phases on data.records' labels, then keep the base) or simclr (self-supervised, contrastive: labels ignored); required by `medtl pretrain`, ignored by the other commands.
    method: str = ""
    # simclr: temperature of the NT-Xent loss (lower sharpens the softmax over the negatives).
    temperature: float = 0.2
    # simclr: units of the projection head's hidden layer (on the pooled base features; not kept in the base file).
    projection_width: int = 512
    # simclr: size of the projection the loss compares.
    projection_dim: int = 128
    # simclr: area range, as fractions of the image, of each view's random resized crop (before the transforms of pretrain.augment).
    crop_scale: tuple[float, ...] = (0.3, 1.0)
    # simclr: albumentations transforms applied to each view after its crop (data.augment is not used; a HorizontalFlip there adds one here).
    augment: tuple[Transform, ...] = SIMCLR_AUGMENT

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if self.method not in ("",) + PRETRAIN_METHODS:
            if self.method in _PRETRAIN_NOT_BUILT:
                problems.append(("method", f"{self.method!r} is not built yet; use simclr or supervised"))
            else:
                problems.append(("method", f"must be supervised or simclr, got {self.method!r}"))
        if not self.temperature > 0:
            problems.append(("temperature", f"must be > 0, got {self.temperature}"))
        for name in ("projection_width", "projection_dim"):
            if getattr(self, name) < 1:
                problems.append((name, f"must be >= 1, got {getattr(self, name)}"))
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            problems.append(("crop_scale", f"must be [low, high] with 0 < low <= high <= 1, got "
                                           f"{list(self.crop_scale)}"))
        return problems

    def view_policy(self, image_size: int, data_augment: tuple[Transform, ...]) -> tuple[Transform, ...]:
        """The transforms that make one simclr view: crop, a flip when data.augment allows one, then augment."""
        crop = _t("RandomResizedCrop", size=(image_size, image_size), scale=tuple(self.crop_scale), p=1.0)
        flip = tuple(t for t in data_augment if t.name == "HorizontalFlip")[:1]
        return (crop,) + flip + self.augment


@dataclass(frozen=True)
class Config:
    # Seed for model initialisation, shuffling and augmentation.
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Training phases, run in order; each starts from the best weights of the one before.
    phases: tuple[PhaseConfig, ...] = ()
    # Evaluation, operating thresholds and export (`medtl evaluate`, `medtl export`).
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    # Head search (`medtl search`): feature cache and successive halving.
    search: SearchConfig = field(default_factory=SearchConfig)
    # In-domain pretraining of the base (`medtl pretrain`).
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if self.seed < 0:
            problems.append(("seed", f"must be >= 0, got {self.seed}"))
        min_size = _backbone_min_size(self.model.backbone)
        if self.data.image_size < min_size:
            problems.append(("data.image_size", f"is {self.data.image_size} but {self.model.backbone} needs at least "
                                                f"{min_size} px; set data.image_size to {min_size} or more"))
        else:
            if self.data.augment:
                problems.extend((f"data.{key}", message) for key, message in check_policy(self.data.augment,
                                                                                         self.data.image_size))
                if self.data.augment_on == "device":
                    problems.extend((f"data.{key}", message) for key, message in check_device_policy(self.data.augment))
            problems.extend(self._head_shape_problems())
        if self.pretrain.method == "simclr" and self.data.image_size >= min_size:
            policy = self.pretrain.view_policy(self.data.image_size, self.data.augment)
            offset = len(policy) - len(self.pretrain.augment)  # the crop (and flip) come first
            for key, message in check_policy(policy, self.data.image_size):
                index = int(key.split(".")[1]) - offset
                where = f"pretrain.augment.{index}" if index >= 0 else "pretrain.crop_scale"
                problems.append((where, message))
        if not self.phases:
            problems.append(("phases", "must list at least one phase"))
        names = [p.name for p in self.phases]
        for name in {n for n in names if names.count(n) > 1}:
            problems.append(("phases", f"phase name {name!r} is used twice"))
        return problems

    def _head_shape_problems(self) -> list[tuple[str, str]]:
        """The head's layers on the base's feature map at data.image_size (a kernel or pool that does not fit)."""
        if self.model.backbone not in BACKBONES:
            return []  # build_model names the unknown backbone
        side = feature_map_size(self.model.backbone, self.data.image_size)
        return [(f"model.head.{where}", f"{message} ({self.model.backbone} gives a {side}x{side} feature map at "
                                        f"data.image_size {self.data.image_size})")
                for where, message in head_shape_problems(self.model.head.layer_list(), side)]


def _backbone_min_size(backbone: str) -> int:
    """The backbone's smallest input side (32 for a name medtl does not know: build_model reports it)."""
    spec = BACKBONES.get(backbone)
    return spec.min_size if spec else 32


# --------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    if hasattr(tp, "yaml_type"):
        return tp.yaml_type
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(tp: Any, raw: Any, key: str) -> Any:
    """Turn a YAML value into `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if hasattr(tp, "from_yaml"):
        return tp.from_yaml(raw, key)
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, raw, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if raw is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, raw, key)
    if origin is Literal:
        if raw not in typing.get_args(tp):
            raise ConfigError(f"'{key}' must be {_type_name(tp)}, got {raw!r}")
        return raw
    if origin is tuple:
        if not isinstance(raw, (list, tuple)):
            raise ConfigError(f"'{key}' must be {_type_name(tp)}, got {raw!r} ({type(raw).__name__})")
        inner = typing.get_args(tp)[0]
        return tuple(_convert(inner, item, f"{key}.{i}") for i, item in enumerate(raw))
    if tp is float:
        # YAML 1.1 reads 1e-3 (no dot) as a string; accept any number spelled as one.
        if isinstance(raw, bool):
            pass
        elif isinstance(raw, (int, float)):
            try:
                return float(raw)
            except OverflowError:  # an int with hundreds of digits
                raise ConfigError(f"'{key}' must be a number within float range, got {str(raw)[:20]}...") from None
        elif isinstance(raw, str):
            try:
                return float(raw)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
    elif tp is bool:
        if isinstance(raw, bool):
            return raw
    elif tp is str:
        if isinstance(raw, str):
            return raw
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"config field {key} has unsupported type {tp}")
    raise ConfigError(
        f"'{key}' must be {_type_name(tp)}, got {raw!r} ({type(raw).__name__})"
    )


def _from_dict(cls: type, raw: Any, prefix: str) -> Any:
    where = f"'{prefix}'" if prefix else "the config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {raw!r} ({type(raw).__name__})")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if hasattr(cls, "check_raw"):
        cls.check_raw(raw, prefix)
    for name in raw:
        if name not in fields:
            key = f"{prefix}.{name}" if prefix else str(name)
            raise ConfigError(
                f"unknown key {key!r}; valid keys {('under ' + repr(prefix)) if prefix else 'at the top'}"
                f" are: {', '.join(sorted(fields))}"
            )
    values = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in raw:
            values[name] = _convert(hints[name], raw[name], key)
        elif f.default is _MISSING and f.default_factory is _MISSING:
            raise ConfigError(f"missing required key '{key}'")
    obj = cls(**values)
    check = getattr(obj, "check", None)
    for name, message in (check() if check else []):
        key = f"{prefix}.{name}" if prefix else name
        raise ConfigError(f"'{key}' {message}")
    return obj


def _field_type(cls: type, name: str) -> Any:
    return _hints(cls)[name]


def _apply_override(tree: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` to the raw YAML tree, checking the path exists in the schema."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set train.batch_size=16")
    dotted, _, text = assignment.partition("=")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    parts = dotted.strip().split(".")
    node: Any = tree
    tp: Any = Config
    for depth, part in enumerate(parts):
        here = ".".join(parts[: depth + 1])
        last = depth == len(parts) - 1
        if hasattr(tp, "from_yaml"):  # e.g. a head layer or a phase's trainable: one YAML value, not a mapping
            parent = ".".join(parts[:depth])
            raise ConfigError(f"--set {dotted}: '{parent}' is one value ({tp.yaml_type}); set it whole, "
                              f"e.g. --set '{parent}=...'")
        expected = list if typing.get_origin(tp) is tuple else dict
        if not isinstance(node, expected):
            raise ConfigError(f"--set {dotted}: '{'.'.join(parts[:depth])}' is not a "
                              f"{'list' if expected is list else 'mapping'} (it holds {node!r}); set it whole instead")
        if typing.get_origin(tp) is tuple:
            if not part.isdigit():
                raise ConfigError(f"--set {dotted}: '{here}' must be a list index (0, 1, ...)")
            index = int(part)
            if not isinstance(node, list) or index >= len(node):
                size = len(node) if isinstance(node, list) else 0
                raise ConfigError(
                    f"--set {dotted}: '{here}' does not exist; "
                    f"'{'.'.join(parts[:depth])}' has {size} entries"
                )
            tp = typing.get_args(tp)[0]
            if last:
                node[index] = value
            else:
                if node[index] is None:
                    node[index] = {}
                node = node[index]
            continue
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"--set {dotted}: '{'.'.join(parts[:depth])}' is not a mapping")
        valid = [f.name for f in dataclasses.fields(tp)]
        if part not in valid:
            raise ConfigError(
                f"--set {dotted}: unknown key {here!r}; valid keys"
                f"{' under ' + repr('.'.join(parts[:depth])) if depth else ''} are: {', '.join(sorted(valid))}"
            )
        tp = _field_type(tp, part)
        if last:
            node[part] = value
        else:
            child = node.get(part)
            if child is None:
                if typing.get_origin(tp) is tuple:
                    raise ConfigError(f"--set {dotted}: '{here}' is empty; set the whole list instead")
                child = node[part] = {}
            node = child


def load_config(path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = (),
                raw: dict | None = None) -> Config:
    """Load a job config from YAML (or a raw dict), apply `--set` overrides, validate."""
    tree: Any = {} if raw is None else raw
    if path is not None:
        path = jobfiles.resolve(path)  # jobs/X.yaml: the shipped copy when there is no such file here
        try:
            with open(path, encoding="utf-8") as fh:
                tree = yaml.safe_load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist; pick one from jobs/") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {path} is a folder; pass a YAML file") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}".splitlines()[0]) from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top, got {type(tree).__name__}")
    tree = _deepcopy(tree)
    for assignment in overrides:
        _apply_override(tree, assignment)
    try:
        return _from_dict(Config, tree, "")
    except ConfigError as exc:
        if path is not None:
            raise ConfigError(f"{path}: {exc}") from None
        raise


def with_absolute_paths(cfg: Config) -> Config:
    """`cfg` with local data.records and model.weights paths made absolute (the run folder may be read
    from another working directory)."""
    records = cfg.data.records
    if records and "://" not in records:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, records=os.path.abspath(records)))
    weights = cfg.model.weights
    if weights not in ("imagenet", "none") and "://" not in weights:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights=os.path.abspath(weights)))
    return cfg


def load_job_config(path: str | os.PathLike, overrides: typing.Sequence[str] = ()) -> Config:
    """A job config as the commands use it: loaded, overridden, validated, with absolute local paths."""
    return with_absolute_paths(load_config(path, overrides))


def _deepcopy(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _deepcopy(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_deepcopy(v) for v in node]
    return node


def to_tree(obj: Any) -> Any:
    """A config as plain YAML-able data (tuples become lists)."""
    if hasattr(obj, "to_yaml"):
        return obj.to_yaml()
    if dataclasses.is_dataclass(obj):
        return {f.name: to_tree(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_tree(v) for v in obj]
    return obj


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_tree(cfg), sort_keys=False)


def field_docs(cls: type = Config, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, default, comment) for every leaf field, read from this file's comments."""
    import inspect

    source = inspect.getsource(cls).splitlines()
    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in source:
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("# ").rstrip())
            continue
        match = re.match(r"(\w+):", stripped)
        if match and pending:
            comments[match.group(1)] = " ".join(pending)
        pending = []
    rows = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp) and not hasattr(tp, "from_yaml"):
            rows.extend(field_docs(tp, key + "."))
            continue
        if f.default is not _MISSING:
            default = to_tree(f.default)
        elif f.default_factory is not _MISSING:
            default = to_tree(f.default_factory())
        else:
            default = "(required)"
        inner = typing.get_args(tp)[0] if typing.get_origin(tp) is tuple else None
        if dataclasses.is_dataclass(inner) and not hasattr(inner, "from_yaml"):
            rows.append((key, "list of phases", [], comments.get(f.name, "")))
            rows.extend(field_docs(typing.get_args(tp)[0], key + "[]."))
            continue
        rows.append((key, _type_name(tp), default, comments.get(f.name, "")))
    return rows


def reference_markdown() -> str:
    """docs/config.md's reference table, generated from the field comments above."""
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key, type_name, default, comment in field_docs():
        shown = yaml.safe_dump(default, default_flow_style=True, width=10**6, sort_keys=False)
        shown = shown.strip().removesuffix("...").strip()
        lines.append(f"| `{key}` | {type_name} | `{shown}` | {comment} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m medtl.config  (prints docs/config.md's reference table)
    print(reference_markdown())
