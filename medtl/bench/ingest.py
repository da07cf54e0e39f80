"""`medtl bench ingest`: ingest images/s with N local decode workers against 1, in one run.

Sources are synthetic 16-bit DICOM studies at a realistic size (default 1024 px,
as ChestX-ray14 ships), so the figure includes DICOM parsing, the LUTs, resizing
and PNG encoding, as a hospital export would.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time

from medtl.utils.log import log


def run(n: int = 400, workers: int = 0, source_size: int = 1024, image_size: int = 512, repeats: int = 1,
        keep: str | None = None) -> dict:
    """Ingest the same studies with 1 worker and with `workers` (default: all cores); print images/s."""
    from medtl.data.ingest import IngestOptions, ingest
    from medtl.data.synth import synthesize

    workers = workers or os.cpu_count() or 1
    root = keep or tempfile.mkdtemp(prefix="medtl-bench-ingest-")
    studies = os.path.join(root, "studies")
    if not os.path.exists(os.path.join(studies, "labels.csv")):
        log(f"bench ingest: writing {n} synthetic {source_size} px DICOM studies to {studies}")
        synthesize(studies, n, seed=0, size=source_size, dicom=True)
    import medtl.data.records  # noqa: F401  (TensorFlow's import cost is not ingest throughput)

    results = {}
    for count in sorted({1, workers}):
        best = 0.0
        for attempt in range(repeats):
            out = os.path.join(root, f"records-{count}-{attempt}")
            opt = IngestOptions(images=os.path.join(studies, "images"), labels=os.path.join(studies, "labels.csv"),
                                out=out, image_size=image_size, workers=count, progress=False,
                                salt_file=None)
            start = time.perf_counter()
            ingest(opt)
            best = max(best, n / (time.perf_counter() - start))
            shutil.rmtree(out)
        results[count] = best
    base = results[1]
    lines = [f"bench ingest: {n} DICOM studies {source_size} px -> {image_size} px 16-bit PNG shards, "
             f"{os.cpu_count()} CPU cores, best of {repeats}"]
    for count, rate in results.items():
        lines.append(f"  {count} worker(s): {rate:8.1f} images/s  ({rate / count:.1f} per worker)  "
                     f"ratio vs 1 worker: {rate / base:.2f}x")
    print("\n".join(lines))
    if keep is None:
        shutil.rmtree(root, ignore_errors=True)
    return {"images": n, "rates": results, "ratio": results[workers] / base}
