"""medtl's Python API: one function per stage, each taking a config object or paths and returning a
typed result. The `medtl` command is a thin layer over it; docs/api.md walks through a notebook.

    from medtl import api
    records = api.ingest(api.IngestOptions(images="studies/images", labels="studies/labels.csv", out="records"))
    run = api.train("jobs/smoke.yaml", "runs/smoke", overrides=[f"data.records={records.records}"])
    report = api.evaluate(run.workdir)  # into runs/smoke/reports/test

Importing this module loads neither TensorFlow nor Horovod; a stage loads what it needs when called.
Under horovodrun, `train`, `search`, `evaluate` and `export` run on every rank; the ranks other than
0 get None from `search` and `evaluate` (rank 0 alone writes their outputs).
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass

from medtl.config import Config, load_config, load_job_config, to_tree, with_absolute_paths
from medtl.data.ingest import IngestOptions
from medtl.errors import MedtlError
from medtl.utils.log import copy_to_run_folder, log, warning

__all__ = ["Config", "IngestOptions", "load_job_config", "synth", "ingest", "ingest_part", "ingest_finalize",
           "train", "pretrain", "search", "evaluate", "export", "predict", "SynthResult", "IngestResult", "TrainResult",
           "PretrainResult", "SearchResult", "EvaluateResult", "ExportResult", "PredictResult"]

ConfigLike = typing.Union[Config, str, os.PathLike]


@dataclass(frozen=True)
class SynthResult:
    out: str
    images: str  # folder of the study files
    labels: str  # labels.csv (ChestX-ray14 layout)
    num_images: int
    num_patients: int
    prevalence: dict[str, float]  # label -> fraction of images


@dataclass(frozen=True)
class IngestResult:
    records: str  # the records folder: pass it as data.records
    manifest_path: str
    labels: tuple[str, ...]
    split_records: dict[str, int]  # split -> records written
    split_patients: dict[str, int]  # split -> patients
    quarantined: int  # inputs that could not be used (listed in quarantine.csv)

    @property
    def num_records(self) -> int:
        return sum(self.split_records.values())


@dataclass(frozen=True)
class TrainResult:
    workdir: str  # the run folder: config.yaml, history.jsonl, checkpoints/, medtl.log
    best_val_auroc: float | None  # best val macro AUROC over all epochs so far
    epochs: int  # epochs completed, over all phases
    ranks: int
    stopped_after_phase: str | None  # set when until_phase stopped before the last phase
    weights_fingerprints: dict[str, str]  # phase -> weights hash (equal on every rank); phases trained now
    log_path: str  # the copy of the log in the run folder
    phase_best_val_auroc: dict[str, float] | None = None  # phase -> its best val macro AUROC (phases trained so far)


@dataclass(frozen=True)
class PretrainResult:
    workdir: str  # the run folder, as `train` writes it
    base_weights: str  # the base file: pass it as model.weights (its sidecar is base_weights + ".json")
    method: str
    backbone: str
    epochs: int  # epochs completed, over all phases
    best_val_auroc: float | None  # supervised: of the pretraining task (its own labels), not of a target task
    ranks: int
    contrastive_loss: float | None = None  # simclr: the last epoch's NT-Xent loss (rank-averaged)
    positive_top1: float | None = None  # simclr: the last epoch's positive-pair top-1 accuracy


@dataclass(frozen=True)
class SearchResult:
    workdir: str
    best_config: str | None  # best.yaml, a job config for `train`; None when no trial finished
    best_head: str | None
    best_val_auroc: float | None
    trials: int
    spent_full_trainings: float
    summary: dict  # search_summary.json's content
    # Subset transfer (fractions): per fraction its best head, Kendall's tau and top-k overlap against the
    # largest fraction (search_summary.json's "fractions"), and the learning curve's verdict; else () and None.
    fractions: tuple = ()
    learning_curve: str | None = None  # learning_curve.json


@dataclass(frozen=True)
class EvaluateResult:
    out: str  # the report folder
    report_path: str  # report.html
    metrics_path: str  # metrics.json
    split: str
    num_images: int
    num_patients: int
    macro_auroc: float | None
    macro_auroc_ci: tuple[float, float] | None  # bootstrap interval at metrics["bootstrap"]["confidence"]
    metrics: dict  # metrics.json's content: per label, macro, micro, thresholds, provenance


@dataclass(frozen=True)
class ExportResult:
    out: str  # the SavedModel folder
    model_card: str  # its MODEL_CARD.md (MODEL_CARD.json beside it)
    label_names: tuple[str, ...]
    thresholds: dict[str, float]  # label -> operating threshold (tuned on val)
    threshold_policy: str
    tta: str
    backbone: str
    image_size: int  # the model's input side in pixels


@dataclass(frozen=True)
class PredictResult:
    out: str  # predictions CSV: one row per file, with status and reason
    files: int
    predicted: int
    errors: int  # files that could not be decoded
    saliency: str | None = None  # the overlays' folder, when asked for


def _job_config(config: ConfigLike, overrides: typing.Sequence[str]) -> Config:
    """A Config object (with overrides applied) or a YAML path, with absolute local paths."""
    if isinstance(config, Config):
        cfg = load_config(raw=to_tree(config), overrides=overrides) if overrides else config
        return with_absolute_paths(cfg)
    return load_job_config(config, overrides)


def _need_records(cfg: Config) -> None:
    if not cfg.data.records:
        raise MedtlError("data.records is empty; set it in the config or with --set data.records=DIR")


def _preflight(cfg: Config, workdir: str, unlabeled_ok: bool = False, val: bool = True) -> None:
    """What a training job checks of its inputs before TensorFlow loads (local records cost no import), so a
    wrong folder or an empty split is reported in a second; the job checks them again as it starts."""
    from medtl.data.manifest import check_input_size, check_train_split, check_val_split, read_manifest
    from medtl.train.rundir import check_outside_records

    _need_records(cfg)
    if "://" in cfg.data.records:
        return  # object storage: checked once, by the job, through TensorFlow's filesystems
    manifest = read_manifest(cfg.data.records, unlabeled_ok=unlabeled_ok)
    check_train_split(cfg.data.records, manifest)
    if val:
        check_val_split(cfg.data.records, manifest)
    check_outside_records(cfg, workdir)
    check_input_size(cfg.data.records, manifest, cfg.data.image_size, cfg.data.allow_upsample)


def synth(out: str, n: int = 1000, seed: int = 0, size: int = 256, dicom: bool = False,
          progress: bool = True, first_patient: int = 1) -> SynthResult:
    """Write `n` synthetic chest-X-ray-like studies (ChestX-ray14 layout) into OUT/images and OUT/labels.csv.
    Patients are numbered from `first_patient`, so sets made with different numbers share no patient id."""
    from medtl.data.synth import synthesize
    from medtl.utils.progress import Progress

    if n < 1:
        raise MedtlError(f"n must be >= 1, got {n}")
    if size < 32:
        raise MedtlError(f"size must be >= 32, got {size}")
    with Progress(n, "synth", enabled=progress) as bar:
        info = synthesize(out, n, seed, size, dicom, progress=bar, first_patient=first_patient)
    return SynthResult(out=out, images=os.path.join(out, "images"), labels=os.path.join(out, "labels.csv"),
                       num_images=info["images"], num_patients=info["patients"], prevalence=dict(info["prevalence"]))


def _ingest_result(records: str, manifest) -> IngestResult:
    from medtl.data.manifest import manifest_path

    splits = manifest.splits
    return IngestResult(records=records, manifest_path=manifest_path(records), labels=tuple(manifest.labels),
                        split_records={k: v.records for k, v in splits.items()},
                        split_patients={k: v.patients for k, v in splits.items()},
                        quarantined=manifest.quarantined)


def ingest(options: IngestOptions) -> IngestResult:
    """Decode, de-identify, split by patient and shard studies into a records folder (options.out)."""
    from medtl.data import ingest as ingest_module

    return _ingest_result(options.out, ingest_module.ingest(options))


def ingest_part(options: IngestOptions, worker_index: int, num_workers: int) -> None:
    """One worker's part of a partitioned ingest; run `ingest_finalize` after all of them."""
    from medtl.data import ingest as ingest_module

    ingest_module.ingest_part(options, worker_index, num_workers)


