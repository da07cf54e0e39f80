"""Records on object storage (local moto S3 server): ingest, verify and train work, and the secret key
set in AWS_SECRET_ACCESS_KEY appears in no log and no output file (check 8)."""
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import cli_env, run_cli
from reliability.helpers import REPO, TINY, blobs_under, find_leaks, report

pytestmark = pytest.mark.slow
SECRET = "S3-SECRET-SENTINEL-7f3a9c"


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = cli_env(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY=SECRET, AWS_REGION="us-east-1",
                  S3_ENDPOINT=endpoint, S3_USE_HTTPS="0", S3_VERIFY_SSL="0", PYTHONPATH=REPO,
                  # Debug logs of medtl and TensorFlow's C++ (the S3 filesystem logs there).
                  MEDTL_LOG_LEVEL="debug", TF_CPP_MIN_LOG_LEVEL="0")
    env["endpoint"] = endpoint
    import boto3

    deadline = time.time() + 30
    while True:
        try:
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                         aws_secret_access_key=SECRET).create_bucket(Bucket="medtl")
            break
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(0.3)
    yield env
    server.terminate()
    server.wait()


def test_ingest_verify_and_train_on_s3(s3_env, studies, tmp_path):
    out = "s3://medtl/records"
    logs = []
    r = run_cli("ingest", "--images", os.path.join(studies, "images"), "--labels",
                os.path.join(studies, "labels.csv"), "--out", out, "--image-size", 48, "--shard-mb", 0.1,
                env=s3_env)
    logs.append(r)
    assert r.returncode == 0, r.stderr
    assert f"-> {out}" in r.stderr
    r = run_cli("verify", out, env=s3_env)
    logs.append(r)
    assert r.returncode == 0, r.stderr
    assert "all read, parsed and checksummed" in r.stderr
    run = tmp_path / "run"
    r = run_cli("train", "--config", TINY, "--workdir", run, "--set", f"data.records={out}",
                "--set", "data.image_size=48", "--set", "phases.0.epochs=1", "--set", "phases.1.epochs=1",
                env=s3_env)
    logs.append(r)
    assert r.returncode == 0, r.stderr
    assert (run / "checkpoints" / "best.weights.h5").is_file()
    # Credentials come from the environment and are never echoed: not in any log (debug level),
    # any file of the run folder, or any object medtl wrote to the bucket.
    import boto3

    blobs = {f"log {i}": (result.stdout + result.stderr).encode() for i, result in enumerate(logs)}
    blobs.update(blobs_under(run))
    s3 = boto3.client("s3", endpoint_url=s3_env["endpoint"], region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key=SECRET)
    for item in s3.list_objects_v2(Bucket="medtl").get("Contents", []):
        blobs[f"s3://medtl/{item['Key']}"] = s3.get_object(Bucket="medtl", Key=item["Key"])["Body"].read()
    assert any(key.startswith("s3://") for key in blobs) and any("debug" in r.stderr for r in logs)
    assert not find_leaks([SECRET], blobs)
    searched = sum(len(b) for b in blobs.values())
    report("8. Secrets", "sentinel in AWS_SECRET_ACCESS_KEY; ingest, verify and train on s3:// (moto) with "
           "MEDTL_LOG_LEVEL=debug and TF_CPP_MIN_LOG_LEVEL=0", f"the sentinel is in none of {len(blobs)} logs, "
           "run files and bucket objects", bytes_searched=searched, secrets_planted=1)


def test_missing_bucket_is_a_clear_error(s3_env):
    r = run_cli("verify", "s3://no-such-bucket/records", env=s3_env)
    assert r.returncode == 2 and "no manifest.json in s3://no-such-bucket/records" in r.stderr
