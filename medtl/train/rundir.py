"""The run folder of `medtl train`: `RunDir` alone knows its layout, reads it and writes it.

RUN/
  config.yaml                  the resolved config the run trains with
  history.jsonl                one row per completed epoch
  trainable.json               per phase, the variables it trained
  train_summary.json           what the last `medtl train` returned
  thresholds.json              operating thresholds, tuned by `medtl evaluate` / `medtl export`
  calibration.json             the per-label calibration they were tuned on (evaluate.calibration)
  reports/<split>/             `medtl evaluate`'s default report folder
  outputs.json                 every report and export written from this run (wherever they are)
  index.html                   links to all of the above, with the training curves (refreshed by
                               train at each epoch, evaluate and export)
  evaluations/<split>.json     AUROC/AUPRC with intervals of the last `medtl evaluate` of a split (what
                               `medtl export` carries as the internal test result)
  base.weights.h5 (+ .json)    the pretrained base and its sidecar (`medtl pretrain`; medtl.models.basefile)
  tensorboard/{train,validation}/  scalars per epoch, Keras' layout (same tags in both, so curves overlay)
  checkpoints/
    epoch-NNNN.weights.h5      model + optimizer state after global epoch NNNN (the last K kept)
    phase<i>-<name>.weights.h5 best weights of phase i (by val macro AUROC)
    best.weights.h5            best weights over all phases
    state.json                 the resume pointer, written last and atomically

A checkpoint file is complete before state.json names it, and is deleted only after
state.json has moved past it, so the pointer never names a missing file. Every write
is atomic and happens on the primary rank only; on other ranks it does nothing.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, fields

from medtl.config import Config, dump_config, load_config
from medtl.errors import MedtlError, RunFailure
from medtl.utils import faults, fs

CHECKPOINT_DIR = "checkpoints"
BEST_WEIGHTS = "best.weights.h5"
BASE_WEIGHTS = "base.weights.h5"
EPOCH_FILE = re.compile(r"^epoch-(\d{4})\.weights\.h5$")
_WEIGHTS_SUFFIX = ".weights.h5"


@dataclass
class RunState:
    """Where a run stands after its last completed epoch (checkpoints/state.json)."""

    # Global epochs completed (the next epoch to run).
    epochs_done: int = 0
    # Phase the last completed epoch belonged to, and epochs completed in it.
    phase_index: int = 0
    epoch_in_phase: int = 0
    # True once that phase has finished (all epochs, or stopped early).
    phase_done: bool = False
    # The epoch checkpoint to resume from (file name in checkpoints/), or "".
    checkpoint: str = ""
    # Per phase: {"metric": best val macro AUROC, "epoch": global epoch of it}.
    phase_best: dict = field(default_factory=dict)
    overall_best: float | None = None
    # Lines of history.jsonl that belong to completed epochs.
    history_lines: int = 0
    # Seed the data order and random streams are derived from (with the epoch).
    seed: int = 0
    # Ranks when the checkpoint was written (resume works with any number).
    ranks: int = 1

    def finished(self, cfg: Config) -> bool:
        return self.phase_done and self.phase_index == len(cfg.phases) - 1


@dataclass(frozen=True)
class Thresholds:
    """Operating thresholds per label, tuned on one split for one checkpoint (thresholds.json)."""

    policy: str
    target: float
    tta: str
    tuned_on: str
    val_records: int
    # label name -> {"threshold": float, "note": why it is a default, or ""}
    labels: dict
    checkpoint_sha256: str = ""
    medtl_version: str = ""
    # The calibration (evaluate.calibration) whose probabilities the thresholds were tuned on.
    calibration: str = "none"

    def values(self, label_names) -> list[float]:
        return [float(self.labels[name]["threshold"]) for name in label_names]

    def notes(self, label_names) -> list[str]:
        return [self.labels[name]["note"] for name in label_names]

    def to_dict(self) -> dict:
        return {"policy": self.policy, "target": self.target, "tta": self.tta, "tuned_on": self.tuned_on,
                "val_records": self.val_records, "checkpoint_sha256": self.checkpoint_sha256,
                "medtl_version": self.medtl_version, "calibration": self.calibration, "labels": self.labels}

    @classmethod
    def from_dict(cls, raw: dict) -> "Thresholds":
        return _from_known(cls, raw)


def _from_known(cls, raw: dict):
    """A dataclass from a JSON object, ignoring keys it does not have (written by a newer medtl)."""
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in raw.items() if k in known})


@dataclass(frozen=True)
class Calibration:
    """Per-label maps from the model's probabilities to calibrated ones, fitted on one split for one
    checkpoint (calibration.json). medtl.evaluate.calibration fits and applies them; the export applies
    the same formulas in TensorFlow."""

    method: str  # temperature, platt or isotonic
    tta: str
    fitted_on: str
    val_records: int
    # label name -> {"params": ..., "note": why the label is left as it is, or "", "val_ece": [before, after]}.
    # params: temperature {"temperature": T}: sigmoid(logit(p) / T); platt {"slope": a, "intercept": b}:
    # sigmoid(a * logit(p) + b); isotonic {"x": [...], "y": [...]}: linear between the points, constant
    # outside them; {} leaves the label's probabilities as they are.
    labels: dict
    checkpoint_sha256: str = ""
    medtl_version: str = ""

    def params(self, name: str) -> dict:
        return self.labels[name]["params"]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "Calibration":
        return _from_known(cls, raw)


@dataclass(frozen=True)
class RunOutput:
    """A report or an export written from this run (outputs.json), for the index and the model card."""

    kind: str  # report or export
    path: str  # its folder, absolute
    document: str  # the file in it a reader opens (report.html, MODEL_CARD.md)
    written_at: str  # UTC, ISO 8601
    checkpoint_sha256: str
    split: str = ""  # reports: the split evaluated
    summary: str = ""  # one line for the index, e.g. the macro AUROC

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EpochPoint:
    """What the overfitting analysis reads of one history.jsonl row (None where a row lacks it:
    runs trained before medtl logged train AUROC and the training loss on val)."""

    phase: str
    epoch: int                     # global, from 0
    loss: float | None             # the training loss, averaged over the epoch's steps
    val_loss: float | None
    train_auroc: float | None      # macro, on the fixed train sample (train.train_eval_images)
    val_auroc: float | None
    loss_name: str | None          # the loss both losses are, or None: val_loss was plain BCE then


def epoch_points(rows: list[dict] | None) -> tuple[EpochPoint, ...]:
    """history.jsonl rows (RunDir.read_history, or an export's copy) as EpochPoints, in order."""
    def number(row, key):
        value = row.get(key)
        return None if value is None else float(value)

    return tuple(EpochPoint(str(r.get("phase", "")), int(r.get("epoch", i)), number(r, "loss"), number(r, "val_loss"),
                            number(r, "train_auroc"), number(r, "val_auroc"), r.get("loss_name"))
                 for i, r in enumerate(rows or ()))


@dataclass(frozen=True)
class SplitMetrics:
    """AUROC and AUPRC with intervals of one evaluated split for one checkpoint (evaluations/<split>.json);
    an export carries the test split's, so that an external evaluation can set its result beside it."""

    split: str
    checkpoint_sha256: str
    tta: str
    n: int
    patients: int
    confidence: float
    bootstrap: int  # resamples behind the intervals (0: no intervals)
    # label name -> {"n", "positives", "prevalence", "auroc", "auroc_ci", "auprc", "auprc_ci"}
    labels: dict
    # {"auroc", "auroc_ci", "auprc", "auprc_ci", "labels_averaged"}
    macro: dict
    evaluated_at: str = ""
    medtl_version: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "SplitMetrics":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


def phase_weights_name(index: int, name: str) -> str:
    return f"phase{index}-{name}{_WEIGHTS_SUFFIX}"


def epoch_weights_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}{_WEIGHTS_SUFFIX}"