def ingest_finalize(options: IngestOptions, num_workers: int) -> IngestResult:
    """Merge the parts of a partitioned ingest into the records folder (same options as the parts)."""
    from medtl.data import ingest as ingest_module

    return _ingest_result(options.out, ingest_module.finalize(options, num_workers))


def _log_devices(precision: str, augment_on: str = "cpu", augment: bool = False) -> None:
    from medtl.env import devices_in_use

    devices = devices_in_use()
    log(f"train: devices in use: {', '.join(devices)}")
    gpu = any(d.startswith("GPU") for d in devices)
    if precision == "mixed_float16" and not gpu:
        warning("train.precision is mixed_float16 but no GPU is visible; float16 runs slower than float32 "
                "on a CPU (set train.precision=float32)")
    if augment_on == "device" and augment and not gpu:
        warning("data.augment_on is device but no GPU is visible: the augmentation policy runs on the CPU in the "
                "training step, many times slower than albumentations in the input pipeline "
                "(docs/benchmarks.md); set data.augment_on=cpu on machines without a GPU")


def train(config: ConfigLike, workdir: str, overrides: typing.Sequence[str] = (),
          until_phase: str | None = None) -> TrainResult:
    """Run (or resume) the phases of a job config into the run folder `workdir`, up to and including
    `until_phase` (default: all). The same call with the same workdir resumes where it stopped."""
    cfg = _job_config(config, overrides)
    _preflight(cfg, workdir)
    from medtl import dist
    from medtl.train.loop import train as train_phases

    ctx = dist.init(cfg.train.stall_shutdown_seconds)  # first, so that only rank 0 logs and keeps the log copy
    with copy_to_run_folder(workdir) as log_path:
        _log_devices(cfg.train.precision, cfg.data.augment_on, bool(cfg.data.augment))
        summary = train_phases(cfg, workdir, until_phase=until_phase)
    return TrainResult(workdir=workdir, best_val_auroc=summary["best_val_auroc"], epochs=summary["epochs"],
                       ranks=ctx.size, stopped_after_phase=summary.get("stopped_after_phase"),
                       weights_fingerprints=dict(summary.get("weights_fingerprint") or {}), log_path=log_path,
                       phase_best_val_auroc=dict(summary.get("phase_best_val_auroc") or {}))


