"""`medtl bench input` end to end, on tiny images and short stages (no figure is judged here)."""
import os
import re

import cv2
import numpy as np
import pytest

from medtl.bench.input import STAGES
from medtl.data.manifest import read_manifest

from conftest import assert_user_error, record_images, run_cli

pytestmark = pytest.mark.slow

ROW = re.compile(r"^\(([\w-]+)\) (.+?)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$")


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
    for key in ("(b)/(a) = ", "(c)/(a) = ", "(c)/(b) = ", "(c)/(d) = ", "(c)/(e) = ", "(b-raw)/(a-raw) = ",
                "(c-raw)/(a-raw) = ", "(c-raw)/(b-raw) = ", "(b-raw)/(b) = "):
        assert key in r.stdout
    assert re.search(r"^\(c-raw\)/\(b-raw\) = .* goal >= 0.9: ", r.stdout, re.M)
    assert re.search(r"^\(b-raw\)/\(a-raw\) = .* goal >= 0.5: ", r.stdout, re.M) and "goal >= 3" in r.stdout
    # data.augment_on: device: the input pipeline's part, against the read limit and the CPU pipeline without
    # augmentation, and the training step's part measured on this CPU.
    assert re.search(r"^\(c-dev\)/\(a-raw\) = .* goal >= 0.5: ", r.stdout, re.M)
    # Its augmentation is not in the input pipeline at all: against (b-raw) it is for reference, not a goal.
    assert re.search(r"^\(c-dev\)/\(b-raw\) = .* \(for reference\)$", r.stdout, re.M)
    step = re.search(r"run here on this CPU it costs ([\d.]+) ms per image with the policy, ([\d.]+) ms without",
                     r.stdout)
    assert step and float(step.group(1)) > float(step.group(2)) > 0, r.stdout
    for encoding, stage, goal in (("png", "c", "goal <= 4: "), ("raw", "c-raw", "goal <= 1.5: "),
                                  (r"raw, augmentation on the device", "c-dev", "goal <= 1.5: ")):
        caveat = r" \(if the GPU keeps that rate with the augmentation on it: not measured here\)" if stage == "c-dev" \
            else ""
        assert re.search(rf"^{encoding}: one 470 img/s GPU \(A100\) needs 470 / [\d.]+ = [\d.]+ cores at \({stage}\)"
                         rf"{caveat}\s+{goal}", r.stdout, re.M), r.stdout
        assert re.search(rf"^{encoding}: one 1000 img/s GPU \(H100 class\) needs", r.stdout, re.M)
    # Pixels decoded per pixel used: (64 / 48)^2 for the png shards; none for raw ones at the input size.
    assert "png: 64 px stored for a 48 px input: 1.78 decoded, 1.78 read per pixel used" in r.stdout
    assert "raw: 48 px stored for a 48 px input: none decoded, 1.00 read per pixel used" in r.stdout
    assert "machine: " in r.stdout and "load average before" in r.stdout
    # Each transform of the default policy costed alone; the policy is their averages plus the loop's own cost.
    from medtl.config import DEFAULT_AUGMENT

    costs = {m.group(1): [float(m.group(i)) for i in (2, 3, 4)] for m in
             re.finditer(r"^(\w+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", r.stdout, re.M)}
    assert list(costs) == [t.name for t in DEFAULT_AUGMENT], r.stdout
    for t in DEFAULT_AUGMENT:
        p, applied, average = costs[t.name]
        assert p == dict(t.args)["p"] and average == pytest.approx(applied * p, abs=1.5e-3)
    loop = float(re.search(r"^\(seeding and Compose\)\s+([\d.]+)$", r.stdout, re.M).group(1))
    total = float(re.search(r"^policy\s+([\d.]+)$", r.stdout, re.M).group(1))
    assert total == pytest.approx(loop + sum(c[2] for c in costs.values()), abs=4e-3) and total > 0
    budget = re.search(r"^\(b-raw\) costs ([\d.]+) ms per image; \(c-raw\)/\(b-raw\) >= 0.9 leaves ([\d.]+) ms", r.stdout,
                       re.M)
    assert float(budget.group(1)) == pytest.approx(1e3 / rows["b-raw"][1], rel=0.01)
    assert float(budget.group(2)) == pytest.approx(float(budget.group(1)) / 9, abs=2e-3)
    manifest = read_manifest(work / "records")
    assert (manifest.stored_image_size, manifest.bit_depth, manifest.records("train")) == (64, 16, 24)
    raw = read_manifest(work / "records-raw")
    assert (raw.encoding, raw.stored_image_size, raw.bit_depth, raw.records("train")) == ("raw", 48, 16, 24)
    assert len(os.listdir(work / "png")) == 24


def test_bench_reads_given_records(records, tmp_path):
    r = run_cli("bench", "input", "--records", records, "--image-size", 32, "--batch-size", 8, "--seconds", 0.3,
                "--rounds", 1, "--max-png", 16, "--work", tmp_path / "work")
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(_rows(r.stdout)) == sorted(STAGES)
    assert f"in {records}; (d) and (e) read 16 of them" in r.stdout
    # Its decode-free stages read its first --max-png records rewritten as raw pixels at the input size.
    raw = read_manifest(tmp_path / "work" / "records-raw")
    assert (raw.encoding, raw.stored_image_size, raw.records("train")) == ("raw", 32, 16)
    assert "(a-raw)-(c-raw) read 32 px 16-bit raw shards (16 train records" in r.stdout
    # Those pixels are the 64 px PNG records' shrunk 2x by area: means of 2x2 blocks (OpenCV decodes the PNGs).
    raw_images = record_images(tmp_path / "work" / "records-raw", "train", "image/raw")
    pngs = record_images(records, "train", "image/png")
    assert len(raw_images) == 16
    for key, data in raw_images.items():
        levels = cv2.imdecode(np.frombuffer(pngs[key], np.uint8), cv2.IMREAD_UNCHANGED).astype(np.float64)
        want = levels.reshape(32, 2, 32, 2).mean(axis=(1, 3))
        np.testing.assert_allclose(np.frombuffer(data, "<u2").reshape(32, 32), want, atol=1.0)



def test_bench_user_errors(tmp_path):
    assert_user_error(run_cli("bench", "input", "--records", tmp_path / "absent"), "no manifest.json in")
    assert_user_error(run_cli("bench", "input", "--seconds", 0), "--seconds must be > 0")


def test_bench_help():
    r = run_cli("bench", "input", "--help")
    assert r.returncode == 0 and "usage: medtl bench input" in r.stdout and "--alternatives" in r.stdout
