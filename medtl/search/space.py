"""The head search space (jobs/search/*.yaml): each key lists the choices of one head setting.

A space file is a mapping of dimension -> list of choices, e.g.

    pooling: [avg, max]
    conv_filters: [0, 64]          # 0 = no 1x1 conv before pooling
    dense: [[], [100], [512, 64]]  # inner dense layers: their sizes, hence their count
    dropout: [0.0, 0.3]
    activation: [relu]
    learning_rate: [1.0e-3]
    loss: [bce]

or, over layer lists (model.head.layers; docs/training.md, Heads), a mapping of named heads:

    heads:
      gap_512: [{global_pool: avg}, {dense: 512}, {dropout: 0.5}]
      conv_pool: [{conv: {filters: 448, activation: linear}}, {max_pool: 2}, {global_pool: avg}, {dense: 112}]
    learning_rate: [1.0e-3, 3.0e-4]

`heads` combines with learning_rate and loss, not with the short-form keys (a layer list fixes its
own pooling, dense layers and dropout). A dimension left out keeps the base job config's value.
Every head of the space is one combination of choices; `Head` turns a combination into the config
fields it sets.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import re
import typing
from dataclasses import dataclass, field

import yaml

from medtl.config import HeadConfig, HeadLayer, LossConfig, head_shape_problems
from medtl.errors import ConfigError
from medtl.models.specs import feature_map_size

POOLINGS = typing.get_args(typing.get_type_hints(HeadConfig)["pooling"])
ACTIVATIONS = typing.get_args(typing.get_type_hints(HeadConfig)["activation"])
LOSSES = typing.get_args(typing.get_type_hints(LossConfig)["name"])
SHORT_FORM = HeadConfig.SHORT_FORM  # the dimensions of a short-form head
DIMENSIONS = (*SHORT_FORM, "heads", "learning_rate", "loss")


def _dense_label(sizes: tuple[int, ...]) -> str:
    """Inner dense sizes as an Optuna-friendly choice: (512, 64) -> '512-64', () -> 'none'."""
    return "-".join(str(s) for s in sizes) if sizes else "none"


def _dense_sizes(label: str) -> tuple[int, ...]:
    return () if label == "none" else tuple(int(s) for s in label.split("-"))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_choice(key: str, index: int, value):
    """One choice of `key`, validated and in the form Optuna stores (str, int, float or bool)."""
    where = f"'{key}.{index}'"
    if key == "pooling":
        if value not in POOLINGS:
            raise ConfigError(f"{where}: unknown pooling {value!r}; valid values are: {', '.join(POOLINGS)}")
        return value
    if key == "activation":
        if value not in ACTIVATIONS:
            raise ConfigError(f"{where}: unknown activation {value!r}; valid values are: {', '.join(ACTIVATIONS)}")
        return value
    if key == "loss":
        if value not in LOSSES:
            raise ConfigError(f"{where}: unknown loss {value!r}; valid values are: {', '.join(LOSSES)}")
        return value
    if key == "conv_filters":
        if not _is_int(value) or value < 0:
            raise ConfigError(f"{where} must be an int >= 0 (0 = no 1x1 conv), got {value!r}")
        return value
    if key == "dense":
        if not isinstance(value, list) or not all(_is_int(u) and u >= 1 for u in value):
            raise ConfigError(f"{where} must be a list of layer sizes >= 1 (e.g. [512] or [] for none), got {value!r}")
        return _dense_label(tuple(value))
    if key == "dropout":
        if not _is_number(value) or not 0 <= value < 1:
            raise ConfigError(f"{where} must be a number in [0, 1), got {value!r}")
        return float(value)
    if key == "learning_rate":
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if not _is_number(value) or not value > 0:
            raise ConfigError(f"{where} must be a number > 0, got {value!r}")
        return float(value)
    if key == "batch_norm":
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    raise AssertionError(key)  # pragma: no cover


@dataclass(frozen=True)
class Head:
    """One head of the space: the config values a trial trains with."""

    head: HeadConfig
    learning_rate: float
    loss: str

    def key(self) -> str:
        """A stable name of the head (seeds its initialisation; same head, same start)."""
        h = self.head
        if h.layers:  # the layer sequence itself, so the same list under another name is the same head
            return f"layers={h.describe()},lr={self.learning_rate:g},loss={self.loss}"
        return (f"pool={h.pooling},conv={h.conv_filters},dense={_dense_label(h.dense)},dropout={h.dropout:g},"
                f"act={h.activation},bn={h.batch_norm},lr={self.learning_rate:g},loss={self.loss}")


@dataclass(frozen=True)
class SearchSpace:
    # dimension -> its choices (only dimensions with two or more choices are searched)
    choices: dict[str, tuple]
    # the named layer lists a `heads` dimension chooses from (empty for a short-form space)
    head_lists: dict[str, tuple[HeadLayer, ...]] = field(default_factory=dict)

    @property
    def searched(self) -> dict[str, tuple]:
        return {k: v for k, v in self.choices.items() if len(v) > 1}

    @property
    def size(self) -> int:
        return math.prod(len(v) for v in self.choices.values())

    @property
    def uses_conv(self) -> bool:
        if self.head_lists:
            return any(layer.kind == "conv" for layers in self.head_lists.values() for layer in layers)
        return any(f > 0 for f in self.choices["conv_filters"])

    def grid(self) -> list[dict]:
        """Every head's searched parameters, in a fixed order."""
        keys = list(self.searched)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(self.searched[k] for k in keys))]

    def head(self, params: dict) -> Head:
        """The head for a trial's parameters (unsearched dimensions take their single choice)."""
        value = {k: params.get(k, v[0]) for k, v in self.choices.items()}
        if "heads" in value:
            head = HeadConfig(layers=self.head_lists[value["heads"]])
        else:
            head = HeadConfig(pooling=value["pooling"], conv_filters=int(value["conv_filters"]),
                              dense=_dense_sizes(value["dense"]), activation=value["activation"],
                              dropout=float(value["dropout"]), batch_norm=bool(value["batch_norm"]))
        return Head(head, float(value["learning_rate"]), value["loss"])

    def fingerprint(self) -> dict:
        """The choices, with each named head's layers: a study resumes only the same space."""
        found = {k: list(v) for k, v in self.choices.items()}
        if self.head_lists:
            found["head_layers"] = {name: HeadConfig(layers=layers).describe()
                                    for name, layers in self.head_lists.items()}
        return found


