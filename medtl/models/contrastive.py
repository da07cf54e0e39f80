"""SimCLR for `medtl pretrain` (pretrain.method: simclr): the NT-Xent loss, and the backbone with a small
projection head whose train step gathers every rank's projections, so each anchor meets the negatives of
the whole global batch. Only the backbone is kept (medtl.models.basefile); the projection head is dropped.
"""
from __future__ import annotations

from medtl.config import Config
from medtl.models.backbones import Preprocess, build_backbone, get_spec
from medtl.models.build import Classifier, set_batchnorm_momentum
from medtl.tf import tf

# Added to the logits of an anchor against itself, so it is never its own candidate.
_SELF_MASK = 1e9


def nt_xent(views_a, views_b, first_anchor, num_anchors, temperature: float):
    """NT-Xent (Chen et al. 2020) for the anchors of one rank; returns (loss (), hits (2 * num_anchors,)).

    views_a, views_b: (N, d) the two views' projections of the N images of the global batch, in rank order
    (row i of each is image i). The anchors are both views of images first_anchor .. first_anchor +
    num_anchors - 1. An anchor's positive is the other view of its image; its negatives are the 2N - 2
    views of the other images. The loss is the mean over the anchors of the cross-entropy of the positive
    among the 2N - 1 candidates, cosine similarities divided by `temperature`. hits is 1.0 where the
    positive is the anchor's most similar candidate (the positive-pair top-1 accuracy).
    """
    views_a = tf.math.l2_normalize(tf.cast(views_a, tf.float32), axis=1)
    views_b = tf.math.l2_normalize(tf.cast(views_b, tf.float32), axis=1)
    total = tf.shape(views_a)[0]
    candidates = tf.concat([views_a, views_b], axis=0)  # (2N, d): view a rows, then view b rows
    rows = tf.range(first_anchor, first_anchor + num_anchors)  # (n,) the anchors' images
    anchors = tf.concat([tf.gather(views_a, rows), tf.gather(views_b, rows)], axis=0)  # (2n, d)
    own = tf.concat([rows, rows + total], axis=0)  # (2n,) each anchor's own candidate index
    positive = tf.concat([rows + total, rows], axis=0)  # (2n,) the other view of the same image
    logits = tf.matmul(anchors, candidates, transpose_b=True) / temperature  # (2n, 2N)
    logits -= _SELF_MASK * tf.one_hot(own, 2 * total, dtype=logits.dtype)
    losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=positive, logits=logits)
    hits = tf.cast(tf.equal(tf.argmax(logits, axis=1, output_type=positive.dtype), positive), tf.float32)
    return tf.reduce_mean(losses), hits


@tf.keras.utils.register_keras_serializable(package="medtl")
class SimCLRModel(Classifier):
    """images -> backbone -> pooled features -> projection. Trained on batches of (2n, size, size, channels):
    n images' view a, then their view b. Classifier's step does the rest: gradients averaged over ranks
    before the finite check (inputs, loss, gradients), so every rank applies or skips the same update.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.temperature = 0.2
        self.gather_rows = None  # dist.rows_gatherer: (n, d) -> (ranks * n, d); None on one process
        self.rank = 0
        self.positive_top1 = tf.keras.metrics.Mean(name="positive_top1")

    def _gradients(self, x, y, sample_weight):
        """(loss, per-anchor hits, gradients of the possibly scaled loss) for one local batch of views."""
        scaled = isinstance(self.optimizer, tf.keras.mixed_precision.LossScaleOptimizer)
        num_images = tf.shape(x)[0] // 2
        with tf.GradientTape() as tape:
            projections = tf.cast(self(x, training=True), tf.float32)  # (2n, dim)
            pairs = tf.concat([projections[:num_images], projections[num_images:]], axis=1)  # (n, 2 dim)
            if self.gather_rows is not None:  # one collective for both views
                pairs = self.gather_rows(pairs)  # (N, 2 dim), this rank's rows at rank * n
            views_a, views_b = tf.split(pairs, 2, axis=1)
            loss, hits = nt_xent(views_a, views_b, self.rank * num_images, num_images, self.temperature)
            target = self.optimizer.get_scaled_loss(loss) if scaled else loss
        return loss, hits, tape.gradient(target, self.trainable_variables)

    def compute_metrics(self, x, y, y_pred, sample_weight):
        self.positive_top1.update_state(y_pred)  # y_pred: the anchors' hits (see _gradients)
        return {"positive_top1": self.positive_top1.result()}

    @property
    def metrics(self):
        found = super().metrics
        return found if any(m is self.positive_top1 for m in found) else found + [self.positive_top1]


def build_simclr_model(cfg: Config, weights: str | None = None) -> SimCLRModel:
    """The backbone of cfg.model (its weights: `weights` or cfg.model.weights) with pretrain's projection head:
    global average pooling, a ReLU hidden layer, a linear projection (float32 under mixed precision)."""
    size, channels = cfg.data.image_size, cfg.data.channels
    spec = get_spec(cfg.model.backbone)
    inputs = tf.keras.Input((size, size, channels), name="image")  # (2n, size, size, channels) in [0, 255]
    x = Preprocess(spec.preprocess, name="preprocess")(inputs)
    base = build_backbone(cfg.model.backbone, weights or cfg.model.weights, size, channels)
    pooled = tf.keras.layers.GlobalAveragePooling2D(name="pool")(base(x))  # (2n, features)
    hidden = tf.keras.layers.Dense(cfg.pretrain.projection_width, activation="relu", name="projection_hidden")(pooled)
    projection = tf.keras.layers.Dense(cfg.pretrain.projection_dim, dtype="float32", name="projection")(hidden)
    model = SimCLRModel(inputs, projection, name="medtl_simclr")
    model.temperature = float(cfg.pretrain.temperature)
    if cfg.model.batchnorm_momentum >= 0:
        set_batchnorm_momentum(model, cfg.model.batchnorm_momentum)
    return model
