"""Run folders: epoch checkpoints with resume state, and reading a run back for evaluation.

RUN/checkpoints/
  epoch-NNNN.weights.h5        model + optimizer state after global epoch NNNN (the last K kept)
  phase<i>-<name>.weights.h5   best weights of phase i (by val macro AUROC)
  best.weights.h5              best weights over all phases
  state.json                   the resume pointer, written last and atomically

A checkpoint file is complete before state.json names it, and is deleted only after
state.json has moved past it, so the pointer never names a missing file.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field

from medtl.config import Config, dump_config, load_config
from medtl.errors import MedtlError
from medtl.utils import faults

CONFIG_FILE = "config.yaml"
HISTORY_FILE = "history.jsonl"
CHECKPOINT_DIR = "checkpoints"
BEST_WEIGHTS = "best.weights.h5"
STATE_FILE = "state.json"
EPOCH_FILE = re.compile(r"^epoch-(\d{4})\.weights\.h5$")


def phase_weights_name(index: int, name: str) -> str:
    return f"phase{index}-{name}.weights.h5"


def epoch_weights_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}.weights.h5"


@dataclass
class RunState:
    """Where a run stands after its last completed epoch."""

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


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_weights_atomic(model, path: str) -> None:
    """Write to a temporary name, then rename (Keras picks the format from the .weights.h5 suffix;
    it stores variables by object path, and the optimizer's state with them)."""
    tmp = path[: -len(".weights.h5")] + ".tmp.weights.h5"
    model.save_weights(tmp)
    os.replace(tmp, path)


def read_state(workdir: str) -> RunState | None:
    path = os.path.join(workdir, CHECKPOINT_DIR, STATE_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            state = RunState(**json.load(fh))
    except (json.JSONDecodeError, TypeError) as exc:
        raise MedtlError(f"{path} is unreadable ({exc}); delete the run folder's checkpoints/ to start over") from None
    if state.checkpoint and not os.path.exists(os.path.join(workdir, CHECKPOINT_DIR, state.checkpoint)):
        raise MedtlError(f"{path} names {state.checkpoint}, which is missing; restore it or start a new --workdir")
    return state


def commit_epoch(model, workdir: str, state: RunState, history_row: dict, keep: int) -> None:
    """Rank 0, at an epoch end: checkpoint, history line, then the state pointer; prune old epochs."""
    folder = os.path.join(workdir, CHECKPOINT_DIR)
    name = epoch_weights_name(state.epochs_done - 1)
    save_weights_atomic(model, os.path.join(folder, name))
    faults.in_checkpoint(state.epochs_done - 1)
    with open(os.path.join(workdir, HISTORY_FILE), "a", encoding="utf-8") as fh:
        fh.write(json.dumps(history_row, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    state.checkpoint = name
    state.history_lines += 1
    _write_atomic(os.path.join(folder, STATE_FILE), json.dumps(asdict(state), indent=2, sort_keys=True))
    epochs = sorted(f for f in os.listdir(folder) if EPOCH_FILE.match(f))
    for old in epochs[:-keep]:
        if old != state.checkpoint:
            os.remove(os.path.join(folder, old))


def save_state(workdir: str, state: RunState) -> None:
    _write_atomic(os.path.join(workdir, CHECKPOINT_DIR, STATE_FILE), json.dumps(asdict(state), indent=2, sort_keys=True))


def trim_history(workdir: str, lines: int) -> None:
    """Drop history rows of epochs that were not checkpointed (a kill between the two writes)."""
    path = os.path.join(workdir, HISTORY_FILE)
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as fh:
        rows = fh.readlines()
    if len(rows) != lines:
        _write_atomic(path, "".join(rows[:lines]))


# Settings that change how a run executes, not what it learns: a resume may change them
# (e.g. more ranks with XLA on, or the records moved to object storage).
RESUMABLE_CHANGES = ("data.records", "train.jit_compile", "train.fp16_allreduce", "train.keep_checkpoints",
                     "train.nonfinite_patience", "train.stall_shutdown_seconds", "train.intra_op_threads",
                     "train.inter_op_threads")


def check_same_config(workdir: str, cfg: Config) -> list[str]:
    """Resuming needs the run's own config, up to RESUMABLE_CHANGES; returns the keys that changed."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return []
    saved = load_config(path)
    if dump_config(saved) == dump_config(cfg):
        return []
    import yaml

    a, b = yaml.safe_load(dump_config(saved)), yaml.safe_load(dump_config(cfg))
    diffs = sorted(_diff(a, b))
    blocking = [d for d in diffs if d not in RESUMABLE_CHANGES]
    if blocking:
        raise MedtlError(f"{workdir} holds a run with a different config ({', '.join(blocking[:5])} differ); resume "
                         "with the same config, or train into a new --workdir")
    return diffs


def _diff(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            yield from _diff(a.get(key), b.get(key), f"{prefix}{key}.")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from _diff(x, y, f"{prefix}{i}.")
    elif a != b:
        yield prefix.rstrip(".")


def load_run(workdir: str, weights_file: str | None = None):
    """(cfg, manifest, model) for a run folder, with the best weights loaded."""
    from medtl.data.ingest import read_manifest
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
