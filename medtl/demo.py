"""`medtl demo`: transfer learning end to end on built-in synthetic studies, through medtl.api.

An archive of studies labeled with some findings pretrains the base in-domain (`medtl pretrain`); a
labeled target job on other patients and other findings then trains in phases from that base file; a
head-only run on a random base of the same architecture is the control. Ends by printing the head-only
val AUROC of both bases, the test macro AUROC with its bootstrap interval, and the report path.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

from medtl import api
from medtl.utils.log import log

# The archive's findings (pretraining) and the target job's: disjoint, so the head-only phase measures how
# well features learned for other findings serve new ones. Chosen by measurement (docs/training.md, "The
# demo"): Mass and Nodule are the findings that 64 px and a short schedule learn worst, so they are the
# archive's, and the target's three findings each share structure with an archive finding (a basal band
# and fluid with the heart and lung-volume findings, the perihilar haze of edema with infiltration).
ARCHIVE_FINDINGS = ("Cardiomegaly", "Infiltration", "Mass", "Nodule", "Pneumothorax")
TARGET_FINDINGS = ("Atelectasis", "Edema", "Effusion")
# Synthesised at this side, stored at the job's data.image_size.
SYNTH_SIZE = 128
# The archive's patients are numbered from here, so that no archive patient shares an id with a target one.
ARCHIVE_FIRST_PATIENT = 1_000_000


@dataclass(frozen=True)
class DemoResult:
    evaluation: api.EvaluateResult
    base_weights: str
    head_only_val_auroc: float | None         # the target's head phase on the pretrained base
    random_head_only_val_auroc: float | None  # the same phase on a random base (the control)
    minutes: float


def _ingest(synthetic: api.SynthResult, out: str, labels, image_size: int, seed: int, val: float,
            test: float) -> api.IngestResult:
    return api.ingest(api.IngestOptions(images=synthetic.images, labels=synthetic.labels, out=out,
                                        image_size=image_size, bit_depth=16, val_fraction=val, test_fraction=test,
                                        seed=seed, salt_file=None, shard_mb=4.0, label_names=tuple(labels)))


def prepare_records(out: str, n: int, archive_n: int, seed: int, image_size: int, archive_image_size: int,
                    step: str = "demo") -> tuple[str, str]:
    """Synthesise and ingest the archive (pretraining; no test split) and the target set into
    OUT/records/{archive,target}; returns (archive records, target records). Records already there are kept."""
    from medtl.data.manifest import manifest_path

    archive_records, target_records = (os.path.join(out, "records", name) for name in ("archive", "target"))
    if os.path.exists(manifest_path(archive_records)) and os.path.exists(manifest_path(target_records)):
        log(f"{step}: using the records in {os.path.join(out, 'records')}")
        return archive_records, target_records
    log(f"{step}: synthesising an archive of {archive_n} studies and a target set of {n} studies")
    archive = api.synth(os.path.join(out, "archive"), archive_n, seed=seed + 1, size=SYNTH_SIZE,
                        first_patient=ARCHIVE_FIRST_PATIENT)
    target = api.synth(os.path.join(out, "studies"), n, seed=seed, size=SYNTH_SIZE)
    log(f"{step}: ingesting the archive with {', '.join(ARCHIVE_FINDINGS)} and the target with "
        f"{', '.join(TARGET_FINDINGS)}")
    _ingest(archive, archive_records, ARCHIVE_FINDINGS, archive_image_size, seed, 0.1, 0.0)
    _ingest(target, target_records, TARGET_FINDINGS, image_size, seed, 0.15, 0.25)
    return archive_records, target_records


def run_demo(out: str, config: str, overrides: list[str], n: int = 5000, seed: int = 0,
             pretrain_config: str | None = None, archive_n: int = 6000) -> DemoResult:
    from medtl import jobfiles

    started = time.monotonic()
    folders = {name: os.path.join(out, name) for name in ("base", "control", "run", "report")}
    pretrain_config = pretrain_config or jobfiles.job_file("demo_pretrain.yaml")
    pre_cfg = api.load_job_config(pretrain_config, [f"seed={seed}", *overrides])
    cfg = api.load_job_config(config, [f"seed={seed}", *overrides])
    head = cfg.phases[0]

    archive_records, target_records = prepare_records(out, n, archive_n, seed, cfg.data.image_size,
                                                      pre_cfg.data.image_size, "demo 1-2/6")
    log(f"demo 3/6: pretraining the {pre_cfg.model.backbone} base on the archive ({pre_cfg.pretrain.method})")
    base = api.pretrain(api.load_job_config(pretrain_config, [f"data.records={archive_records}", f"seed={seed}",
                                                              *overrides]), folders["base"])
    target = [f"data.records={target_records}", f"seed={seed}", *overrides]
    log(f"demo 4/6: the control: phase '{head.name}' of the target job on a random {cfg.model.backbone} base")
    control = api.train(api.load_job_config(config, [*target, "model.weights=none"]), folders["control"],
                        until_phase=head.name)
    log(f"demo 5/6: training the target job's {len(cfg.phases)} phases from the pretrained base")
    trained = api.train(api.load_job_config(config, [*target, f"model.weights={base.base_weights}"]), folders["run"])
    log(f"demo 6/6: evaluating the test split into {folders['report']}")
    result = api.evaluate(folders["run"], out=folders["report"], split="test")
    demo = DemoResult(result, base.base_weights, (trained.phase_best_val_auroc or {}).get(head.name),
                      (control.phase_best_val_auroc or {}).get(head.name), (time.monotonic() - started) / 60)
    _print_summary(demo, head.name)
    return demo


def _print_summary(demo: DemoResult, head_phase: str) -> None:
    result = demo.evaluation
    summary = result.metrics
    ci = result.macro_auroc_ci
    interval = (f" ({summary['bootstrap']['confidence']:.0%} CI {ci[0]:.3f}-{ci[1]:.3f}, "
                f"patient-level bootstrap)" if ci else "")

    def fmt(value):
        return "n/a" if value is None else f"{value:.3f}"

    print(f"\nmedtl demo finished in {demo.minutes:.1f} min.")
    print(f"head-only phase '{head_phase}' (frozen base): val macro AUROC {fmt(demo.head_only_val_auroc)} on the "
          f"pretrained base, {fmt(demo.random_head_only_val_auroc)} on a random base")
    print(f"after all phases: test macro AUROC {result.macro_auroc:.3f}{interval} over {len(summary['labels'])} "
          f"findings, {result.num_images} test images of {result.num_patients} patients.")
    cal = summary.get("calibration") or {}
    if cal.get("method", "none") != "none":
        pooled = cal["micro"]
        # Pooling mixes rare and common findings; the worst single label is the figure a reviewer checks.
        worst = max(cal["labels"], key=lambda name: cal["labels"][name]["ece_after"] or 0.0)
        print(f"calibration ({cal['method']}, fitted on val): test ECE {fmt(pooled['ece_before'])} before, "
              f"{fmt(pooled['ece_after'])} after (all labels pooled); worst label after: {worst} "
              f"{fmt(cal['labels'][worst]['ece_after'])}")
    print(f"base: {os.path.abspath(demo.base_weights)}")
    print(f"report: {os.path.abspath(result.report_path)}")