def defaults_from(head: HeadConfig, learning_rate: float, loss: str) -> SearchSpace:
    """The base job config's head as a space of one head: what a space's left-out dimensions keep."""
    tail = {"learning_rate": (learning_rate,), "loss": (loss,)}
    if head.layers:
        return SearchSpace({"heads": ("config",), **tail}, {"config": head.layers})
    return SearchSpace({"pooling": (head.pooling,), "conv_filters": (head.conv_filters,),
                        "dense": (_dense_label(head.dense),), "dropout": (head.dropout,),
                        "activation": (head.activation,), "batch_norm": (head.batch_norm,), **tail})


def parse_space(raw, defaults: SearchSpace, source: str = "the search space") -> SearchSpace:
    """Validate a space mapping; `defaults` (defaults_from the base config) fill the dimensions left out."""
    if raw is None or raw == {}:
        raise ConfigError(f"{source} is empty; list choices for some of: {', '.join(DIMENSIONS)}")
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must be a mapping of dimension -> list of choices, got {type(raw).__name__}")
    for key in raw:
        if key not in DIMENSIONS:
            raise ConfigError(f"unknown key '{key}' in {source}; valid keys are: {', '.join(DIMENSIONS)}")
    short = [k for k in raw if k in SHORT_FORM]
    if "heads" in raw and short:
        raise ConfigError(f"{source} has both heads and {', '.join(short)}: a named head's layer list sets its own "
                          "pooling, dense layers and dropout; list the variants as more heads")
    if short and defaults.head_lists:
        raise ConfigError(f"{source} lists {', '.join(short)} (short-form head settings) but the job config's "
                          "model.head is a layer list; list layer lists under heads: instead")
    choices, head_lists = dict(defaults.choices), dict(defaults.head_lists)
    if "heads" in raw:
        head_lists = _parse_heads(raw["heads"], source)
        choices = {"heads": tuple(head_lists), "learning_rate": choices["learning_rate"], "loss": choices["loss"]}
    for key, values in raw.items():
        if key == "heads":
            continue
        if not isinstance(values, list):
            raise ConfigError(f"'{key}' in {source} must be a list of choices, e.g. {key}: [{_example(key)}], "
                              f"got {values!r} ({type(values).__name__})")
        if not values:
            raise ConfigError(f"'{key}' in {source} has no choices; list at least one, or leave the key out")
        checked = tuple(_check_choice(key, i, v) for i, v in enumerate(values))
        if len(set(checked)) != len(checked):
            raise ConfigError(f"'{key}' in {source} lists a choice twice: {values!r}")
        choices[key] = checked
    return SearchSpace(choices, head_lists)


