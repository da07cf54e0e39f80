"""`medtl pretrain`: train a base in-domain and keep it as a base file (medtl.models.basefile).

supervised: the phases of the job train the configured backbone on data.records' labels (any label set)
with the same loop as `medtl train`, so horovodrun, LR scaling, rank-0 I/O and resume are the same;
then rank 0 writes the backbone of the best weights to RUN/base.weights.h5 with its sidecar.

simclr: self-supervised, the same phases train the backbone with a projection head on the NT-Xent loss
over two augmented views of each train image, labels unread (medtl.train.simclr); rank 0 then writes the
backbone of the last phase's final weights the same way.
"""
from __future__ import annotations

from medtl.config import PRETRAIN_METHODS, Config, check_views_batch
from medtl.data.manifest import check_train_split, read_manifest
from medtl.errors import ConfigError
from medtl.utils.log import log


def check_pretrain_config(cfg: Config) -> None:
    """What `medtl pretrain` needs beyond a valid job config."""
    if not cfg.pretrain.method:
        raise ConfigError(f"pretrain.method is missing; add `pretrain: {{method: supervised}}` (labels) or "
                          f"`pretrain: {{method: simclr}}` (no labels) to the job config, or --set "
                          f"pretrain.method=...; built methods: {', '.join(PRETRAIN_METHODS)}")
    if all(phase.trainable.kind == "none" for phase in cfg.phases):
        raise ConfigError("no phase trains the base (every phases.N.trainable is none), so pretraining would keep "
                          "a random base; set phases.0.trainable=all")
    if cfg.pretrain.method == "simclr":
        check_views_batch(cfg.train.batch_size, 1)
    # simclr reads images only, so unlabeled records (`medtl ingest --unlabeled`) are its to take; supervised
    # needs labels and is refused them here, in one line, before TensorFlow loads.
    check_train_split(cfg.data.records,
                      read_manifest(cfg.data.records, unlabeled_ok=cfg.pretrain.method == "simclr"))


def _keep_base(cfg: Config, workdir: str, summary: dict, load, result: str) -> dict:
    """Rank 0 writes the backbone of the model that `load()` returns (with the records' digest) to
    RUN/base.weights.h5 with its sidecar; `result` says what the method reached, for the log line.
    Returns `summary` with "base_weights" (the path) and "meta" (the BaseMeta; None off rank 0)."""
    from medtl import dist
    from medtl.models import basefile
    from medtl.train.rundir import RunDir

    run = RunDir(workdir, dist.init(cfg.train.stall_shutdown_seconds).primary)
    meta = None
    if run.primary:
        model, digest = load()
        meta = basefile.make_meta(cfg, cfg.pretrain.method, summary["epochs"], digest)
        basefile.write_base(model.get_layer("backbone"), meta, run.base_weights)
        log(f"pretrain: wrote {run.base_weights} ({meta.backbone}, {meta.channels} channel(s), {meta.epochs} "
            f"epoch(s) of {meta.method}, {result}); use it with model.weights={run.base_weights}")
    return {**summary, "base_weights": run.base_weights, "meta": meta}


def pretrain_supervised(cfg: Config, workdir: str) -> dict:
    """Train, then keep the base of the run's best weights."""
    from medtl.train.loop import train
    from medtl.train.rundir import load_run

    summary = train(cfg, workdir)

    def best():
        _, manifest, model = load_run(workdir)
        return model, manifest.digest()

    return _keep_base(cfg, workdir, summary, best, f"best val macro AUROC {summary['best_val_auroc']}")


def pretrain_simclr(cfg: Config, workdir: str) -> dict:
    """Self-supervised pretraining, then keep the base of the final weights."""
    from medtl.train.simclr import train_simclr

    summary, model = train_simclr(cfg, workdir)
    return _keep_base(cfg, workdir, summary, lambda: (model, summary["manifest_digest"]),
                      f"final contrastive loss {summary.get('loss')}")


def run_pretrain(cfg: Config, workdir: str) -> dict:
    """`medtl pretrain` by cfg.pretrain.method (checked by check_pretrain_config)."""
    if cfg.pretrain.method == "simclr":
        return pretrain_simclr(cfg, workdir)
    return pretrain_supervised(cfg, workdir)
