"""The backbones medtl knows, as plain data: name, preprocessing, minimum size, block structure,
and the arithmetic of their downsampling.

Kept apart from backbones.py (which builds them with TensorFlow) so that config.py can check
`data.image_size` and the head's shapes against a backbone without importing TensorFlow.
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
    # The layers that change the spatial size, bottom to top, as (kernel, stride, padding): "same"
    # gives ceil(h / stride) (Keras' same padding, and the explicit correct_pad zero padding of
    # EfficientNet/MobileNet/ResNet stems), "valid" gives (h - kernel) // stride + 1.
    downsampling: tuple[tuple[int, int, str], ...]
    # Extra constructor arguments.
    kwargs: tuple = ()
    # Where a layer the regex does not match belongs: "previous", the block before it (the stem if
    # none; names carry their block, as EfficientNet's block6a_...), or "next", the block after it
    # (the last block if none): Inception's layers are auto-named (conv2d_57) and a named
    # concatenation (mixed7) ends each block. The stem is then the layers up to the last one whose
    # output feeds two or more layers (the fork into the first block's branches).
    unmatched: str = "previous"


def _family(names, preprocess, min_size, block_regex, downsampling, kwargs=(), unmatched="previous"):
    return {n: BackboneSpec(n, preprocess, min_size, block_regex, downsampling, kwargs, unmatched) for n in names}


_SAME_X32 = ((3, 2, "same"),) * 5  # five stride-2 stages, each rounding up: ceil(h / 32)
# InceptionV3 / InceptionResNetV2: valid 3x3 convs and pools; stride 2 at the stem (3 times) and at
# the two reduction blocks (mixed3 / mixed_6a, mixed8 / mixed_7a). 299 px -> 8, 75 px -> 1.
_INCEPTION = ((3, 2, "valid"), (3, 1, "valid"), (3, 2, "valid"), (3, 1, "valid"), (3, 2, "valid"),
              (3, 2, "valid"), (3, 2, "valid"))

BACKBONES: dict[str, BackboneSpec] = {
    # EfficientNet: block1a..block7x; blocks are numbered groups, top_* layers sit above block7.
    **_family([f"EfficientNetB{i}" for i in range(8)], "none", 32, r"^block(\d)", _SAME_X32),
    **_family(["EfficientNetV2B0", "EfficientNetV2B1", "EfficientNetV2B2", "EfficientNetV2B3",
               "EfficientNetV2S", "EfficientNetV2M", "EfficientNetV2L"], "none", 32, r"^block(\d)", _SAME_X32,
              (("include_preprocessing", True),)),
    # ResNet: conv1 is the stem; blocks are the stages conv2_* .. conv5_*.
    **_family(["ResNet50", "ResNet101", "ResNet152"], "caffe", 32, r"^conv([2-5])_", _SAME_X32),
    **_family(["ResNet50V2", "ResNet101V2", "ResNet152V2"], "tf", 32, r"^conv([2-5])_", _SAME_X32),
    # DenseNet: conv2_block* .. conv5_block*, pool2..pool4 transitions (2x2 average pools, rounding down).
    **_family(["DenseNet121", "DenseNet169", "DenseNet201"], "torch", 32, r"^(?:conv|pool)(\d)_",
              ((7, 2, "same"), (3, 2, "same"), (2, 2, "valid"), (2, 2, "valid"), (2, 2, "valid"))),
    # MobileNetV2: block_1 .. block_16.
    **_family(["MobileNetV2"], "tf", 32, r"^block_(\d+)_", _SAME_X32),
    # MobileNetV3: expanded_conv, expanded_conv_1 .. expanded_conv_N; preprocessing built in.
    **_family(["MobileNetV3Small", "MobileNetV3Large"], "none", 32, r"^(expanded_conv(?:_\d+)?)/", _SAME_X32,
              (("include_preprocessing", True),)),
    # ConvNeXt: stages 0..3; a 4x4 stride-4 stem and 2x2 stride-2 downsampling, all valid: floor(h / 32).
    **_family(["ConvNeXtTiny", "ConvNeXtSmall", "ConvNeXtBase"], "none", 32, r"^convnext_\w+_stage_(\d)",
              ((4, 4, "valid"), (2, 2, "valid"), (2, 2, "valid"), (2, 2, "valid"))),
    # InceptionV3: the stem, then the 11 modules mixed0 .. mixed10 (each ends at its concatenation;
    # mixed9_0 and mixed9_1 are concatenations inside mixed9 and mixed10).
    **_family(["InceptionV3"], "tf", 75, r"^(mixed\d+)$", _INCEPTION, unmatched="next"),
    # InceptionResNetV2: the stem, mixed_5b, block35_1..10, mixed_6a, block17_1..20, mixed_7a,
    # block8_1..10 (conv_7b, the top 1x1 conv, joins block8_10): 43 blocks.
    **_family(["InceptionResNetV2"], "tf", 75, r"^(mixed_\d[ab]|block\d+_\d+)(?:_|$)", _INCEPTION, unmatched="next"),
    # Xception: block1 (two plain convs) is the stem; blocks 2..14, each with its residual 1x1 conv.
    # Two valid 3x3 convs (the first stride 2), then four stride-2 same-padded max pools.
    **_family(["Xception"], "tf", 71, r"^block([2-9]|1[0-4])_",
              ((3, 2, "valid"), (3, 1, "valid")) + ((3, 2, "same"),) * 4),
}


def get_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        close = [n for n in BACKBONES if n.lower() == name.lower()]
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise MedtlError(
            f"unknown backbone {name!r}{hint}; choose one of: {', '.join(BACKBONES)}"
        )
    return BACKBONES[name]


def spatial_size(side: int, kernel: int, stride: int, padding: str) -> int:
    """The output side of a conv or pool (Keras' rounding) on a side x side input; 0 or less if it does not fit."""
    if padding == "same":
        return -(-side // stride)
    return (side - kernel) // stride + 1


def feature_map_size(backbone: str, image_size: int) -> int:
    """The side of the base's output feature map for a square input (EfficientNetB4 at 380 px: 12)."""
    side = image_size
    for kernel, stride, padding in get_spec(backbone).downsampling:
        side = spatial_size(side, kernel, stride, padding)
    return side
