"""`medtl demo`: synth -> ingest -> train -> evaluate on built-in synthetic studies.

Ends by printing the report path and the test macro AUROC with its bootstrap interval.
"""
from __future__ import annotations

import os
import time

from medtl.utils.log import log


def run_demo(out: str, config: str, overrides: list[str], n: int = 5000, seed: int = 0) -> dict:
    from medtl.cli import load_job_config
    from medtl.data.ingest import IngestOptions, ingest
    from medtl.data.synth import synthesize
    from medtl.utils.progress import Progress

    started = time.monotonic()
    studies = os.path.join(out, "studies")
    records = os.path.join(out, "records")
    run = os.path.join(out, "run")
    report = os.path.join(out, "report")
    cfg = load_job_config(config, [f"data.records={records}", f"seed={seed}", *overrides])

    log(f"demo 1/4: synthesising {n} studies into {studies}")
    with Progress(n, "synth") as bar:
        synthesize(studies, n, seed=seed, size=256, progress=bar)
    log(f"demo 2/4: ingesting into {records}")
    ingest(IngestOptions(images=os.path.join(studies, "images"), labels=os.path.join(studies, "labels.csv"),
                         out=records, image_size=cfg.data.image_size, bit_depth=16, val_fraction=0.15,
                         test_fraction=0.25, seed=seed, salt_file=None,
                         shard_mb=4.0))
    log(f"demo 3/4: training {len(cfg.phases)} phases into {run}")
    from medtl.train.loop import train

    train(cfg, run)
    log(f"demo 4/4: evaluating the test split into {report}")
    from medtl.evaluate.run import evaluate_run

    summary = evaluate_run(run, "test", report)
    minutes = (time.monotonic() - started) / 60
    macro = summary["macro"]
    ci = macro.get("auroc_ci")
    interval = (f" ({summary['bootstrap']['confidence']:.0%} CI {ci[0]:.3f}-{ci[1]:.3f}, "
                f"patient-level bootstrap)" if ci else "")
    print(f"\nmedtl demo finished in {minutes:.1f} min: test macro AUROC {macro['auroc']:.3f}{interval} "
          f"over {len(summary['labels'])} findings, {summary['n']} test images of {summary['patients']} patients.")
    print(f"report: {os.path.abspath(os.path.join(report, 'report.html'))}")
    return summary
