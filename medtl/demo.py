"""`medtl demo`: synth -> ingest -> train -> evaluate on built-in synthetic studies, through medtl.api.

Ends by printing the report path and the test macro AUROC with its bootstrap interval.
"""
from __future__ import annotations

import os
import time

from medtl import api
from medtl.utils.log import log


def run_demo(out: str, config: str, overrides: list[str], n: int = 5000, seed: int = 0) -> api.EvaluateResult:
    started = time.monotonic()
    studies = os.path.join(out, "studies")
    records = os.path.join(out, "records")
    run = os.path.join(out, "run")
    report = os.path.join(out, "report")
    cfg = api.load_job_config(config, [f"data.records={records}", f"seed={seed}", *overrides])

    log(f"demo 1/4: synthesising {n} studies into {studies}")
    synthetic = api.synth(studies, n, seed=seed, size=256)
    log(f"demo 2/4: ingesting into {records}")
    api.ingest(api.IngestOptions(images=synthetic.images, labels=synthetic.labels, out=records,
                                 image_size=cfg.data.image_size, bit_depth=16, val_fraction=0.15,
                                 test_fraction=0.25, seed=seed, salt_file=None, shard_mb=4.0))
    log(f"demo 3/4: training {len(cfg.phases)} phases into {run}")
    api.train(cfg, run)
    log(f"demo 4/4: evaluating the test split into {report}")
    result = api.evaluate(run, out=report, split="test")
    minutes = (time.monotonic() - started) / 60
    summary = result.metrics
    ci = result.macro_auroc_ci
    interval = (f" ({summary['bootstrap']['confidence']:.0%} CI {ci[0]:.3f}-{ci[1]:.3f}, "
                f"patient-level bootstrap)" if ci else "")
    print(f"\nmedtl demo finished in {minutes:.1f} min: test macro AUROC {result.macro_auroc:.3f}{interval} "
          f"over {len(summary['labels'])} findings, {result.num_images} test images of {result.num_patients} "
          f"patients.")
    print(f"report: {os.path.abspath(result.report_path)}")
    return result
