"""Parallel and partitioned ingest: local workers, k workers + finalize (a killed ingest: reliability/)."""
import json
import os

from conftest import assert_user_error, cli_env, ingest_args, run_cli, tree_bytes


def test_local_workers_give_identical_bytes(studies, tmp_path):
    r1 = run_cli("ingest", *ingest_args(studies, tmp_path / "one", "--workers", 1))
    r2 = run_cli("ingest", *ingest_args(studies, tmp_path / "two", "--workers", 2))
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    assert tree_bytes(tmp_path / "one") == tree_bytes(tmp_path / "two")


def test_partitioned_ingest_matches_single_run(studies, tmp_path):
    single = tmp_path / "single"
    assert run_cli("ingest", *ingest_args(studies, single)).returncode == 0
    parts = tmp_path / "parts"
    for w in (0, 2):
        r = run_cli("ingest", *ingest_args(studies, parts, "--worker-index", w, "--num-workers", 3))
        assert r.returncode == 0, r.stderr
        assert "(worker" in r.stderr
    # Finalize refuses while it cannot see every part, naming the missing one.
    assert not (parts / "manifest.json").exists()
    r = run_cli("ingest-finalize", *ingest_args(studies, parts, "--num-workers", 3))
    assert_user_error(r, "ingest parts 1 of 3 are missing", "--worker-index N --num-workers 3")
    r = run_cli("ingest-finalize", *ingest_args(studies, parts, "--num-workers", 4))
    assert_user_error(r, "parts of a 3-worker ingest are there")
    r = run_cli("ingest", *ingest_args(studies, parts, "--worker-index", 1, "--num-workers", 3))
    assert r.returncode == 0, r.stderr
    r = run_cli("ingest-finalize", *ingest_args(studies, parts, "--num-workers", 3))
    assert r.returncode == 0, r.stderr
    a = json.load(open(single / "manifest.json"))
    b = json.load(open(parts / "manifest.json"))
    for split in ("train", "val", "test"):
        for key in ("records", "patients", "positives", "prevalence"):
            assert a["splits"][split][key] == b["splits"][split][key], (split, key)
    assert not (parts / ".parts").exists()
    assert run_cli("verify", parts).returncode == 0
    assert (parts / "quarantine.csv").read_text() == (single / "quarantine.csv").read_text()


def test_rerun_with_fewer_shards_removes_stale_ones(studies, tmp_path):
    out = tmp_path / "r"
    assert run_cli("ingest", *ingest_args(studies, out)).returncode == 0
    many = len([f for f in os.listdir(out) if f.endswith(".tfrecord")])
    r = run_cli("ingest", "--images", os.path.join(studies, "images"), "--labels", os.path.join(studies, "labels.csv"),
                "--out", out, "--image-size", 48, "--shard-mb", 10)
    assert r.returncode == 0, r.stderr
    assert len([f for f in os.listdir(out) if f.endswith(".tfrecord")]) == 3 < many
    assert run_cli("verify", out).returncode == 0