def pretrain(config: ConfigLike, workdir: str, overrides: typing.Sequence[str] = ()) -> PretrainResult:
    """Pretrain the configured backbone by `pretrain.method` into the run folder `workdir` and write its base
    file (rank 0); the same call with the same workdir resumes. Under horovodrun it runs on every rank."""
    cfg = _job_config(config, overrides)
    _need_records(cfg)
    from medtl.train.pretrain import check_pretrain_config, run_pretrain

    check_pretrain_config(cfg)  # before TensorFlow loads: a bad config fails in a second
    _preflight(cfg, workdir, unlabeled_ok=cfg.pretrain.method == "simclr", val=cfg.pretrain.method != "simclr")
    from medtl import dist

    ctx = dist.init(cfg.train.stall_shutdown_seconds)
    with copy_to_run_folder(workdir):
        _log_devices(cfg.train.precision)
        summary = run_pretrain(cfg, workdir)
    return PretrainResult(workdir=workdir, base_weights=summary["base_weights"], method=cfg.pretrain.method,
                          backbone=cfg.model.backbone, epochs=summary["epochs"],
                          best_val_auroc=summary["best_val_auroc"], ranks=ctx.size,
                          contrastive_loss=summary.get("loss"), positive_top1=summary.get("positive_top1"))


def search(config: ConfigLike, space: str, budget: float, workdir: str, overrides: typing.Sequence[str] = (),
           storage: str | None = None, study_name: str | None = None,
           fractions: typing.Sequence[float] | str | None = None) -> SearchResult | None:
    """Budgeted search for a classification head on cached base features (see `medtl search --help`);
    writes best.yaml, leaderboard.csv and search.html into `workdir`. None on ranks other than 0.
    `fractions` (e.g. "0.1,0.3,1.0" or [0.1, 0.3, 1.0]) replaces search.fractions: the subset transfer."""
    cfg = _job_config(config, overrides)
    if fractions is not None:
        from medtl.data.subsets import fractions_problem, parse_fractions

        if isinstance(fractions, str):
            values = parse_fractions(fractions)
        else:
            values = tuple(fractions)
            if fractions_problem(values) or not values:
                raise MedtlError(f"fractions {list(values)} {fractions_problem(values) or 'is empty'}")
        cfg = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, fractions=tuple(float(v) for v in values)))
    _preflight(cfg, workdir)
    from medtl.search.run import run_search

    summary = run_search(cfg, space, budget, workdir, storage, study_name)
    if summary is None:
        return None
    best = summary.get("best")
    return SearchResult(workdir=workdir, best_config=os.path.join(workdir, "best.yaml") if best else None,
                        best_head=best["head"] if best else None, best_val_auroc=best["val_auroc"] if best else None,
                        trials=summary["trials"], spent_full_trainings=summary["spent_full_trainings"], summary=summary,
                        fractions=tuple(summary.get("fractions", ())), learning_curve=summary.get("learning_curve_file"))


