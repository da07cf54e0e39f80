"""Ingest under faults and bad input: a killed run, a corpus of broken DICOMs, fuzzed bytes (checks 4, 6, 12)."""
import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from conftest import assert_user_error, ingest_args, tree_bytes
from reliability.helpers import REPO, env, report, run_cli

# pydicom's wheel ships these real files; get_testdata_files() would also try to download more.
PYDICOM_FILES = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")


def test_killed_ingest_leaves_no_final_shard_and_rerun_matches(studies, tmp_path):
    clean = tmp_path / "clean"
    assert run_cli("ingest", *ingest_args(studies, clean), env=env()).returncode == 0
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "medtl", "ingest", *map(str, ingest_args(studies, out))]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once the first shard of the part is complete
        part = out / ".parts"
        if part.exists() and any(f.endswith(".tfrecord") for _, _, files in os.walk(part) for f in files):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -9
    finals = [f for f in os.listdir(out) if f.endswith(".tfrecord")]
    assert finals == [] and not (out / "manifest.json").exists()
    assert_user_error(run_cli("verify", out), "no manifest.json")
    r = run_cli("ingest", *ingest_args(studies, out), env=env())
    assert r.returncode == 0, r.stderr
    assert (out / "manifest.json").read_bytes() == (clean / "manifest.json").read_bytes()
    assert tree_bytes(out) == tree_bytes(clean)
    report("4. Kill during ingest", "SIGKILL of `medtl ingest` after its first shard was written",
           "no shard under a final name and no manifest; the re-run's folder (manifest included) is byte-identical "
           "to a clean run's", processes_killed=1)


def _parts(studies, out, workers):
    for w in range(workers):
        r = run_cli("ingest", *ingest_args(studies, out, "--worker-index", w, "--num-workers", workers), env=env())
        assert r.returncode == 0, r.stderr


def test_killed_finalize_reruns_to_the_same_bytes(studies, tmp_path):
    template = tmp_path / "template"
    _parts(studies, template, 2)
    shards = sum(len(s["shards"]) for part in template.glob(".parts/*/part.json")
                 for s in json.loads(part.read_text())["splits"].values())
    assert shards >= 6, shards

    def finalize(out, **extra):
        return run_cli("ingest-finalize", *ingest_args(studies, out, "--num-workers", 2), env=env(**extra))

    clean = tmp_path / "clean"
    shutil.copytree(template, clean)
    assert finalize(clean).returncode == 0
    # Where the kill lands: before the first shard, mid-way, before the manifest, and while removing the parts.
    kills = ["kill_in_finalize:step=0", f"kill_in_finalize:step={shards // 2}", f"kill_in_finalize:step={shards}",
             "kill_in_cleanup:step=1"]
    for fault in kills:
        out = tmp_path / fault.replace(":", "-").replace("=", "")
        shutil.copytree(template, out)
        killed = finalize(out, MEDTL_FAULTS=fault)
        assert killed.returncode == -signal.SIGKILL, (fault, killed.stderr)
        assert (out / "manifest.json").exists() == fault.startswith("kill_in_cleanup"), fault
        assert (out / ".parts").exists(), fault
        r = finalize(out)
        assert r.returncode == 0, (fault, r.stderr)
        assert not (out / ".parts").exists(), fault
        assert tree_bytes(out) == tree_bytes(clean), fault
    assert run_cli("verify", clean, env=env()).returncode == 0
    report("4b. Kill during ingest-finalize", f"SIGKILL of `medtl ingest-finalize` (2 worker parts, {shards} shards) "
           f"before its first rename, after {shards // 2} renames, before the manifest, and while removing the parts",
           "each re-run of the same finalize exits 0 and leaves a folder byte-identical to a clean finalize's "
           "(moved shards recognised by SHA-256; the parts kept until the manifest is written and checked)",
           processes_killed=len(kills))


def _dicom(path, pixels, frames=None, syntax=ExplicitVRLittleEndian):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SamplesPerPixel, ds.PhotometricInterpretation = "DX", 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if frames:
        ds.NumberOfFrames = frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def _table(folder, names, path):
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "patient", "finding"])
        for i, name in enumerate(names):
            writer.writerow([name, f"p{i}", i % 2])


