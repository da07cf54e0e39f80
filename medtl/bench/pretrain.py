"""`medtl bench pretrain`: what an in-domain pretrained base buys at each label budget, in one run.

For each fraction of the target's train labels (nested, patient-level subsets: data.train_fraction), the
target job's phases from the pretrained base against training from scratch on the same budget: the same
train subset and the same total epochs, in one phase that trains every layer and its BatchNorm statistics
from a random initialisation at the head phase's learning rate, with a one-epoch warmup and cosine decay
(the recipe that trains a random base best here). Both are scored on the same test split. Goal: at 5% of
the labels, the pretrained base is at least 0.05 test macro AUROC ahead.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile

from medtl.config import Config, PhaseConfig, Trainable
from medtl.errors import MedtlError
from medtl.utils.log import log

GOAL_FRACTION, GOAL_GAP = 0.05, 0.05


def parse_fractions(text: str) -> tuple[float, ...]:
    """'0.05,0.25,1' -> (0.05, 0.25, 1.0), checked: each in (0, 1], distinct."""
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise MedtlError(f"--fractions {text!r}: expected comma-separated numbers in (0, 1], e.g. 0.05,0.25,1") from None
    bad = [v for v in values if not 0 < v <= 1]
    if not values or bad:
        raise MedtlError(f"--fractions {text!r}: every fraction must be in (0, 1]"
                         f"{', got ' + ', '.join(f'{v:g}' for v in bad) if bad else ''}")
    if len(set(values)) != len(values):
        raise MedtlError(f"--fractions {text!r} lists a fraction twice")
    return tuple(sorted(values))


def scratch_config(cfg: Config) -> Config:
    """From scratch on the same budget: one phase of all the target phases' epochs, every layer and BatchNorm
    training from a random base."""
    epochs = sum(phase.epochs for phase in cfg.phases)
    phase = PhaseConfig(name="scratch", epochs=epochs, learning_rate=cfg.phases[0].learning_rate,
                        trainable=Trainable(kind="all"), train_batch_norm=True, schedule="cosine",
                        warmup_epochs=min(1.0, float(epochs)))
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights="none"), phases=(phase,))


def _with(cfg: Config, records: str, fraction: float, weights: str | None = None) -> Config:
    data = dataclasses.replace(cfg.data, records=records, train_fraction=fraction)
    model = cfg.model if weights is None else dataclasses.replace(cfg.model, weights=weights)
    return dataclasses.replace(cfg, data=data, model=model)


def _arm(cfg: Config, workdir: str, head_phase: str | None) -> dict:
    """Train (or resume) one arm and evaluate its test split."""
    from medtl import api

    trained = api.train(cfg, workdir)
    report = api.evaluate(workdir, out=os.path.join(workdir, "report-test"), split="test")
    head = (trained.phase_best_val_auroc or {}).get(head_phase) if head_phase else None
    return {"test_auroc": report.macro_auroc, "ci": report.macro_auroc_ci, "head_only_val_auroc": head}


def run(cfg: Config, pre_cfg: Config, fractions: tuple[float, ...], records: str | None, archive: str | None,
        base: str | None, n: int, archive_n: int, keep: str | None) -> list[dict]:
    from medtl import api
    from medtl.data.manifest import read_manifest
    from medtl.data.pipeline import train_subset
    from medtl.demo import prepare_records

    root = keep or tempfile.mkdtemp(prefix="medtl-bench-pretrain-")
    if records is None:
        archive_default, records = prepare_records(root, n, archive_n, cfg.seed, cfg.data.image_size,
                                                   pre_cfg.data.image_size, "bench pretrain")
        archive = archive or archive_default
    if base is None:
        if archive is None:
            raise MedtlError("--records needs --archive (records to pretrain on) or --base (a base file)")
        log(f"bench pretrain: pretraining the base on {archive} ({pre_cfg.pretrain.method})")
        base = api.pretrain(dataclasses.replace(pre_cfg, data=dataclasses.replace(pre_cfg.data, records=archive)),
                            os.path.join(root, "base")).base_weights
    manifest = read_manifest(records)
    rows = []
    for fraction in fractions:
        pretrained_cfg = _with(cfg, records, fraction, base)
        subset = train_subset(pretrained_cfg, manifest)
        images = subset.records if subset else manifest.records("train")
        patients = len(subset.patients) if subset else manifest.splits["train"].patients
        log(f"bench pretrain: {fraction:g} of the train labels ({images} images of {patients} patients): "
            f"pretrained base, then from scratch")
        tag = f"{fraction:g}".replace(".", "p")
        pretrained = _arm(pretrained_cfg, os.path.join(root, f"pretrained-{tag}"), cfg.phases[0].name)
        scratch = _arm(scratch_config(_with(cfg, records, fraction)), os.path.join(root, f"scratch-{tag}"), None)
        rows.append({"fraction": fraction, "images": images, "patients": patients, "pretrained": pretrained,
                     "scratch": scratch, "gap": pretrained["test_auroc"] - scratch["test_auroc"]})
    print(format_table(cfg, rows, base, manifest.records("test")))
    if keep is None:
        shutil.rmtree(root, ignore_errors=True)
    return rows


def _auroc(arm: dict) -> str:
    ci = arm["ci"]
    return f"{arm['test_auroc']:.3f} ({ci[0]:.3f}-{ci[1]:.3f})" if ci else f"{arm['test_auroc']:.3f}"


def format_table(cfg: Config, rows: list[dict], base: str, test_images: int) -> str:
    epochs = sum(phase.epochs for phase in cfg.phases)
    lines = [f"bench pretrain: {cfg.model.backbone} at {cfg.data.image_size} px, base {base}; phases "
             f"{' -> '.join(p.name for p in cfg.phases)} ({epochs} epochs) against scratch ({epochs} epochs, all "
             f"layers); test macro AUROC (95% CI) on {test_images} test images",
             "| train labels | images | patients | head-only val AUROC | pretrained | scratch | gap |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        head = row["pretrained"]["head_only_val_auroc"]
        lines.append(f"| {row['fraction']:.0%} | {row['images']} | {row['patients']} | "
                     f"{'n/a' if head is None else f'{head:.3f}'} | {_auroc(row['pretrained'])} | "
                     f"{_auroc(row['scratch'])} | {row['gap']:+.3f} |")
    goal = [row for row in rows if abs(row["fraction"] - GOAL_FRACTION) < 1e-9]
    if goal:
        met = "met" if goal[0]["gap"] >= GOAL_GAP else "not met"
        lines.append(f"goal: at {GOAL_FRACTION:.0%} of the labels the pretrained base is >= {GOAL_GAP} ahead: "
                     f"{goal[0]['gap']:+.3f}, {met}")
    return "\n".join(lines)