def evaluate(workdir: str | None = None, *, out: str | None = None, model: str | None = None,
             records: str | None = None, split: str = "test", overrides: typing.Sequence[str] = (),
             label_map: str | None = None) -> EvaluateResult | None:
    """Evaluate a run's best checkpoint (`workdir`), or an exported model (`model`) on a records folder
    (`records`), on one split; writes the report folder `out` (for a run, by default RUN/reports/SPLIT).
    `label_map` (a YAML file, model label: records label) scores an export on records whose labels are
    named otherwise. None on ranks other than 0."""
    if (workdir is None) == (model is None):
        raise MedtlError("evaluate needs either a run folder (workdir) or an exported model (model), not both")
    if label_map is not None:
        _check_label_map(model, records, label_map)
    if workdir is not None:
        if records is not None:
            raise MedtlError("records goes with model (an export); a run folder (workdir) evaluates its own records")
        from medtl.evaluate.checks import read_run_inputs
        from medtl.train.rundir import RunDir

        read_run_inputs(workdir, list(overrides), split)  # before TensorFlow loads
        out = out or RunDir(workdir).report_dir(split)
        from medtl.evaluate.run import evaluate_run

        report = evaluate_run(workdir, split, out, list(overrides))
    else:
        if records is None:
            raise MedtlError("model needs records: the records folder (from ingest) to evaluate it on")
        if out is None:
            raise MedtlError("evaluating an exported model needs out (--out REPORT): only a run folder has a "
                             "default report folder (RUN/reports/SPLIT)")
        from medtl.serve.evaluate import evaluate_export

        report = evaluate_export(model, records, split, out, list(overrides), label_map)
    if not report:
        return None
    from medtl.evaluate.report import METRICS_FILE, REPORT_FILE

    ci = report["macro"].get("auroc_ci")
    return EvaluateResult(out=out, report_path=os.path.join(out, REPORT_FILE),
                          metrics_path=os.path.join(out, METRICS_FILE), split=report["split"],
                          num_images=report["n"], num_patients=report["patients"],
                          macro_auroc=report["macro"]["auroc"], macro_auroc_ci=tuple(ci) if ci else None,
                          metrics=report)


def _check_label_map(model: str | None, records: str | None, label_map: str) -> None:
    """A label map's errors before TensorFlow loads (they take a second, not twenty)."""
    if model is None or records is None:
        raise MedtlError("a label map goes with an exported model and records (model, records; --model, --records)")
    from medtl.data.manifest import read_manifest
    from medtl.evaluate.external import build_mapping
    from medtl.serve.meta import read_meta

    build_mapping(label_map, read_meta(model).label_names, read_manifest(records).labels, model, records)


def export(workdir: str, out: str, overrides: typing.Sequence[str] = (), intended_use: str | None = None,
           limitations: typing.Sequence[str] = ()) -> ExportResult:
    """Export a run's best checkpoint as a SavedModel with preprocessing, labels, calibration and val-tuned
    thresholds, and its model card (intended use: `intended_use`, else a research-only disclaimer;
    `limitations` are added to the limits the run shows)."""
    from medtl.evaluate.checks import read_run_inputs

    read_run_inputs(workdir, list(overrides), None)  # before TensorFlow loads
    from medtl.serve.card import CARD_MD
    from medtl.serve.export import export_run

    meta = export_run(workdir, out, list(overrides), intended_use, tuple(limitations))
    names = tuple(meta.label_names)
    return ExportResult(out=out, model_card=os.path.join(out, CARD_MD), label_names=names,
                        thresholds=dict(zip(names, meta.threshold_values)), threshold_policy=meta.thresholds.policy,
                        tta=meta.tta, backbone=meta.backbone, image_size=meta.image_size)


def predict(model: str, images: str, out: str, batch_size: int = 32, ids_only: bool = False,
            salt_file: str | None = None, saliency: str | None = None) -> PredictResult:
    """Predict study files (a folder, searched recursively, or a CSV with a 'path' column) with an exported
    model; writes one CSV row per file to `out`, naming it by its path, or with `ids_only` by its salted
    study id (the key ingest gives the same file under the same salt and base folder). With `saliency`
    (a folder), each file's Grad-CAM overlays go into a subfolder named as its row."""
    if batch_size < 1:
        raise MedtlError(f"batch_size must be >= 1, got {batch_size}")
    from medtl.serve.predict import predict_files

    counts = predict_files(model, images, out, batch_size, ids_only=ids_only, salt_file=salt_file,
                           saliency_dir=saliency)
    return PredictResult(out=out, files=counts["files"], predicted=counts["predicted"], errors=counts["errors"],
                         saliency=saliency)

