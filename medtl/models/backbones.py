"""Keras application backbones: constructors, input preprocessing, minimum sizes, block structure.

Every backbone takes float images in [0, 255] (gray repeated to 3 channels when
needed); the per-family preprocessing runs inside the model, so an exported
model needs no outside knowledge of it.
"""
from __future__ import annotations

import os
import re
from medtl.errors import MedtlError
from medtl.models import basefile
from medtl.models.specs import BACKBONES, BackboneSpec, get_spec  # noqa: F401  (re-exported)
from medtl.tf import tf


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
        basefile.check_fits(weights, spec.name, channels, image_size)  # a pretrained base's sidecar, when it has one
        base = constructor(include_top=False, weights=None, input_shape=shape, **kwargs)
        try:
            base.load_weights(weights)
        except OSError as exc:  # h5py: a truncated or corrupt file
            raise basefile.damaged(weights, exc) from None
        except Exception as exc:
            raise MedtlError(
                f"weights file {weights} does not fit {spec.name} at {shape}: {str(exc).splitlines()[0][:200]}. "
                "It must hold the base (include_top=False) of the same backbone and channel count."
            ) from None
    return tf.keras.Model(base.inputs, base.outputs, name="backbone")


def block_groups(base: tf.keras.Model, backbone: str) -> list[list[tf.keras.layers.Layer]]:
    """The base's layers grouped into blocks, bottom to top.

    The stem (layers before the first block) is group 0; layers after the last block (e.g.
    EfficientNet's top_conv/top_bn, InceptionResNetV2's conv_7b) join the last block. A layer the
    spec's block regex does not match belongs to the block before it, or with unmatched "next"
    (Inception) to the block after it (see BackboneSpec.unmatched).
    """
    spec = get_spec(backbone)
    pattern = re.compile(spec.block_regex)
    layers = [layer for layer in base.layers if not isinstance(layer, tf.keras.layers.InputLayer)]
    keys = [(lambda m: m.group(1) if m else None)(pattern.match(layer.name)) for layer in layers]
    if spec.unmatched == "next":
        keys = _keys_from_next(layers, keys)
    groups: list[list] = [[]]
    previous: list = [None]
    for layer, key in zip(layers, keys):
        if key is not None and key != previous[-1]:
            groups.append([])
            previous.append(key)
        groups[-1].append(layer)
    return groups


def _keys_from_next(layers: list, keys: list) -> list:
    """Unmatched layers take the block key of the next matched one (the last block's after it), except the
    stem: the layers up to the last one before the first block whose output feeds two or more layers."""
    matched = [i for i, key in enumerate(keys) if key is not None]
    if not matched:
        return keys
    first = matched[0]
    forks = [i for i in range(first) if len(layers[i].outbound_nodes) > 1]
    stem_end = forks[-1] if forks else first - 1
    resolved, following = list(keys), keys[matched[-1]]
    for i in range(len(keys) - 1, stem_end, -1):
        if keys[i] is None:
            resolved[i] = following
        else:
            following = keys[i]
    return resolved


def batch_norm_statistics(model: tf.keras.Model) -> list:
    """The moving means and variances of the base's BatchNorm layers that train (train_batch_norm): each rank
    updates its own from its own batches, unlike the weights, whose gradients are averaged."""
    layers = [layer for layer in model.get_layer("backbone").layers
              if isinstance(layer, tf.keras.layers.BatchNormalization) and layer.trainable]
    return [v for layer in layers for v in (layer.moving_mean, layer.moving_variance)]
