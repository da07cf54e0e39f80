"""The checks of an evaluation's inputs that need no TensorFlow: `medtl evaluate` and `medtl export` run them
before it loads, so a wrong split, subgroup field or calibration request costs a second, not a model load."""
from __future__ import annotations

from medtl.config import Config, load_config, to_tree
from medtl.data.manifest import Manifest, check_split
from medtl.errors import MedtlError
from medtl.evaluate.calibration import check_calibration_split
from medtl.evaluate.subgroups import check_subgroup_fields
from medtl.train.rundir import read_run


def with_evaluate_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `--set evaluate.X=V`; other keys would no longer describe the trained model."""
    for assignment in overrides:
        if not assignment.strip().startswith("evaluate."):
            raise MedtlError(f"--set {assignment}: only evaluate.* keys can be changed after training "
                             "(e.g. --set evaluate.threshold_policy=f1)")
    return load_config(raw=to_tree(cfg), overrides=overrides) if overrides else cfg


def check_inputs(cfg: Config, manifest: Manifest, split: str | None) -> None:
    """The split to score (None: export, which scores none), the subgroup fields and calibration's val split."""
    records = cfg.data.records
    if split is not None:
        check_split(manifest, split, records)
        check_subgroup_fields(cfg.evaluate.subgroups, manifest, records)
    check_calibration_split(cfg.evaluate.calibration, manifest, records)


def read_run_inputs(workdir: str, overrides: list[str], split: str | None) -> tuple[Config, Manifest]:
    """A trained run folder's config (with the evaluate.* overrides) and manifest, checked."""
    cfg, manifest, _ = read_run(workdir)
    cfg = with_evaluate_overrides(cfg, overrides)
    check_inputs(cfg, manifest, split)
    return cfg, manifest
