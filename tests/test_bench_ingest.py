"""`medtl bench ingest` runs end to end and prints both figures and the ratio (values are not asserted)."""
import re

import pytest

from conftest import run_cli


@pytest.mark.slow
def test_bench_ingest_prints_ratio():
    r = run_cli("bench", "ingest", "--n", 12, "--workers", 2, "--source-size", 128, "--image-size", 48)
    assert r.returncode == 0, r.stderr
    assert re.search(r"1 worker\(s\): +[\d.]+ images/s", r.stdout)
    assert re.search(r"2 worker\(s\): +[\d.]+ images/s .* ratio vs 1 worker: [\d.]+x", r.stdout)
