"""Shared fixtures: a fixed ID salt, the CLI runner, and small synthetic records built once."""
from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
import time

import pytest

# Tests never touch the user's salt file; the value is arbitrary but fixed.
os.environ.setdefault("MEDTL_ID_SALT", "medtl-tests-salt-0123456789")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = os.path.join(REPO, "jobs")


def cli_env(**extra) -> dict:
    env = dict(os.environ)
    env.update({k: str(v) for k, v in extra.items()})
    return env


CLI_TIMES_ENV = "MEDTL_TEST_CLI_TIMES"  # FILE: one JSON line per `medtl` process run_cli starts (docs/testing.md)


def run_cli(*args, env: dict | None = None, timeout: float = 900, cwd: str | None = None,
            launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run `medtl ARGS` the way a user does (a fresh process), capturing output."""
    cmd = (launcher or []) + [sys.executable, "-m", "medtl", *map(str, args)]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env or cli_env(), timeout=timeout,
                       cwd=cwd or REPO)
    if os.environ.get(CLI_TIMES_ENV):
        with open(os.environ[CLI_TIMES_ENV], "a") as fh:
            fh.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", ""), "args": [str(a) for a in args][:2],
                                 "launcher": bool(launcher), "s": round(time.monotonic() - t0, 2),
                                 "rc": r.returncode}) + "\n")
    return r


# The two launchers the 2-rank tests run under. horovodrun --gloo is the local way; mpirun is what the
# training MPIJob's launcher runs in production, so its options come from the manifest itself.
TRAIN_MANIFEST = os.path.join(REPO, "k8s", "base", "train.yaml")
LAUNCHERS = ("horovodrun", "mpirun")


def manifest_mpirun() -> tuple[list[str], list[str]]:
    """(command, args) of the launcher container of k8s/base/train.yaml: mpirun and its fixed options,
    then `-np N medtl train ...`."""
    import yaml

    with open(TRAIN_MANIFEST) as fh:
        job = yaml.safe_load(fh)
    container = job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]
    return [str(a) for a in container["command"]], [str(a) for a in container["args"]]


def launcher_argv(name: str, ranks: int = 2) -> list[str]:
    """The argv that starts `ranks` local ranks of the command appended to it.

    mpirun: the manifest's command with its options unchanged, adapted to one machine: the ranks go to
    localhost (-H; the operator's hostfile does this in a cluster), root may run them here
    (--allow-run-as-root: OpenMPI refuses root, the image's user is not root), and each output line
    names its rank (--tag-output, for the tests' assertions). `-np` comes first as in the manifest's args.
    """
    if name == "horovodrun":
        return [os.path.join(os.path.dirname(sys.executable), "horovodrun"), "-np", str(ranks),
                "-H", f"localhost:{ranks}", "--gloo"]
    command, args = manifest_mpirun()
    if command[:2] == ["tini", "--"]:
        command = command[2:]  # the image's init (PID 1 in the pod); here the test process is the parent
    assert command[0] == "mpirun" and args[0] == "-np", (command, args)
    local = ["-H", f"localhost:{ranks}", "--tag-output"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    return command + local + ["-np", str(ranks)]


def rank_lines(output: str, prefix: str = "") -> dict[int, list[str]]:
    """{rank: its lines that start with `prefix`}, from horovodrun's `[R]<stderr>:` or mpirun
    --tag-output's `[JOB,R]<stderr>:` line prefixes."""
    found: dict[int, list[str]] = {}
    pattern = rf"^\[(?:\d+,)?(\d+)\]<std(?:out|err)>:({re.escape(prefix)}.*)$"
    for match in re.finditer(pattern, output, re.M):
        found.setdefault(int(match.group(1)), []).append(match.group(2))
    return found


def ingest_args(studies, out, *extra) -> tuple:
    """`medtl ingest` arguments for synthetic studies (tiny shards, so several per split)."""
    return ("--images", os.path.join(studies, "images"), "--labels", os.path.join(studies, "labels.csv"),
            "--out", out, "--image-size", 48, "--shard-mb", 0.05, *extra)


def record_images(folder, split: str, feature: str) -> dict[str, bytes]:
    """{record key: stored image bytes under `feature`} of a split's shards, read with the protobuf alone."""
    from medtl.tf import tf

    out = {}
    for name in sorted(f for f in os.listdir(folder) if f.startswith(split + "-")):
        for record in tf.data.TFRecordDataset(os.path.join(folder, name)):
            feat = tf.train.Example.FromString(record.numpy()).features.feature
            out[feat["key"].bytes_list.value[0].decode()] = feat[feature].bytes_list.value[0]
    return out


def tree_bytes(folder) -> dict:
    """{file name: bytes} of a records folder, to compare two ingests byte for byte."""
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str, exit_code: int | None = None) -> str:
    """A user error: non-zero exit (`exit_code` when given: 2 usage/config, 1 runtime; medtl.errors), one
    `medtl: error:` line naming the thing, no traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    if exit_code is not None:
        assert result.returncode == exit_code, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("medtl: error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def chromium_flags(profile) -> list[str]:
    """Debian's headless Chromium, offline and without a sandbox (tests run as root in containers)."""
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian chromium is missing: run `make system-deps`"
    return [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
            f"--user-data-dir={profile}"]


def chromium_probe(page_path, tmp_path) -> dict:
    """Load an HTML page in headless Chromium; {'images': <img> count, 'decoded': images decoded wider than
    100 px, 'errors': script or resource errors, 'sections': {section id: rendered height in px}, 'dom': the
    DOM after load}."""
    import html

    page = open(page_path, encoding="utf-8").read()
    probe_head = ("<script>window.__errors=[];window.addEventListener('error',"
                  "e=>window.__errors.push(String(e.message||(e.target&&e.target.tagName))),true);</script>")
    probe_tail = ("<script>window.addEventListener('load',()=>{const i=[...document.images];"
                  "const s={};document.querySelectorAll('section').forEach(x=>s[x.id]=x.offsetHeight);"
                  "document.body.setAttribute('data-probe',JSON.stringify({images:i.length,"
                  "decoded:i.filter(x=>x.complete&&x.naturalWidth>100).length,errors:window.__errors,"
                  "sections:s}));});</script>")
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("<head>", "<head>" + probe_head, 1).replace("</body>", probe_tail + "</body>"))
    dom = subprocess.run(chromium_flags(tmp_path / "profile") + ["--virtual-time-budget=10000", "--dump-dom",
                                                                 probed.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    probe = json.loads(html.unescape(re.search(r'data-probe="([^"]*)"', dom.stdout).group(1)))
    return {**probe, "dom": dom.stdout}


@pytest.fixture(scope="session")
def studies(tmp_path_factory) -> str:
    """240 synthetic PNG studies (ChestX-ray14 layout) at 96 px."""
    from medtl.data.synth import synthesize

    out = str(tmp_path_factory.mktemp("studies"))
    synthesize(out, 240, seed=7, size=96)
    return out


# The fields the shared records keep (for subgroup reports); their values come from labels.csv.
KEPT_FIELDS = ("sex", "age_band", "view_position")


@pytest.fixture(scope="session")
def records(studies, tmp_path_factory) -> str:
    """Those studies ingested at 64 px, in several shards per split, keeping KEPT_FIELDS."""
    from medtl.data.ingest import IngestOptions, ingest

    out = str(tmp_path_factory.mktemp("records"))
    ingest(IngestOptions(images=os.path.join(studies, "images"), labels=os.path.join(studies, "labels.csv"),
                         out=out, image_size=64, bit_depth=16, shard_mb=0.1, progress=False,
                         keep_fields=KEPT_FIELDS))
    return out


def age_band_by_hand(age: int) -> str:
    """The age bands of medtl.data.fields, written out again for tests."""
    return "0-17" if age < 18 else "18-39" if age < 40 else "40-59" if age < 60 else "60-79" if age < 80 else "80+"


# The reliability suite's summary table. Each check records its row in its test report's
# user_properties (tests/reliability/helpers.report); reports reach this process from
# pytest-xdist workers too, so the table is built here, where the run ends.
RELIABILITY_ROW = "medtl_reliability_row"
RELIABILITY_REPORT_ENV = "MEDTL_RELIABILITY_REPORT"
_reliability_rows: list[dict] = []
_reliability_outcomes: dict[str, str] = {}  # node id -> passed / failed / skipped
_session_started = [time.monotonic()]


# Seconds each long test file takes on 2 CPU cores (per-file sums of every duration in the suite run of
# 2026-12-06 01:53, less the time cut from test_pretrain and test_api since; the machine varies by 40-90%, the
# order much less).
# `make test` runs files on 2 xdist workers, whole files each (--dist loadfile), in collection order,
# so files are collected longest first: a long file started last would keep one worker busy while
# the other idles (longest-processing-time-first scheduling). Files not listed keep their order after.
FILE_SECONDS = {
    "test_evaluate_cli.py": 417, "reliability/test_ranks.py": 332, "test_pretrain.py": 248,
    "reliability/test_leaks.py": 189, "test_clinical_cli.py": 156, "test_search.py": 151,
    "test_pretrain_simclr.py": 127, "test_bench_pretrain.py": 127, "test_raw_records.py": 112, "test_api.py": 95,
    "test_exit_codes.py": 91, "test_bench_train.py": 87, "reliability/test_checkpoints.py": 87,
    "test_train_dist.py": 79, "reliability/test_ingest_faults.py": 76, "test_model.py": 61, "test_saliency.py": 58,
    "test_heads.py": 56, "test_e2e.py": 56, "test_overfit_cli.py": 55, "test_search_heads.py": 52,
    "test_pipeline.py": 48, "test_bench.py": 47, "reliability/test_shards.py": 43, "test_partitioned.py": 42,
    "test_formats.py": 42, "test_until_phase.py": 41, "reliability/test_secrets.py": 34,
}


def pytest_collection_modifyitems(session, config, items):
    here = os.path.dirname(os.path.abspath(__file__))

    def seconds(item) -> int:
        return FILE_SECONDS.get(os.path.relpath(str(item.path), here).replace(os.sep, "/"), 0)

    items.sort(key=lambda item: -seconds(item))  # stable: a file's tests keep their order


def pytest_sessionstart(session):
    _session_started[0] = time.monotonic()


def _check_order(row: dict):
    number, rest = re.match(r"(\d*)(.*)", row["check"]).groups()
    return int(number or 10**6), rest


def pytest_runtest_logreport(report):
    if report.when == "call" and report.passed:
        _reliability_rows.extend(value for key, value in report.user_properties if key == RELIABILITY_ROW)
    if "reliability/" in report.nodeid and (report.when == "call" or not report.passed):
        if _reliability_outcomes.get(report.nodeid) != "failed":
            _reliability_outcomes[report.nodeid] = report.outcome


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not (_reliability_rows or _reliability_outcomes) or hasattr(config, "workerinput"):
        return
    from reliability.helpers import summary_markdown

    rows = sorted(_reliability_rows, key=_check_order)
    outcomes = list(_reliability_outcomes.values())
    seconds = time.monotonic() - _session_started[0]
    workers = getattr(config.option, "numprocesses", None) or 1
    from medtl.env import cpu_description

    table = f"Machine: {cpu_description()}.\n\n" + summary_markdown(rows) + (
        f"\n\nTests: {outcomes.count('passed')} of {len(outcomes)} reliability tests passed"
        + "".join(f"; FAILED: {node}" for node, outcome in sorted(_reliability_outcomes.items())
                  if outcome == "failed")
        + f". This pytest session took {seconds // 60:.0f} min {seconds % 60:.0f} s on {os.cpu_count()} CPU cores "
        f"with {workers} worker(s) (`make reliability` runs the suite alone).")
    terminalreporter.write_sep("=", "medtl reliability summary")
    terminalreporter.write_line(table)
    path = os.environ.get(RELIABILITY_REPORT_ENV) or os.path.join(str(config._tmp_path_factory.getbasetemp()),
                                                                  "reliability-summary.md")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(table + "\n")
    with open(os.path.splitext(path)[0] + ".json", "w", encoding="utf-8") as fh:
        json.dump({"date": datetime.date.today().isoformat(), "rows": rows}, fh, indent=1)
    terminalreporter.write_line(f"(written to {path})")
