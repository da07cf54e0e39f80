"""Keras application backbones: constructors, input preprocessing, minimum sizes, block structure.

Every backbone takes float images in [0, 255] (gray repeated to 3 channels when
needed); the per-family preprocessing runs inside the model, so an exported
model needs no outside knowledge of it.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from medtl.errors import MedtlError
from medtl.tf import tf


@dataclass(frozen=True)
class BackboneSpec:
    # Name of the tf.keras.applications constructor.
    name: str
    # Preprocessing the backbone expects on [0, 255] input: "none" when it is built in.
    preprocess: str
    # Smallest input side the architecture accepts.
    min_size: int
    # Regex whose first group names the block a layer belongs to (ordered bottom to top).
    block_regex: str
    # Extra constructor arguments.
    kwargs: tuple = ()


def _family(names, preprocess, min_size, block_regex, kwargs=()):
    return {n: BackboneSpec(n, preprocess, min_size, block_regex, kwargs) for n in names}


BACKBONES: dict[str, BackboneSpec] = {
    # EfficientNet: block1a..block7x; blocks are numbered groups, top_* layers sit above block7.
    **_family([f"EfficientNetB{i}" for i in range(8)], "none", 32, r"^block(\d)"),
    **_family(["EfficientNetV2B0", "EfficientNetV2B1", "EfficientNetV2B2", "EfficientNetV2B3",
               "EfficientNetV2S", "EfficientNetV2M", "EfficientNetV2L"], "none", 32, r"^block(\d)",
              (("include_preprocessing", True),)),
    # ResNet: conv1 is the stem; blocks are the stages conv2_* .. conv5_*.
    **_family(["ResNet50", "ResNet101", "ResNet152"], "caffe", 32, r"^conv([2-5])_"),
    **_family(["ResNet50V2", "ResNet101V2", "ResNet152V2"], "tf", 32, r"^conv([2-5])_"),
    # DenseNet: conv2_block* .. conv5_block*, pool2..pool4 transitions.
    **_family(["DenseNet121", "DenseNet169", "DenseNet201"], "torch", 32, r"^(?:conv|pool)(\d)_"),
    # MobileNetV2: block_1 .. block_16.
    **_family(["MobileNetV2"], "tf", 32, r"^block_(\d+)_"),
    # MobileNetV3: expanded_conv, expanded_conv_1 .. expanded_conv_N; preprocessing built in.
    **_family(["MobileNetV3Small", "MobileNetV3Large"], "none", 32, r"^(expanded_conv(?:_\d+)?)/",
              (("include_preprocessing", True),)),
    # ConvNeXt: stages 0..3.
    **_family(["ConvNeXtTiny", "ConvNeXtSmall", "ConvNeXtBase"], "none", 32,
              r"^convnext_\w+_stage_(\d)"),
}


def get_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        close = [n for n in BACKBONES if n.lower() == name.lower()]
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise MedtlError(
            f"unknown backbone {name!r}{hint}; choose one of: {', '.join(BACKBONES)}"
        )
    return BACKBONES[name]


@tf.keras.utils.register_keras_serializable(package="medtl")
class Preprocess(tf.keras.layers.Layer):
    """Maps [0, 255] images to what a backbone family expects (caffe, tf or torch style)."""

    _MEAN = {"caffe": (103.939, 116.779, 123.68), "torch": (0.485, 0.456, 0.406)}
    _STD = {"torch": (0.229, 0.224, 0.225)}

    def __init__(self, mode: str = "none", **kwargs):
        super().__init__(**kwargs)
        self.mode = mode

    def call(self, x):  # (batch, h, w, c) in [0, 255]
        channels = x.shape[-1]
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            mean, std = self._MEAN["torch"], self._STD["torch"]
            if channels == 1:
                mean, std = (sum(mean) / 3,), (sum(std) / 3,)
            return (x / 255.0 - tf.constant(mean, x.dtype)) / tf.constant(std, x.dtype)
        if self.mode == "caffe":
            mean = self._MEAN["caffe"]
            if channels == 1:
                return x - tf.constant(sum(mean) / 3, x.dtype)
            return x[..., ::-1] - tf.constant(mean, x.dtype)  # RGB -> BGR, as trained
        return x

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def _weights_file_missing(spec: BackboneSpec, exc: Exception) -> MedtlError:
    match = re.search(r"(https?://\S+?)(?::|\s|$)", str(exc))
    url = match.group(1) if match else ""
    fname = url.rsplit("/", 1)[-1] if url else f"the {spec.name} notop weights file"
    cache = os.path.join(os.path.expanduser("~"), ".keras", "models")
    return MedtlError(
        f"ImageNet weights for {spec.name} are not in the Keras cache ({os.path.join(cache, fname)}) and "
        f"cannot be downloaded ({str(exc).splitlines()[0][-80:]}). Copy {fname} into {cache} from a machine "
        "with internet, or set model.weights to a local .h5 file, or to none."
    )


def build_backbone(name: str, weights: str, image_size: int, channels: int) -> tf.keras.Model:
    """The base network without its classifier, named 'backbone'. weights: imagenet, none or a path."""
    spec = get_spec(name)
    constructor = getattr(tf.keras.applications, spec.name)
    kwargs = dict(spec.kwargs)
    shape = (image_size, image_size, channels)
    if weights == "imagenet":
        if channels != 3:
            raise MedtlError("model.weights=imagenet needs data.channels=3 (ImageNet bases take RGB)")
        try:
            base = constructor(include_top=False, weights="imagenet", input_shape=shape, **kwargs)
        except Exception as exc:
            if "URL fetch failure" in str(exc) or "Errno" in str(exc) or "HTTP" in str(exc):
                raise _weights_file_missing(spec, exc) from None
            raise
    elif weights == "none":
        base = constructor(include_top=False, weights=None, input_shape=shape, **kwargs)
    else:
        if not os.path.isfile(weights):
            raise MedtlError(
                f"weights file {weights} does not exist; set model.weights to an existing .h5 file, "
                "imagenet, or none"
            )
        base = constructor(include_top=False, weights=None, input_shape=shape, **kwargs)
        try:
            base.load_weights(weights)
        except Exception as exc:
            raise MedtlError(
                f"weights file {weights} does not fit {spec.name} at {shape}: {str(exc).splitlines()[0][:200]}. "
                "It must hold the base (include_top=False) of the same backbone and channel count."
            ) from None
    return tf.keras.Model(base.inputs, base.outputs, name="backbone")


def block_groups(base: tf.keras.Model, backbone: str) -> list[list[tf.keras.layers.Layer]]:
    """The base's layers grouped into blocks, bottom to top.

    The stem (layers before the first block) is group 0; layers after the last
    block (e.g. EfficientNet's top_conv/top_bn) join the last block.
    """
    pattern = re.compile(get_spec(backbone).block_regex)
    groups: list[list] = [[]]
    keys: list = [None]
    for layer in base.layers:
        if isinstance(layer, tf.keras.layers.InputLayer):
            continue
        match = pattern.match(layer.name)
        key = match.group(1) if match else None
        if key is not None and key != keys[-1]:
            groups.append([])
            keys.append(key)
        groups[-1].append(layer)
    return groups
