"""Helpers of the reliability suite: running the CLI and horovodrun, byte searches, the summary rows."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import zipfile

from conftest import (JOBS, LAUNCHERS, RELIABILITY_ROW, REPO, cli_env, launcher_argv,  # noqa: F401  (re-exported
                      rank_lines, run_cli)                                             # to the suite)

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(HERE, "tiny.yaml")
HOROVODRUN = launcher_argv("horovodrun")
_RUNNING: list = []  # the test item running now (set by an autouse fixture in conftest.py)


def report(check: str, done: str, held: str, **figures) -> None:
    """Record one row of the summary table (call it after the assertions, so only what held is listed)."""
    _RUNNING[-1].user_properties.append((RELIABILITY_ROW, {"check": check, "done": done, "held": held,
                                                           "figures": figures}))


def env(**extra) -> dict:
    """The CLI environment, with this worktree's code first on the path of every rank."""
    return cli_env(PYTHONPATH=REPO, **extra)


def train(records, run, *sets, launcher=None, extra_env=None, config=TINY, timeout=600):
    args = ["train", "--config", config, "--workdir", run, "--set", f"data.records={records}"]
    for s in sets:
        args += ["--set", s]
    return run_cli(*args, launcher=launcher, env=env(**(extra_env or {})), timeout=timeout)


def history(run) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run, "history.jsonl"))]


def tree_digest(folder) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder` (to prove an input tree unchanged)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def _expand(name: str, data: bytes, depth: int = 0):
    """(name, bytes) of a blob and of every member of a zip/tar/gzip container inside it."""
    yield name, data
    if depth > 3:
        return
    if data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                for member in z.namelist():
                    yield from _expand(f"{name}!{member}", z.read(member), depth + 1)
        except zipfile.BadZipFile:
            pass
    elif data[:2] == b"\x1f\x8b" or name.endswith((".tar", ".tgz", ".tar.gz")):
        try:
            with tarfile.open(fileobj=io.BytesIO(data)) as t:
                for member in t.getmembers():
                    if member.isfile():
                        yield from _expand(f"{name}!{member.name}", t.extractfile(member).read(), depth + 1)
        except tarfile.TarError:
            import gzip

            try:
                yield from _expand(f"{name}!gunzip", gzip.decompress(data), depth + 1)
            except OSError:
                pass


def blobs_under(*folders) -> dict[str, bytes]:
    """Every file under the folders, and the members of containers in them, as bytes."""
    out = {}
    for folder in folders:
        for root, _, files in os.walk(folder):
            for name in files:
                path = os.path.join(root, name)
                out.update(_expand(path, open(path, "rb").read()))
    return out


def find_leaks(needles, blobs: dict[str, bytes]) -> dict[str, list[str]]:
    """{needle: [where]} for every needle found (as UTF-8 and as UTF-16-LE) in any blob."""
    leaks = {}
    for needle in needles:
        forms = {needle.encode(), needle.encode("utf-16-le")}
        where = [name for name, blob in blobs.items() if any(f in blob for f in forms)]
        if where:
            leaks[needle] = where
    return leaks


def summary_markdown(rows: list[dict]) -> str:
    totals: dict[str, float] = {}
    for row in rows:
        for key, value in row["figures"].items():
            totals[key] = totals.get(key, 0) + value
    lines = ["| check | what was done | what held |", "| --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['check']} | {row['done']} | {row['held']} |")
    lines.append("")
    lines.append("Figures: " + ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in sorted(totals.items())))
    return "\n".join(lines)
