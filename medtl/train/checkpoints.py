"""Reading a finished (or running) run folder back: its config, data manifest and best model."""
from __future__ import annotations

import os

from medtl.config import Config, load_config
from medtl.data.ingest import read_manifest
from medtl.errors import MedtlError
from medtl.train.loop import BEST_WEIGHTS, CHECKPOINT_DIR, CONFIG_FILE


def load_run(workdir: str, weights_file: str | None = None):
    """(cfg, manifest, model) for a run folder, with the best weights loaded."""
    from medtl.models.build import build_model, set_precision

    config_path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise MedtlError(f"{workdir} is not a medtl run folder (no {CONFIG_FILE}); pass the --workdir of `medtl train`")
    cfg: Config = load_config(config_path)
    weights = weights_file or os.path.join(workdir, CHECKPOINT_DIR, BEST_WEIGHTS)
    if not os.path.isfile(weights):
        raise MedtlError(f"run folder {workdir} has no checkpoint ({weights}); train it first with `medtl train`")
    manifest = read_manifest(cfg.data.records)
    set_precision("float32")  # inference in float32 whatever the training precision
    model = build_model(cfg, len(manifest["labels"]), weights="none")
    try:
        model.load_weights(weights)
    except Exception as exc:
        raise MedtlError(f"checkpoint {weights} does not match the run's config: {str(exc).splitlines()[0][:200]}") from None
    return cfg, manifest, model
