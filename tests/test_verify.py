"""Damaged shards: `medtl verify` and `medtl train` each stop and name the shard and the damage."""
import json
import os
import shutil

import pytest

from conftest import JOBS, assert_user_error, run_cli


@pytest.fixture()
def damaged(records, tmp_path):
    """A private copy of the session records, to damage."""
    dst = tmp_path / "records"
    shutil.copytree(records, dst)
    manifest = json.load(open(dst / "manifest.json"))
    return dst, manifest


def _train(records, tmp_path):
    return run_cli("train", "--config", os.path.join(JOBS, "smoke.yaml"), "--workdir", tmp_path / "run",
                   "--set", f"data.records={records}", "--set", "train.batch_size=8")


def test_clean_records_verify(records):
    r = run_cli("verify", records)
    assert r.returncode == 0, r.stderr
    assert "all read, parsed and checksummed" in r.stderr


def test_truncated_shard(damaged, tmp_path):
    folder, manifest = damaged
    shard = manifest["splits"]["train"]["shards"][1]["file"]
    data = (folder / shard).read_bytes()
    (folder / shard).write_bytes(data[: len(data) // 2])
    assert_user_error(run_cli("verify", folder), shard, "truncated", f"{len(data) // 2} of {len(data)} bytes")
    assert_user_error(run_cli("verify", "--quick", folder), shard, "truncated")
    assert_user_error(_train(folder, tmp_path), shard, "truncated", "medtl verify")


def test_flipped_byte(damaged, tmp_path):
    folder, manifest = damaged
    for split in ("train", "val"):  # damage every train/val shard so training meets one in epoch 1
        for entry in manifest["splits"][split]["shards"]:
            path = folder / entry["file"]
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0x01
            path.write_bytes(bytes(data))
    first = manifest["splits"]["train"]["shards"][0]["file"]
    assert_user_error(run_cli("verify", folder), first, "corrupted")
    line = assert_user_error(_train(folder, tmp_path), "corrupted", "nothing was skipped")
    assert "-of-" in line and ".tfrecord" in line


def test_deleted_shard(damaged, tmp_path):
    folder, manifest = damaged
    shard = manifest["splits"]["val"]["shards"][0]["file"]
    os.remove(folder / shard)
    assert_user_error(run_cli("verify", folder), shard, "missing")
    assert_user_error(_train(folder, tmp_path), shard, "missing")


def test_wrong_record_count(damaged):
    folder, manifest = damaged
    manifest["splits"]["test"]["shards"][0]["records"] += 1
    (folder / "manifest.json").write_text(json.dumps(manifest))
    shard = manifest["splits"]["test"]["shards"][0]["file"]
    assert_user_error(run_cli("verify", folder), shard, "count_mismatch", "manifest says")


def test_unfinished_ingest_is_not_records(tmp_path):
    (tmp_path / ".parts").mkdir()
    assert_user_error(run_cli("verify", tmp_path), "no manifest.json", "ingest-finalize")
