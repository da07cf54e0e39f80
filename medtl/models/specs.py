"""The backbones medtl knows, as plain data: name, preprocessing, minimum size, block structure.

Kept apart from backbones.py (which builds them with TensorFlow) so that config.py can check
`data.image_size` against a backbone's minimum without importing TensorFlow.
"""
from __future__ import annotations

from dataclasses import dataclass

from medtl.errors import MedtlError


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
