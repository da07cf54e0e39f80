"""Damaged shards: `medtl verify` and `medtl train` each stop and name the shard and the damage (check 5)."""
import json
import os
import shutil

import pytest

from conftest import assert_user_error, run_cli
from medtl.errors import EXIT_RUNTIME, EXIT_USAGE
from reliability.helpers import report, train


@pytest.fixture()
def damaged(records, tmp_path):
    """A private copy of the session records, to damage."""
    dst = tmp_path / "records"
    shutil.copytree(records, dst)
    manifest = json.load(open(dst / "manifest.json"))
    return dst, manifest


def _train(records, tmp_path):
    return train(records, tmp_path / "run")


def test_clean_records_verify(records):
    r = run_cli("verify", records)
    assert r.returncode == 0, r.stderr
    assert "all read, parsed and checksummed" in r.stderr


def test_truncated_shard(damaged, tmp_path):
    folder, manifest = damaged
    shard = manifest["splits"]["train"]["shards"][1]["file"]
    data = (folder / shard).read_bytes()
    (folder / shard).write_bytes(data[: len(data) // 2])
    # Damaged data is a runtime failure (exit 1), wherever it is found.
    assert_user_error(run_cli("verify", folder), shard, "truncated", f"{len(data) // 2} of {len(data)} bytes",
                      exit_code=EXIT_RUNTIME)
    assert_user_error(run_cli("verify", "--quick", folder), shard, "truncated", exit_code=EXIT_RUNTIME)
    assert_user_error(_train(folder, tmp_path), shard, "truncated", "medtl verify", exit_code=EXIT_RUNTIME)
    report("5a. Truncated shard", "a train shard cut to half its bytes", "verify, verify --quick and train each "
           "stopped with one error line naming the shard and 'truncated'", shards_damaged=1)


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
    line = assert_user_error(_train(folder, tmp_path), "corrupted", "nothing was skipped",
                             exit_code=EXIT_RUNTIME)  # met mid-training
    assert "-of-" in line and ".tfrecord" in line
    damaged = sum(len(manifest["splits"][s]["shards"]) for s in ("train", "val"))
    report("5b. Flipped byte", "one bit flipped mid-file in every train and val shard",
           "verify named the first shard and 'corrupted'; train stopped naming a shard, 'corrupted', nothing skipped",
           shards_damaged=damaged)


def test_deleted_shard(damaged, tmp_path):
    folder, manifest = damaged
    shard = manifest["splits"]["val"]["shards"][0]["file"]
    os.remove(folder / shard)
    assert_user_error(run_cli("verify", folder), shard, "missing")
    assert_user_error(_train(folder, tmp_path), shard, "missing")
    report("5c. Deleted shard", "a val shard deleted", "verify and train each named the shard and 'missing'",
           shards_damaged=1)


def test_wrong_record_count(damaged, tmp_path):
    folder, manifest = damaged
    entry = manifest["splits"]["train"]["shards"][2]
    entry["records"] += 1  # the manifest (totals included) claims one record more than the shard holds
    manifest["splits"]["train"]["records"] += 1
    (folder / "manifest.json").write_text(json.dumps(manifest))
    shard = entry["file"]
    assert_user_error(run_cli("verify", folder), shard, "count_mismatch", "manifest says")
    assert_user_error(_train(folder, tmp_path), shard, "count_mismatch", f"manifest says {entry['records']}",
                      exit_code=EXIT_RUNTIME)
    report("5d. Wrong record count", "manifest.json claims one record more for a train shard",
           "verify and train each named the shard and 'count_mismatch' (train used to read it silently)",
           shards_damaged=1)


def test_unfinished_ingest_is_not_records(tmp_path):
    (tmp_path / ".parts").mkdir()
    assert_user_error(run_cli("verify", tmp_path), "no manifest.json", "ingest-finalize", exit_code=EXIT_USAGE)
