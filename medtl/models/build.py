"""The full classifier: [0, 255] images -> backbone -> head -> (batch, num_labels) logits."""
from __future__ import annotations

from medtl.config import Config
from medtl.models.backbones import Preprocess, build_backbone, get_spec
from medtl.models.heads import build_head
from medtl.tf import tf


def set_precision(precision: str) -> None:
    """Set the global Keras dtype policy; call before building the model."""
    tf.keras.mixed_precision.set_global_policy(precision)


@tf.keras.utils.register_keras_serializable(package="medtl")
class Classifier(tf.keras.Model):
    """The functional classifier with a train step fit for Horovod and mixed precision.

    Gradients are averaged across ranks (`reduce_gradients`, set by the trainer) before
    anything looks at them, so the finite check is global: every rank applies the
    update, or every rank skips it (a NaN on one rank cannot desynchronise the others).
    A step counts as finite only when its inputs, its loss and its gradients all are:
    NaN need not reach the loss. oneDNN's fused Conv/BatchNorm + ReLU kernels (TF's
    default on CPUs with AVX512_VNNI, AVX512_BF16 or AMX) compute ReLU(NaN) = 0, so a
    NaN batch can give a finite loss and finite gradients (docs/reliability.md).
    Non-finite steps are counted in `nonfinite_streak` for the trainer's NaN guard.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reduce_gradients = None  # list of gradients -> their average over ranks
        # (batch, step) -> the model's input, run first in each training step (data.augment_on: device: the
        # stream's stored pixels scaled, augmented and turned into the model's channels on the device).
        self.prepare_inputs = None
        # XLA for the forward/backward pass only: Horovod's collectives have no XLA kernels,
        # so under Horovod the allreduce stays outside the compiled cluster.
        self.jit_gradients = False
        self._xla_gradients = None
        # The epoch's loss over the steps that were applied (a skipped NaN step changes nothing).
        self.applied_loss = tf.keras.metrics.Mean(name="loss")
        self.nonfinite_streak = tf.Variable(0, trainable=False, dtype=tf.int64, name="nonfinite_streak")
        self.nonfinite_total = tf.Variable(0, trainable=False, dtype=tf.int64, name="nonfinite_total")

    def _gradients(self, x, y, sample_weight):
        """(loss, predictions, gradients of the possibly scaled loss) for one local batch."""
        scaled = isinstance(self.optimizer, tf.keras.mixed_precision.LossScaleOptimizer)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x, y, y_pred, sample_weight)
            target = self.optimizer.get_scaled_loss(loss) if scaled else loss
        return loss, y_pred, tape.gradient(target, self.trainable_variables)

    def train_step(self, data):
        x, y, sample_weight = tf.keras.utils.unpack_x_y_sample_weight(data)
        inputs_finite = _all_finite(tf.nest.flatten(x))  # before any preparation can hide a NaN
        if self.prepare_inputs is not None:
            # The step's draws: applied plus skipped steps, which grows by at least one every step (a skipped
            # step does not move the optimizer's counter; a loss-scale skip moves both).
            x = self.prepare_inputs(x, self.optimizer.iterations + self.nonfinite_total)
        scaled = isinstance(self.optimizer, tf.keras.mixed_precision.LossScaleOptimizer)
        if self.jit_gradients:
            if self._xla_gradients is None:
                self._xla_gradients = tf.function(self._gradients, jit_compile=True)
            loss, y_pred, grads = self._xla_gradients(x, y, sample_weight)
        else:
            loss, y_pred, grads = self._gradients(x, y, sample_weight)
        variables = self.trainable_variables
        # () 1.0 when this rank's inputs or loss are not finite; averaged with the gradients,
        # so it is > 0 on every rank as soon as one rank's batch is bad.
        bad_batch = tf.cast(tf.logical_not(tf.logical_and(inputs_finite, _all_finite(tf.nest.flatten(x) + [loss]))),
                            tf.float32)
        if self.reduce_gradients is not None:
            *grads, bad_batch = self.reduce_gradients(list(grads) + [bad_batch])
        batch_ok = tf.equal(bad_batch, 0.0)
        finite = tf.logical_and(batch_ok, _all_finite(grads))
        if scaled:
            # The LossScaleOptimizer skips non-finite gradients and lowers the scale itself;
            # its check sees the same averaged gradients on every rank. A bad batch is
            # skipped before it, so it does not move the loss scale.
            unscaled = self.optimizer.get_unscaled_gradients(grads)
            tf.cond(batch_ok, lambda: self._apply(unscaled, variables), lambda: tf.constant(False))
        else:
            tf.cond(finite, lambda: self._apply(grads, variables), lambda: tf.constant(False))
        self.nonfinite_streak.assign(tf.where(finite, tf.constant(0, tf.int64), self.nonfinite_streak + 1))
        self.nonfinite_total.assign_add(tf.cast(tf.logical_not(finite), tf.int64))
        applied = tf.cast(finite, tf.float32)
        self.applied_loss.update_state(tf.where(finite, tf.cast(loss, tf.float32), 0.0), sample_weight=applied)
        results = self.compute_metrics(x, y, y_pred, sample_weight)
        results["loss"] = self.applied_loss.result()
        return results

    @property
    def metrics(self):
        found = super().metrics  # reset with the others at each epoch
        return found if any(m is self.applied_loss for m in found) else found + [self.applied_loss]

    def _apply(self, grads, variables):
        self.optimizer.apply_gradients(zip(grads, variables))
        return tf.constant(True)


def _all_finite(tensors) -> tf.Tensor:
    """() bool: every floating-point value in `tensors` is finite (integer tensors are)."""
    checks = [tf.reduce_all(tf.math.is_finite(t)) for t in tensors if t.dtype.is_floating]
    return tf.reduce_all(checks) if checks else tf.constant(True)


def build_model(cfg: Config, num_labels: int, weights: str | None = None) -> tf.keras.Model:
    """The classifier for `cfg`. `weights` overrides cfg.model.weights (e.g. none when a checkpoint follows)."""
    size, channels = cfg.data.image_size, cfg.data.channels
    spec = get_spec(cfg.model.backbone)
    inputs = tf.keras.Input((size, size, channels), name="image")  # (batch, size, size, channels) in [0, 255]
    x = Preprocess(spec.preprocess, name="preprocess")(inputs)
    base = build_backbone(cfg.model.backbone, weights or cfg.model.weights, size, channels)
    features = base(x)  # (batch, h, w, c) feature map
    logits = build_head(features, cfg.model.head, num_labels)
    model = Classifier(inputs, logits, name="medtl_classifier")
    if cfg.model.batchnorm_momentum >= 0:
        set_batchnorm_momentum(model, cfg.model.batchnorm_momentum)
    return model


def set_batchnorm_momentum(model: tf.keras.Model, momentum: float) -> None:
    """Set every BatchNorm layer's moving-statistics momentum, nested models included (read when the
    training step is traced, so before fit)."""
    for layer in model.submodules:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            layer.momentum = momentum


def get_base(model: tf.keras.Model) -> tf.keras.Model:
    return model.get_layer("backbone")