def save_weights_atomic(model, path: str) -> None:
    """Keras writes the file itself and picks the format from the .weights.h5 suffix (variables by
    object path, the optimizer's state with them), so the temporary name keeps that suffix."""
    with fs.atomic_path(path, path[: -len(_WEIGHTS_SUFFIX)] + ".tmp" + _WEIGHTS_SUFFIX) as tmp:
        model.save_weights(tmp)


class RunDir:
    """One run folder. Callers name the folder; what is inside is this class's business."""

    CONFIG = "config.yaml"
    HISTORY = "history.jsonl"
    STATE = "state.json"
    THRESHOLDS = "thresholds.json"
    CALIBRATION = "calibration.json"
    OUTPUTS = "outputs.json"
    INDEX = "index.html"
    REPORTS = "reports"
    TRAINABLE = "trainable.json"
    SUMMARY = "train_summary.json"
    TENSORBOARD = "tensorboard"
    EVALUATIONS = "evaluations"

    def __init__(self, path: str, primary: bool = True):
        self.path = path
        self.primary = primary

    def __repr__(self) -> str:
        return f"RunDir({self.path!r})"

    def _file(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    # ------------------------------------------------------------------ paths Keras and TensorBoard write to

    @property
    def best_weights(self) -> str:
        return self._file(CHECKPOINT_DIR, BEST_WEIGHTS)

    @property
    def best_weights_label(self) -> str:
        """The best checkpoint as reports name it (relative to the run folder)."""
        return f"{CHECKPOINT_DIR}/{BEST_WEIGHTS}"

    def phase_weights(self, index: int, name: str) -> str:
        return self._file(CHECKPOINT_DIR, phase_weights_name(index, name))

    def checkpoint(self, name: str) -> str:
        """An epoch checkpoint named by RunState.checkpoint."""
        return self._file(CHECKPOINT_DIR, name)

    @property
    def base_weights(self) -> str:
        """The pretrained base `medtl pretrain` writes (its content is medtl.models.basefile's)."""
        return self._file(BASE_WEIGHTS)

    @property
    def tensorboard(self) -> str:
        return self._file(self.TENSORBOARD)

    def tensorboard_folder(self, kind: str) -> str:
        """tensorboard/train or tensorboard/validation: TensorBoard overlays a tag found in both."""
        assert kind in ("train", "validation"), kind
        return self._file(self.TENSORBOARD, kind)

    # ------------------------------------------------------------------ config

    def has_config(self) -> bool:
        return os.path.isfile(self._file(self.CONFIG))

    def read_config(self) -> Config:
        if not self.has_config():
            raise MedtlError(f"{self.path} is not a medtl run folder (no {self.CONFIG}); pass the --workdir of "
                             "`medtl train`")
        return load_config(self._file(self.CONFIG))

    def write_config(self, cfg: Config) -> None:
        if self.primary:
            fs.write_text_atomic(self._file(self.CONFIG), dump_config(cfg))

    def create(self) -> None:
        if self.primary:
            os.makedirs(self._file(CHECKPOINT_DIR), exist_ok=True)

    # ------------------------------------------------------------------ resume state

    def read_state(self) -> RunState | None:
        path = self._file(CHECKPOINT_DIR, self.STATE)
        if not os.path.exists(path):
            return None
        try:
            with open(path, encoding="utf-8") as fh:
                state = RunState(**json.load(fh))
        except (json.JSONDecodeError, TypeError) as exc:
            raise RunFailure(f"{path} is unreadable ({exc}); delete the run folder's checkpoints/ to start over") from None
        if state.checkpoint and not os.path.exists(self.checkpoint(state.checkpoint)):
            raise RunFailure(f"{path} names {state.checkpoint}, which is missing; restore it or start a new --workdir")
        return state

    def write_state(self, state: RunState) -> None:
        if self.primary:
            fs.write_text_atomic(self._file(CHECKPOINT_DIR, self.STATE),
                                 json.dumps(asdict(state), indent=2, sort_keys=True))

    def commit_epoch(self, model, state: RunState, history_row: dict, keep: int, also: tuple[str, ...] = ()) -> None:
        """At an epoch end: checkpoint, copies of it to the paths in `also` (best weights: the same
        variables, serialised once), history line, then the state pointer; prune old epochs.
        Updates `state` (checkpoint name, history lines) on every rank, so all name the same file."""
        name = epoch_weights_name(state.epochs_done - 1)
        state.checkpoint = name
        state.history_lines += 1
        if not self.primary:
            return
        save_weights_atomic(model, self.checkpoint(name))
        for path in also:
            fs.copy_atomic(self.checkpoint(name), path)
        faults.in_checkpoint(state.epochs_done - 1)
        with open(self._file(self.HISTORY), "a", encoding="utf-8") as fh:
            fh.write(json.dumps(history_row, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.write_state(state)
        self.write_index()
        folder = self._file(CHECKPOINT_DIR)
        epochs = sorted(f for f in os.listdir(folder) if EPOCH_FILE.match(f))
        for old in epochs[:-keep]:
            if old != state.checkpoint:
                os.remove(os.path.join(folder, old))

    # ------------------------------------------------------------------ history

    def trim_history(self, lines: int) -> None:
        """Drop history rows of epochs that were not checkpointed (a kill between the two writes)."""
        path = self._file(self.HISTORY)
        if not self.primary or not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as fh:
            rows = fh.readlines()
        if len(rows) != lines:
            fs.write_text_atomic(path, "".join(rows[:lines]))

    def read_history(self) -> list[dict] | None:
        """The rows of history.jsonl, or None when the run has none."""
        path = self._file(self.HISTORY)
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]

    # ------------------------------------------------------------------ other records of the run

    def record_trainable(self, phase_name: str, variable_names: list[str]) -> None:
        if not self.primary:
            return
        path = self._file(self.TRAINABLE)
        record = {}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as fh:
                record = json.load(fh)
        record[phase_name] = variable_names
        fs.write_text_atomic(path, json.dumps(record, indent=1))

    def write_summary(self, summary: dict) -> None:
        if self.primary:
            fs.write_text_atomic(self._file(self.SUMMARY), json.dumps(summary, indent=2))

    @staticmethod
    def _read_record(path: str, cls):
        """A record file of the run as `cls` (from_dict), or None when it is missing or unreadable."""
        if not os.path.isfile(path):
            return None
        try:
            with open(path, encoding="utf-8") as fh:
                return cls.from_dict(json.load(fh))
        except (json.JSONDecodeError, TypeError, AttributeError):
            return None

    def read_thresholds(self) -> Thresholds | None:
        """The saved thresholds, or None when there are none (or they cannot be read: tune again)."""
        return self._read_record(self._file(self.THRESHOLDS), Thresholds)

    def write_thresholds(self, thresholds: Thresholds) -> None:
        if self.primary:
            fs.write_text_atomic(self._file(self.THRESHOLDS), json.dumps(thresholds.to_dict(), indent=2))

    def read_calibration(self) -> Calibration | None:
        return self._read_record(self._file(self.CALIBRATION), Calibration)

    def write_calibration(self, calibration: Calibration | None) -> None:
        """Save the calibration; None (evaluate.calibration: none) removes a stale one."""
        if not self.primary:
            return
        if calibration is None:
            if os.path.isfile(self._file(self.CALIBRATION)):
                os.remove(self._file(self.CALIBRATION))
        else:
            fs.write_text_atomic(self._file(self.CALIBRATION), json.dumps(calibration.to_dict(), indent=2))

    # ------------------------------------------------------------------ reports, exports and the index

    def report_dir(self, split: str) -> str:
        """`medtl evaluate`'s default report folder for a split."""
        return self._file(self.REPORTS, split)

    def outputs(self) -> list[RunOutput]:
        """Every report and export recorded, oldest first."""
        path = self._file(self.OUTPUTS)
        if not os.path.isfile(path):
            return []
        try:
            with open(path, encoding="utf-8") as fh:
                return [_from_known(RunOutput, row) for row in json.load(fh)]
        except (json.JSONDecodeError, TypeError):
            return []  # a damaged list only costs the index its links; the next write starts it again

    def record_output(self, output: RunOutput) -> None:
        """Add (or, for the same kind and path, replace) one entry, then refresh index.html."""
        if not self.primary:
            return
        kept = [o for o in self.outputs() if (o.kind, o.path) != (output.kind, output.path)]
        rows = [o.to_dict() for o in kept + [output]]
        fs.write_text_atomic(self._file(self.OUTPUTS), json.dumps(rows, indent=1))
        self.write_index()

    def outputs_of(self, kind: str, checkpoint_sha256: str, split: str = "") -> list[RunOutput]:
        """The recorded outputs of `kind` (and split) for that checkpoint whose folder still exists, newest first."""
        found = [o for o in self.outputs() if o.kind == kind and o.checkpoint_sha256 == checkpoint_sha256
                 and (not split or o.split == split) and os.path.isdir(o.path)]
        return sorted(found, key=lambda o: o.written_at, reverse=True)

    def write_index(self) -> None:
        """RUN/index.html: the config, the training curves, the thresholds, every report and export."""
        if not self.primary or not self.has_config():
            return
        from medtl.train.runindex import render_index

        files = [name for name in (self.CONFIG, self.HISTORY, self.THRESHOLDS, self.CALIBRATION,
                                   self.SUMMARY, "medtl.log") if os.path.isfile(self._file(name))]
        if os.path.isfile(self.best_weights):
            files.append(self.best_weights_label)
        page = render_index(os.path.abspath(self.path), files, self.read_history() or [], self.outputs())
        fs.write_text_atomic(self._file(self.INDEX), page)
    def _split_metrics_file(self, split: str) -> str:
        return self._file(self.EVALUATIONS, f"{split}.json")

    def read_split_metrics(self, split: str) -> SplitMetrics | None:
        """The last evaluation of `split`, or None when there is none (or it cannot be read)."""
        return self._read_record(self._split_metrics_file(split), SplitMetrics)

    def write_split_metrics(self, metrics: SplitMetrics) -> None:
        if self.primary:
            os.makedirs(self._file(self.EVALUATIONS), exist_ok=True)
            fs.write_text_atomic(self._split_metrics_file(metrics.split), json.dumps(metrics.to_dict(), indent=2))

    # ------------------------------------------------------------------ resuming and reading a run back

    def changed_settings(self, cfg: Config) -> list[str]:
        """Resuming needs the run's own config, up to RESUMABLE_CHANGES; returns the keys that changed."""
        if not self.has_config():
            return []
        saved = load_config(self._file(self.CONFIG))
        if dump_config(saved) == dump_config(cfg):
            return []
        import yaml

        a, b = yaml.safe_load(dump_config(saved)), yaml.safe_load(dump_config(cfg))
        diffs = sorted(_diff(a, b))
        blocking = [d for d in diffs if d not in RESUMABLE_CHANGES]
        if blocking:
            raise MedtlError(f"{self.path} holds a run with a different config ({', '.join(blocking[:5])} differ); "
                             "resume with the same config, or train into a new --workdir")
        return diffs


# Settings that change how a run executes, not what it learns: a resume may change them
# (e.g. more ranks with XLA on, or the records moved to object storage).
RESUMABLE_CHANGES = ("data.records", "train.jit_compile", "train.fp16_allreduce", "train.keep_checkpoints",
                     "train.nonfinite_patience", "train.stall_shutdown_seconds", "train.intra_op_threads",
                     "train.inter_op_threads")


def _diff(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            yield from _diff(a.get(key), b.get(key), f"{prefix}{key}.")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from _diff(x, y, f"{prefix}{i}.")
    elif a != b:
        yield prefix.rstrip(".")


def check_outside_records(cfg: Config, workdir: str) -> None:
    """Records are read-only input: the run folder and a cache folder must live elsewhere."""
    if "://" in cfg.data.records:
        return
    records = os.path.realpath(cfg.data.records)
    for what, path in (("--workdir", workdir), ("data.cache", cfg.data.cache)):
        if what == "data.cache" and path in ("none", "memory"):
            continue
        full = os.path.realpath(path)
        if full == records or full.startswith(records + os.sep):
            raise MedtlError(f"{what} {path} is inside the records folder {cfg.data.records}; records are read-only "
                             f"input to training: put {what} outside it")


def read_run(workdir: str, weights_file: str | None = None):
    """(cfg, manifest, weights path) of a trained run folder: its config, its records' manifest and its best
    weights (or `weights_file`), checked to exist, without TensorFlow."""
    from medtl.data.manifest import read_manifest

    run = RunDir(workdir)
    cfg = run.read_config()
    weights = weights_file or run.best_weights
    if not os.path.isfile(weights):
        raise MedtlError(f"run folder {workdir} has no checkpoint ({weights}); train it first with `medtl train`")
    return cfg, read_manifest(cfg.data.records), weights


def load_run(workdir: str, weights_file: str | None = None):
    """(cfg, manifest, model) for a run folder, with its best weights (or `weights_file`) loaded."""
    from medtl.models.build import build_model, set_precision

    cfg, manifest, weights = read_run(workdir, weights_file)
    set_precision("float32")  # inference in float32 whatever the training precision
    model = build_model(cfg, manifest.num_labels, weights="none")
    try:
        model.load_weights(weights)
    except OSError as exc:  # h5py: truncated or corrupt file, a damaged run folder (exit 1)
        raise RunFailure(f"checkpoint {weights} is damaged or unreadable ({str(exc).splitlines()[0][:160]}); "
                         "re-train, or restore the run folder from a copy") from None
    except Exception as exc:
        raise MedtlError(f"checkpoint {weights} does not match the run's config: {str(exc).splitlines()[0][:200]}") from None
    return cfg, manifest, model
