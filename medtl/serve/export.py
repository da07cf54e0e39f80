"""`medtl export`: a run's best model as a TensorFlow SavedModel that carries everything serving needs.

Signatures (all return {'probabilities': (batch, L) float32, 'decisions': (batch, L) int32 0/1,
'uncalibrated_probabilities': the model's own before evaluate.calibration's map}):
  serving_default / predict_bytes  image_bytes: (batch,) string, encoded PNG (8/16-bit) or JPEG
  predict_images                   images: (batch, size, size, channels) float32 in [0, 255]
  metadata                         label_names, thresholds, image sizes, bit depth, aspect policy
  saliency_images / saliency_bytes the same inputs; adds 'saliency': (batch, size, size, L) float32 Grad-CAM
                                   maps in [0, 1] (medtl.models.saliency), and for bytes 'images', the
                                   decoded model input the maps lie over
Bytes in the stored format (what `medtl predict` sends: the ingest decode path, resized
to the stored size, PNG at the stored bit depth) go through exactly the training
pipeline's steps. Other sizes are first brought to the stored size with the aspect
policy in TensorFlow, which is close to but not bit-identical with ingest's OpenCV path.
assets/medtl_export.json holds the same metadata, the thresholds' provenance, the calibration and the
config (medtl.serve.meta owns that file); MODEL_CARD.md and MODEL_CARD.json beside saved_model.pb are
medtl.serve.card's. The export is recorded in the run folder, whose index.html links its card.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import shutil

import numpy as np

from medtl import dist
from medtl.data.pipeline import build_resize_fn, decode_stored_png
from medtl.errors import MedtlError, RunFailure
from medtl.evaluate import calibration as cal
from medtl.evaluate.checks import read_run_inputs
from medtl.evaluate.report import read_summary
from medtl.evaluate.run import load_or_tune
from medtl.models.saliency import LAYER as GRADCAM_LAYER
from medtl.models.saliency import GradCam, build_gradcam_fn
from medtl.serve import card as model_card
from medtl.serve.meta import META_FILE, ExportMeta, load_savedmodel, write_meta
from medtl.tf import tf
from medtl.train.rundir import Calibration, RunDir, RunOutput, load_run
from medtl.utils.log import log


def _to_stored_size(image, stored_size: int, aspect: str, bit_depth: int):
    """(h, w, 1) in [0, 255] of any size -> (stored, stored, 1), quantised like ingest stores it."""
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    if aspect == "crop":
        side = tf.minimum(h, w)
        image = tf.image.crop_to_bounding_box(image, (h - side) // 2, (w - side) // 2, side, side)
    elif aspect == "pad":
        side = tf.maximum(h, w)
        image = tf.image.pad_to_bounding_box(image, (side - h) // 2, (side - w) // 2, side, side)
    shrinking = tf.shape(image)[0] > stored_size
    image = tf.cond(shrinking, lambda: tf.image.resize(image, (stored_size, stored_size), method="area"),
                    lambda: tf.image.resize(image, (stored_size, stored_size), method="bicubic"))
    top = float((1 << bit_depth) - 1)
    return tf.round(tf.clip_by_value(image, 0.0, 255.0) * (top / 255.0)) * (255.0 / top)


def _logit(p):
    p = tf.clip_by_value(p, cal.LOW, cal.HIGH)
    return tf.math.log(p) - tf.math.log1p(-p)


def _label_map(params: dict):
    """One label's calibration map in TensorFlow: medtl.evaluate.calibration.apply_label's formulas."""
    if not params:
        return lambda p: p
    if "temperature" in params:
        return lambda p: tf.sigmoid(_logit(p) / params["temperature"])
    if "slope" in params:
        return lambda p: tf.sigmoid(params["slope"] * _logit(p) + params["intercept"])
    xs, ys = params["x"], params["y"]
    if len(xs) == 1:
        return lambda p: tf.fill(tf.shape(p), tf.constant(ys[0], tf.float32))

    def interpolate(p):  # linear between the points, constant outside them (np.interp)
        x, y = tf.constant(xs, tf.float32), tf.constant(ys, tf.float32)
        p = tf.clip_by_value(p, xs[0], xs[-1])
        right = tf.clip_by_value(tf.searchsorted(x, p, side="right"), 1, len(xs) - 1)
        x0, x1, y0, y1 = (tf.gather(v, i) for v, i in ((x, right - 1), (x, right), (y, right - 1), (y, right)))
        return y0 + (p - x0) / (x1 - x0) * (y1 - y0)

    return interpolate


def calibrate_fn(calibration: Calibration | None, label_names):
    """(batch, L) probabilities -> calibrated ones, label by label; the identity without a calibration."""
    if calibration is None:
        return lambda probs: probs
    maps = [_label_map(calibration.params(name)) for name in label_names]
    return lambda probs: tf.stack([m(probs[:, i]) for i, m in enumerate(maps)], axis=1)


class _Untracked:
    """Holds the Keras model out of the SavedModel's object graph (see ExportModule)."""

    def __init__(self, model: tf.keras.Model):
        self.model = model


