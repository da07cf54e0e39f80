"""Records on object storage: ingest, verify and train against a local S3 server (moto) started here."""
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import JOBS, cli_env, run_cli

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
                  S3_ENDPOINT=endpoint, S3_USE_HTTPS="0", S3_VERIFY_SSL="0")
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
    r = run_cli("train", "--config", os.path.join(JOBS, "smoke.yaml"), "--workdir", run,
                "--set", f"data.records={out}", "--set", "data.image_size=48", "--set", "train.batch_size=8",
                env=s3_env)
    logs.append(r)
    assert r.returncode == 0, r.stderr
    assert (run / "checkpoints" / "best.weights.h5").is_file()
    # Credentials come from the environment and are never echoed.
    for result in logs:
        assert SECRET not in result.stdout + result.stderr
    for root, _, files in os.walk(run):
        for name in files:
            assert SECRET.encode() not in open(os.path.join(root, name), "rb").read()


def test_missing_bucket_is_a_clear_error(s3_env):
    r = run_cli("verify", "s3://no-such-bucket/records", env=s3_env)
    assert r.returncode == 2 and "no manifest.json in s3://no-such-bucket/records" in r.stderr
