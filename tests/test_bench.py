"""`medtl bench input` end to end, on tiny images and short stages (no figure is judged here)."""
import os
import re

import pytest

from medtl.bench.input import STAGES
from medtl.data.manifest import read_manifest

from conftest import assert_user_error, run_cli

pytestmark = pytest.mark.slow

ROW = re.compile(r"^\((\w)\) (.+?)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$")


def _rows(stdout: str) -> dict:
    return {m.group(1): [float(m.group(i)) for i in (3, 4, 5)] for m in map(ROW.match, stdout.splitlines()) if m}


def test_bench_synthesises_its_source_and_measures_every_stage(tmp_path):
    work = tmp_path / "work"
    r = run_cli("bench", "input", "--image-size", 48, "--source-size", 64, "--n", 24, "--batch-size", 8,
                "--seconds", 0.3, "--rounds", 1, "--work", work)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(r.stdout)
    assert sorted(rows) == sorted(STAGES)
    assert all(v > 0 for row in rows.values() for v in row)
    for key in ("(c)/(b) = ", "(c)/(d) = ", "(c)/(e) = "):
        assert key in r.stdout
    assert "goal >= 0.85" in r.stdout and "goal >= 3" in r.stdout and re.search(r"470 img/s GPU needs .* cores", r.stdout)
    assert "machine: " in r.stdout and "load average before" in r.stdout
    manifest = read_manifest(work / "records")
    assert (manifest.stored_image_size, manifest.bit_depth, manifest.records("train")) == (64, 16, 24)
    assert len(os.listdir(work / "png")) == 24


def test_bench_reads_given_records(records, tmp_path):
    r = run_cli("bench", "input", "--records", records, "--image-size", 32, "--batch-size", 8, "--seconds", 0.3,
                "--rounds", 1, "--max-png", 16, "--work", tmp_path / "work")
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(_rows(r.stdout)) == sorted(STAGES)
    assert f"in {records}; (d) and (e) read 16 of them" in r.stdout


def test_bench_user_errors(tmp_path):
    assert_user_error(run_cli("bench", "input", "--records", tmp_path / "absent"), "no manifest.json in")
    assert_user_error(run_cli("bench", "input", "--seconds", 0), "--seconds must be > 0")


def test_bench_help():
    r = run_cli("bench", "input", "--help")
    assert r.returncode == 0 and "usage: medtl bench input" in r.stdout and "--alternatives" in r.stdout