class ExportModule(tf.Module):
    """The Keras classifier plus preprocessing, TTA, label names and thresholds.

    The SavedModel tracks the model's variables, not the Keras model: serving only needs the
    signatures, and tracking the model made tf.saved_model.save serialise every Keras layer and
    trace its gradients (an EfficientNetB0 run's export took 70 s on 2 cores, then 28 s, before Grad-CAM's
    signatures were added; docs/benchmarks.md has the figures since).
    """

    def __init__(self, model: tf.keras.Model, meta: ExportMeta, meta_path: str):
        super().__init__(name="medtl_export")
        self._keras = _Untracked(model)
        self.model_variables = list(model.variables)
        self.meta_asset = tf.saved_model.Asset(meta_path)
        self.label_names = tf.constant(meta.label_names)
        self.thresholds = tf.constant(meta.threshold_values, tf.float32)
        self._meta = meta
        self._calibrate = calibrate_fn(meta.calibration, meta.label_names)
        size, channels = meta.image_size, meta.channels
        self._resize_fn = build_resize_fn(meta.stored_image_size, size, channels)
        self.predict_images = tf.function(self._predict_images, input_signature=[
            tf.TensorSpec((None, size, size, channels), tf.float32, name="images")])
        self.predict_bytes = tf.function(self._predict_bytes, input_signature=[
            tf.TensorSpec((None,), tf.string, name="image_bytes")])
        self.metadata = tf.function(self._metadata, input_signature=[])
        self._add_saliency(model, size, channels)

    def _probabilities(self, images):  # (batch, size, size, c) -> (batch, L)
        model = self._keras.model
        probs = tf.sigmoid(tf.cast(model(images, training=False), tf.float32))
        if self._meta.tta == "flip":
            flipped = tf.sigmoid(tf.cast(model(tf.image.flip_left_right(images), training=False), tf.float32))
            probs = (probs + flipped) / 2.0
        return probs

    def _predict_images(self, images):
        raw = self._probabilities(images)
        probs = self._calibrate(raw)
        return {"probabilities": probs, "decisions": tf.cast(probs >= self.thresholds, tf.int32),
                "uncalibrated_probabilities": raw}

    def _decode_one(self, data):
        meta = self._meta
        stored, bit_depth = meta.stored_image_size, meta.bit_depth
        image = tf.cond(tf.io.is_jpeg(data),
                        lambda: tf.cast(tf.io.decode_jpeg(data, channels=1), tf.float32),
                        lambda: decode_stored_png(data, bit_depth))  # (h, w, 1) in [0, 255]
        shape = tf.shape(image)
        image = tf.cond(tf.logical_and(shape[0] == stored, shape[1] == stored), lambda: image,
                        lambda: _to_stored_size(image, stored, meta.aspect, bit_depth))
        return self._resize_fn(tf.ensure_shape(image, (stored, stored, 1)))

    def _decode_batch(self, image_bytes):  # (batch,) encoded -> (batch, size, size, c) model input
        size = self._meta.image_size
        spec = tf.TensorSpec((size, size, self._meta.channels), tf.float32)
        return tf.map_fn(self._decode_one, image_bytes, fn_output_signature=spec)

    # The byte and saliency signatures call the images signature's tf.function, whose input_signature the
    # decoded batch matches: the SavedModel then holds one trace of the model's forward pass for prediction
    # (a call to it from the others), not one per signature. Tracing was most of an export's time.
    def _predict_bytes(self, image_bytes):
        return self.predict_images(self._decode_batch(image_bytes))

    # ------------------------------------------------------------------ saliency (Grad-CAM)

    def _add_saliency(self, model: tf.keras.Model, size: int, channels: int) -> None:
        self._gradcam = _Untracked(GradCam(model))  # shares model_variables
        self.saliency_images = tf.function(self._saliency_images, input_signature=[
            tf.TensorSpec((None, size, size, channels), tf.float32, name="images")])
        self.saliency_bytes = tf.function(self._saliency_bytes, input_signature=[
            tf.TensorSpec((None,), tf.string, name="image_bytes")])

    def _saliency_images(self, images):
        return {"saliency": self._gradcam.model(images, self._meta.tta), **self.predict_images(images)}

    def _saliency_bytes(self, image_bytes):
        images = self._decode_batch(image_bytes)
        return {"images": images, **self.saliency_images(images)}

    def _metadata(self):
        m = self._meta
        return {"label_names": self.label_names, "thresholds": self.thresholds,
                "image_size": tf.constant(m.image_size), "channels": tf.constant(m.channels),
                "stored_image_size": tf.constant(m.stored_image_size), "bit_depth": tf.constant(m.bit_depth),
                "aspect": tf.constant(m.aspect), "tta": tf.constant(m.tta)}


