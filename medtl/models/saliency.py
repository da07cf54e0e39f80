"""Grad-CAM (Selvaraju et al., 2017): where in the image each label's logit comes from.

The map is the "backbone" submodel's output, the last convolutional feature map that every backbone
medtl offers ends with. A label's channel weights are the spatial mean of its logit's gradient there;
the map is ReLU(sum of weighted channels), resized bilinearly to the input's pixels (each cell standing
for its share of the image, as Grad-CAM is usually drawn), scaled to [0, 1]. Float32 throughout, whatever the model's
precision (a mixed_float16 map is cast first).
"""
from __future__ import annotations

import numpy as np

from medtl.tf import tf

LAYER = "backbone"
# Heat below this fraction of a map's maximum stays transparent in an overlay: the image shows through.
OVERLAY_FLOOR = 0.1
# Opacity of the heat colour at the map's maximum.
OVERLAY_ALPHA = 0.6


def build_feature_models(model: tf.keras.Model) -> tuple[tf.keras.Model, tf.keras.Model]:
    """(images -> (batch, h, w, c) backbone feature map, that map -> (batch, L) logits), sharing the classifier's
    weights. The head is rebuilt on its own input so that a label's gradient is taken through the head alone:
    taken through the whole classifier, TensorFlow walked the backbone's ops for every label, which made an
    EfficientNetB0 export spend half its time tracing Grad-CAM."""
    base = model.get_layer(LAYER)
    # The classifier calls its base once: node 0 is that call, in the classifier's graph (the base's
    # own `.output` is the tensor inside the base).
    features = base.get_output_at(0)
    extractor = tf.keras.Model(model.inputs, features, name="medtl_gradcam_features")
    head_input = tf.keras.Input(features.shape[1:], dtype=features.dtype, name="feature_map")
    x, previous = head_input, base
    for layer in model.layers[model.layers.index(base) + 1:]:  # medtl's heads are a chain (models.heads)
        if layer.inbound_nodes[0].inbound_layers is not previous:
            raise ValueError(f"Grad-CAM needs a head that is a chain of layers after {LAYER!r}; "
                             f"{layer.name!r} does not take {previous.name!r}'s output")
        x, previous = layer(x), layer
    if previous.get_output_at(0) is not model.output:
        raise ValueError(f"Grad-CAM needs the classifier's output to be its last layer's, {previous.name!r}")
    return extractor, tf.keras.Model(head_input, x, name="medtl_gradcam_head")


def upsampling_matrix(cells: int, size: int) -> np.ndarray:
    """(size, cells) weights of the map's bilinear resize to `size` pixels (half-pixel centres: cell j
    stands for pixels [j, j + 1) x size / cells, as cv2.resize and tf.image.resize place it), held at the
    first and last cell beyond their centres."""
    a = size / cells
    u = np.clip((np.arange(size) + 0.5 - a / 2) / a, 0, cells - 1)
    low = np.floor(u).astype(int)
    high = np.minimum(low + 1, cells - 1)
    weights = np.zeros((size, cells), np.float32)
    np.add.at(weights, (np.arange(size), low), 1 - (u - low))
    np.add.at(weights, (np.arange(size), high), u - low)
    return weights


# --------------------------------------------------------------------------- Grad-CAM


class GradCam:
    """Grad-CAM maps of a Keras classifier: `GradCam(model)(images, tta)`."""

    def __init__(self, model: tf.keras.Model):
        self.extractor, self.head = build_feature_models(model)
        size = model.input_shape[1]
        _, h, w, _ = self.extractor.output.shape
        self.rows = tf.constant(upsampling_matrix(h, size))  # (size, h)
        self.columns = tf.constant(upsampling_matrix(w, size))  # (size, w)

    def _maps(self, images):
        """(batch, size, size, L) Grad-CAM maps at the input's pixels, before scaling."""
        raw, _ = raw_maps(self.extractor, self.head, images)
        return tf.einsum("yi,bijl,xj->byxl", self.rows, raw, self.columns)

    def __call__(self, images, tta: str = "none"):
        """(batch, size, size, c) images in [0, 255] -> (batch, size, size, L) float32 maps in [0, 1].

        With tta='flip' (the probabilities average an image and its mirror) the mirror's map, flipped
        back, is averaged in. A map that is 0 everywhere: no region raises that label's logit.
        """
        images = tf.convert_to_tensor(images, tf.float32)
        maps = self._maps(images)
        if tta == "flip":
            maps = (maps + tf.image.flip_left_right(self._maps(tf.image.flip_left_right(images)))) / 2.0
        peak = tf.reduce_max(maps, axis=[1, 2], keepdims=True)
        return tf.math.divide_no_nan(maps, peak)


def raw_maps(extractor: tf.keras.Model, head: tf.keras.Model, images):
    """(batch, h, w, L) float32 Grad-CAM maps on the feature map, before scaling, and (batch, L) logits."""
    features = extractor(images, training=False)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(features)
        logits = tf.cast(head(features, training=False), tf.float32)
        per_label = [logits[:, k] for k in range(logits.shape[-1])]
    maps = []
    for target in per_label:
        grads = tf.cast(tape.gradient(target, features), tf.float32)  # (batch, h, w, c)
        weights = tf.reduce_mean(grads, axis=[1, 2], keepdims=True)  # (batch, 1, 1, c)
        maps.append(tf.nn.relu(tf.reduce_sum(weights * tf.cast(features, tf.float32), axis=-1)))
    del tape
    return tf.stack(maps, axis=-1), logits


def build_gradcam_fn(model: tf.keras.Model, tta: str = "none"):
    """A tf.function images -> maps (see GradCam) for a Keras classifier."""
    cam = GradCam(model)
    return tf.function(lambda images: cam(images, tta), reduce_retracing=True)


def overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """(h, w) or (h, w, c) image in [0, 255] and (h, w) map in [0, 1] -> (h, w, 3) uint8 RGB overlay.

    The JET colour is blended in with an opacity that grows with the heat, so that where the map
    is below OVERLAY_FLOOR the pixel stays the image's own grey.
    """
    import cv2

    gray = image if image.ndim == 2 else image[..., 0]
    gray = np.clip(gray, 0, 255).astype(np.float32)
    heat = np.clip(np.nan_to_num(heat.astype(np.float32)), 0.0, 1.0)
    colour = cv2.applyColorMap(np.round(heat * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]  # BGR -> RGB
    alpha = OVERLAY_ALPHA * np.clip((heat - OVERLAY_FLOOR) / (1 - OVERLAY_FLOOR), 0.0, 1.0)[..., None]
    blended = (1 - alpha) * gray[..., None] + alpha * colour.astype(np.float32)
    return np.round(blended).astype(np.uint8)


def write_overlay_png(path: str, image: np.ndarray, heat: np.ndarray) -> None:
    import cv2

    if not cv2.imwrite(path, overlay(image, heat)[..., ::-1]):
        raise OSError(f"could not write {path}")