def _parse_heads(raw, source: str) -> dict[str, tuple[HeadLayer, ...]]:
    """`heads: {name: [layer, ...], ...}`: each list parsed and ordered as model.head.layers is."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"'heads' in {source} must be a mapping of head name -> layer list, e.g. heads: "
                          f"{{gap_512: [{{global_pool: avg}}, {{dense: 512}}]}}; got {raw!r}")
    lists, seen = {}, {}
    for name, layers in raw.items():
        where = f"'heads.{name}' in {source}"
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ConfigError(f"{where}: a head name is letters, digits, '_', '.' or '-', got {name!r}")
        if not isinstance(layers, list) or not layers:
            raise ConfigError(f"{where} must be a non-empty list of layers, e.g. [{{global_pool: avg}}, "
                              f"{{dense: 512}}]; got {layers!r}")
        try:
            parsed = tuple(HeadLayer.from_yaml(layer, f"heads.{name}.{i}") for i, layer in enumerate(layers))
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        for index, message in head_shape_problems(parsed, None):
            raise ConfigError(f"{source}: 'heads.{name}.{index.split('.')[1]}' {message}")
        described = HeadConfig(layers=parsed).describe()
        if described in seen:
            raise ConfigError(f"{where} is the same layer list as 'heads.{seen[described]}'; list each head once")
        lists[name], seen[described] = parsed, name
    return lists


def check_heads_fit(space: SearchSpace, backbone: str, image_size: int, source: str) -> None:
    """Every named head's layers fit the base's feature map at the job's image size (as config load checks
    model.head)."""
    side = feature_map_size(backbone, image_size)
    for name, layers in space.head_lists.items():
        for index, message in head_shape_problems(layers, side):
            raise ConfigError(f"{source}: 'heads.{name}.{index.split('.')[1]}' {message} ({backbone} gives a "
                              f"{side}x{side} feature map at data.image_size {image_size})")


def _example(key: str) -> str:
    return {"pooling": "avg, max", "conv_filters": "0, 64", "dense": "[], [512]", "dropout": "0.0, 0.3",
            "activation": "relu, swish", "batch_norm": "false, true", "learning_rate": "1.0e-3",
            "loss": "bce, focal"}[key]


def load_space(path: str, defaults: SearchSpace) -> SearchSpace:
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"search space file {path} does not exist; see jobs/search/heads.yaml") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"search space file {path} is not valid YAML: {exc}".splitlines()[0]) from None
    return parse_space(raw, defaults, source=path)


def with_head(cfg, head: Head):
    """The job config training `head` in phase 1 (other phases as in cfg)."""
    first = dataclasses.replace(cfg.phases[0], learning_rate=head.learning_rate)
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, head=head.head), phases=(first, *cfg.phases[1:]),
        train=dataclasses.replace(cfg.train, loss=dataclasses.replace(cfg.train.loss, name=head.loss)))