def _check_out(out: str) -> None:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise MedtlError(f"export folder {out} already exists and is not empty; pick a new --out or remove it")


def export_run(workdir: str, out: str, overrides: list[str] | None = None, intended_use: str | None = None,
               limitations: tuple[str, ...] = ()) -> ExportMeta:
    """Write the SavedModel of a run (calibration and thresholds fitted on val first if missing) and its
    model card; returns the metadata."""
    _check_out(out)
    cfg, manifest = read_run_inputs(workdir, overrides or [], None)
    ctx = dist.init()
    _, _, model = load_run(workdir)
    run = RunDir(workdir, ctx.primary)
    thresholds, calibration = load_or_tune(run, cfg, manifest, model, ctx)
    meta = _with_saliency_and_internal_test(ExportMeta.build(cfg, manifest, thresholds, run.read_history(),
                                                             calibration), run)
    if not ctx.primary:
        return meta
    staging = os.path.join(os.path.dirname(os.path.abspath(out)), f".{os.path.basename(out)}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    meta_path = os.path.join(staging, META_FILE)
    write_meta(meta_path, meta)
    module = ExportModule(model, meta, meta_path)
    tf.saved_model.save(module, os.path.join(staging, "model"), signatures={
        "serving_default": module.predict_bytes, "predict_bytes": module.predict_bytes,
        "predict_images": module.predict_images, "metadata": module.metadata,
        "saliency_images": module.saliency_images, "saliency_bytes": module.saliency_bytes},
        # Serving never differentiates the signatures (Grad-CAM's gradients are inside them); tracing the
        # gradients of tf.custom_gradient ops (EfficientNet's swish) took about a fifth of an export's time.
        options=tf.saved_model.SaveOptions(experimental_custom_gradients=False))
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(os.path.join(staging, "model")):
        os.replace(os.path.join(staging, "model", name), os.path.join(out, name))
    shutil.rmtree(staging, ignore_errors=True)
    _verify(out, model, meta)
    card = write_model_card(run, out, meta, manifest, cfg.evaluate.subgroup_min_patients, intended_use, limitations)
    log(f"export: {out} ({cfg.model.backbone}, {len(meta.label_names)} labels, thresholds "
        f"{meta.thresholds.policy} on {meta.thresholds.tuned_on}, calibration {cfg.evaluate.calibration}, "
        f"tta {meta.tta}); model card {card}")
    return meta


def write_model_card(run: RunDir, out: str, meta: ExportMeta, manifest, min_patients: int,
                     intended_use: str | None, limitations: tuple[str, ...]) -> str:
    """MODEL_CARD.md/.json from the newest test report of this checkpoint, then the export is recorded in
    the run folder (outputs.json, index.html). Returns the card's path."""
    report, summary = _test_report(run, meta)
    sha = meta.thresholds.checkpoint_sha256
    now = datetime.datetime.now(datetime.timezone.utc)
    card = model_card.build_card(meta, manifest, summary, min_patients, intended_use, limitations,
                                 now.strftime("%Y-%m-%d %H:%M:%S"))
    path = model_card.write_card(out, card)
    run.record_output(RunOutput(kind="export", path=os.path.abspath(out), document=model_card.CARD_MD,
                                written_at=now.strftime("%Y-%m-%dT%H:%M:%SZ"), checkpoint_sha256=sha,
                                summary=f"{meta.backbone}, calibration "
                                        f"{meta.calibration.method if meta.calibration else 'none'}, "
                                        + (f"metrics of the test report of {report.written_at}" if report
                                           else "no test report for the card")))
    return path


def _test_report(run: RunDir, meta: ExportMeta):
    """(output, summary) of the newest test report of the exported checkpoint whose probabilities are the
    export's (the same calibration), or (None, None)."""
    method = meta.calibration.method if meta.calibration else "none"
    for output in run.outputs_of("report", meta.thresholds.checkpoint_sha256, split="test"):
        summary = read_summary(output.path)
        if summary.calibration["method"] == method:
            return output, summary
    return None, None
def _with_saliency_and_internal_test(meta: ExportMeta, run: RunDir) -> ExportMeta:
    """The Grad-CAM layer, the run folder, and the run's test evaluation when it is of this checkpoint and TTA."""
    test = run.read_split_metrics("test") if run.primary else None
    t = meta.thresholds
    if test is not None and (test.checkpoint_sha256, test.tta) != (t.checkpoint_sha256, t.tta):
        test = None
    if run.primary:
        log(f"export: internal test metrics: macro AUROC {test.macro.get('auroc')} on {test.n} images carried"
            if test else f"export: {run.path} has no test evaluation of this checkpoint (TTA {t.tta}), so the export "
            "carries no internal test metrics for external evaluations to compare with; run `medtl evaluate "
            "--workdir RUN --split test` before exporting to add them")
    return dataclasses.replace(meta, gradcam_layer=GRADCAM_LAYER, run_folder=os.path.abspath(run.path),
                               internal_test=test)


VERIFY_ATOL = 1e-4


def _verify(out: str, model: tf.keras.Model, meta: ExportMeta) -> None:
    """Reload the SavedModel and check it reproduces the Keras model on a random batch."""
    rng = np.random.default_rng(0)
    size, channels = meta.image_size, meta.channels
    images = tf.constant(rng.uniform(0, 255, (2, size, size, channels)).astype(np.float32))
    loaded = load_savedmodel(out)
    got = loaded.signatures["predict_images"](images=images)["probabilities"].numpy()
    want = tf.sigmoid(model(images, training=False)).numpy()
    if meta.tta == "flip":
        want = (want + tf.sigmoid(model(tf.image.flip_left_right(images), training=False)).numpy()) / 2
    want = cal.apply_calibration(meta.calibration, want, meta.label_names)
    # The SavedModel's graph is optimised (fused kernels, another summation order), so float32 probabilities
    # differ in the fifth decimal on some CPUs (1.2e-5 on an AMX machine); a missing calibration or TTA
    # differs by far more than 1e-4.
    if not np.allclose(got, want, atol=VERIFY_ATOL):
        raise RunFailure(f"the SavedModel in {out} does not reproduce the Keras model "
                         f"(max difference {np.abs(got - want).max():.2g}); please report this")
    _verify_saliency(out, loaded, model, meta, images)


def _verify_saliency(out: str, loaded, model: tf.keras.Model, meta: ExportMeta, images) -> None:
    """The saliency signature's maps are the Keras model's Grad-CAM maps."""
    got = loaded.signatures["saliency_images"](images=images)["saliency"].numpy()
    want = build_gradcam_fn(model, meta.tta)(images).numpy()
    if got.shape != want.shape or not np.allclose(got, want, atol=1e-4):
        raise RunFailure(f"the SavedModel in {out} does not reproduce the Keras model's Grad-CAM maps; "
                         "please report this")