def _shard_keys(records):
    from medtl.data.records import KEY, feature_spec
    from medtl.tf import tf

    keys = []
    for shard in sorted(os.listdir(records)):
        if shard.endswith(".tfrecord"):
            for record in tf.data.TFRecordDataset(os.path.join(records, shard)):
                keys.append(tf.io.parse_single_example(record, feature_spec(1))[KEY].numpy().decode())
    return keys


def test_bad_dicom_corpus_is_quarantined_with_reasons(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    good = rng.integers(0, 4096, (40, 40))
    bad = {  # file -> the reason quarantine.csv must give
        "not_dicom.dcm": "not_dicom", "no_pixels.dcm": "no_pixel_data", "truncated.dcm": "truncated_pixel_data",
        "jpeg_lossy.dcm": "unsupported_transfer_syntax", "frames_uncounted.dcm": "bad_image_header"}
    shutil.copy(os.path.join(PYDICOM_FILES, "README.txt"), images / "not_dicom.dcm")  # real files, where pydicom
    shutil.copy(os.path.join(PYDICOM_FILES, "rtplan.dcm"), images / "no_pixels.dcm")  # ships one
    shutil.copy(os.path.join(PYDICOM_FILES, "MR_truncated.dcm"), images / "truncated.dcm")
    shutil.copy(os.path.join(PYDICOM_FILES, "JPEG-lossy.dcm"), images / "jpeg_lossy.dcm")  # 12-bit JPEG: no decoder
    _dicom(images / "frames_uncounted.dcm", np.stack([good, good // 2, good // 3]))  # 3 frames, no NumberOfFrames
    goods = [f"good{i}.dcm" for i in range(6)]
    for name in goods:
        _dicom(images / name, rng.integers(0, 4096, (40, 40)))
    _dicom(images / "good_frames.dcm", np.stack([good, good // 2]), frames=2)  # counted frames decode
    names = sorted(bad) + goods + ["good_frames.dcm"]
    _table(images.parent, names, tmp_path / "table.csv")
    out = tmp_path / "records"
    r = run_cli("ingest", "--images", images, "--labels", tmp_path / "table.csv", "--format", "multihot",
                "--out", out, "--image-size", 32, "--max-bad-fraction", 0.5, "--val-fraction", 0,
                "--test-fraction", 0, "--private-map", tmp_path / "map.csv", env=env())
    assert r.returncode == 0, r.stderr
    # Rows name studies by salted id, never by file name; the private map leads back to the files.
    text = (out / "quarantine.csv").read_text()
    assert not [name for name in bad if name in text]  # (their stems are reason codes, e.g. not_dicom)
    with open(tmp_path / "map.csv", newline="") as fh:
        path_of = {row["study"]: row["path"] for row in csv.DictReader(fh)}
    with open(out / "quarantine.csv", newline="") as fh:
        quarantined = {os.path.relpath(path_of[row["study"]], images): row for row in csv.DictReader(fh)}
    assert {f: row["reason"] for f, row in quarantined.items()} == bad
    assert all(row["message"] for row in quarantined.values())
    assert "NumberOfFrames" in quarantined["frames_uncounted.dcm"]["message"]
    from medtl.data.deid import salted_hash

    salt = os.environ["MEDTL_ID_SALT"].encode()
    keys = set(_shard_keys(out))
    assert keys == {salted_hash(salt, n) for n in goods + ["good_frames.dcm"]}  # none of the bad ones
    report("6. Bad-DICOM corpus", "ingest of not-DICOM, no pixel data, truncated pixel data, unsupported "
           "compression (12-bit JPEG), multi-frame without a frame count, among 7 good files",
           "each bad file quarantined with its reason (the uncounted multi-frame used to be decoded as its first "
           "frame); only the 7 good ones reached the shards", files_fuzzed=len(bad))


class _Hang(Exception):
    pass


def _mutations(rng: random.Random, data: bytes, n: int):
    """Byte flips, truncations, splices, duplicated and deleted spans, header-length corruptions."""
    for _ in range(n):
        b = bytearray(data)
        kind = rng.randrange(6)
        if kind == 0:
            for _ in range(rng.randint(1, 20)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        elif kind == 1:
            b = b[: rng.randrange(len(b))]
        elif kind == 2:
            i, j = sorted(rng.randrange(len(b)) for _ in range(2))
            b[i:j] = bytes(rng.randrange(256) for _ in range(min(j - i, 64)))
        elif kind == 3:
            i, j = sorted(rng.randrange(len(b)) for _ in range(2))
            b = b[:j] + b[i:j] + b[j:]
        elif kind == 4:
            i, j = sorted(rng.randrange(len(b)) for _ in range(2))
            del b[i:j]
        else:  # a 4-byte element length or value replaced by an extreme one
            i = rng.randrange(132, max(133, len(b) - 4))
            b[i:i + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\xff\xff\x00\x00", b"\x00\x00\xff\x7f"])
        yield bytes(b)


def test_fuzzed_files_decode_or_quarantine_never_crash_or_hang(tmp_path):
    from medtl.data import decode

    rng = random.Random(9)
    seeds = [os.path.join(PYDICOM_FILES, f) for f in ("MR_small.dcm", "CT_small.dcm", "MR_small_RLE.dcm",
                                                     "JPEG2000.dcm", "MR_small_bigendian.dcm", "SC_rgb_jpeg_gdcm.dcm",
                                                     "ExplVR_BigEnd.dcm", "ExplVR_LitEndNoMeta.dcm")]
    files = []
    for i in range(60):  # random bytes, some behind a DICOM preamble, PNG or JPEG magic
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 4000)))
        prefix = rng.choice([b"", b"\0" * 128 + b"DICM", decode.PNG_MAGIC, decode.JPEG_MAGIC])
        path = tmp_path / f"random{i:03d}.dcm"
        path.write_bytes(prefix + body)
        files.append(path)
    for seed in seeds:
        for i, data in enumerate(_mutations(rng, open(seed, "rb").read(), 30)):
            path = tmp_path / f"{os.path.basename(seed)[:-4]}_m{i:02d}.dcm"
            path.write_bytes(data)
            files.append(path)

    def alarm(signum, frame):
        raise _Hang()

    previous = signal.signal(signal.SIGALRM, alarm)
    outcomes = {"decoded": 0, "quarantined": 0}
    reasons = set()
    try:
        for path in files:
            signal.alarm(20)  # the per-file guard: a hang fails the test naming the file
            try:
                png, reason, message = decode.to_stored_png(str(path), 32, 16, "pad")
            except _Hang:
                pytest.fail(f"decoding {path.name} hung for 20 s")
            finally:
                signal.alarm(0)
            if png is None:
                assert reason and message, path.name
                outcomes["quarantined"] += 1
                reasons.add(reason)
            else:
                assert png.startswith(decode.PNG_MAGIC), path.name
                outcomes["decoded"] += 1
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert outcomes["decoded"] > 10 and outcomes["quarantined"] > 60, outcomes
    assert "decode_failed" not in reasons, "an unexpected exception escaped the decoder's classification"
    # The same files through the real CLI: every file is a record or a quarantine row, never a crash.
    subset = files[::4]
    images = tmp_path / "cli"
    images.mkdir()
    for path in subset:
        shutil.copy(path, images / path.name)
    _table(tmp_path, [p.name for p in subset], tmp_path / "table.csv")
    r = run_cli("ingest", "--images", images, "--labels", tmp_path / "table.csv", "--format", "multihot",
                "--out", tmp_path / "records", "--image-size", 32, "--max-bad-fraction", 1.0, "--val-fraction", 0,
                "--test-fraction", 0, env=env(), timeout=600)
    assert "Traceback" not in r.stderr
    with open(tmp_path / "records" / "quarantine.csv", newline="") as fh:
        quarantined = {row["study"] for row in csv.DictReader(fh)}
    kept = len(_shard_keys(tmp_path / "records")) if r.returncode == 0 else 0
    assert r.returncode == 0, r.stderr[-2000:]
    assert kept + len(quarantined) == len(subset)
    report("12. Ingest input fuzzing", f"{len(files)} files: random bytes (bare, behind DICOM/PNG/JPEG magic) and "
           f"mutations of {len(seeds)} real pydicom files, each decoded under a 20 s guard; {len(subset)} of them "
           "through `medtl ingest`", f"{outcomes['decoded']} decoded, {outcomes['quarantined']} quarantined with a "
           f"reason ({', '.join(sorted(reasons))}); no crash, no hang", files_fuzzed=len(files))
