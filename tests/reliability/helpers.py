"""Helpers of the reliability suite: running the CLI and horovodrun, byte searches, the summary rows."""
from __future__ import annotations

import csv
import datetime
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


PLANTED_KINDS = ("tag", "date", "uid", "folder name", "file name")


def damage_two_studies(images, files, cut: int) -> tuple[str, str]:
    """Cut `cut` bytes off the first study and mark the second BurnedInAnnotation=YES: both must be
    quarantined, by salted id. Returns (truncated, burned) relative names."""
    import pydicom

    truncated, burned = files[0], files[1]
    data = (images / truncated).read_bytes()
    (images / truncated).write_bytes(data[: len(data) - cut])
    ds = pydicom.dcmread(images / burned)
    ds.BurnedInAnnotation = "YES"
    ds.save_as(images / burned)
    return truncated, burned


def pacs_layout(studies, out) -> dict[str, set[str]]:
    """Synthetic DICOM studies (synth --dicom) re-filed the way a PACS export lays them out,
    OUT/images/MRN/ACCESSION.dcm, with OUT/labels.csv pointing there, and more identifiers planted:
    a study date, series date and acquisition date-time distinct per file, a referring physician and
    a study ID. Returns {kind: planted strings} for the kinds in PLANTED_KINDS."""
    import pydicom

    planted = {kind: set() for kind in PLANTED_KINDS}
    with open(os.path.join(studies, "labels.csv"), newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    for i, row in enumerate(rows[1:]):
        ds = pydicom.dcmread(os.path.join(studies, "images", row[0]))
        day = datetime.date(2019, 1, 1) + datetime.timedelta(days=37 * i)
        ds.StudyDate = day.strftime("%Y%m%d")
        ds.SeriesDate = (day + datetime.timedelta(days=1)).strftime("%Y%m%d")
        ds.AcquisitionDateTime = (day + datetime.timedelta(days=2)).strftime("%Y%m%d") + "101530"
        ds.ReferringPhysicianName = f"PLANTEDDOC^R{i:03d}"
        ds.StudyID = f"SID{i:05d}X"
        folder, name = str(ds.PatientID), f"{ds.AccessionNumber}.dcm"
        os.makedirs(os.path.join(out, "images", folder), exist_ok=True)
        ds.save_as(os.path.join(out, "images", folder, name))
        row[0] = f"{folder}/{name}"
        planted["tag"] |= {str(ds.PatientName), ds.PatientName.family_name, ds.PatientID, ds.AccessionNumber,
                           ds.InstitutionName, ds[0x0011, 0x1001].value, str(ds.ReferringPhysicianName), ds.StudyID}
        planted["date"] |= {ds.PatientBirthDate, ds.StudyDate, ds.SeriesDate, ds.AcquisitionDateTime}
        planted["uid"] |= {ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID}
        planted["folder name"].add(folder)
        planted["file name"] |= {name, row[0]}
    with open(os.path.join(out, "labels.csv"), "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh, lineterminator="\n").writerows(rows)
    return {kind: {v for v in values if v} for kind, values in planted.items()}


def _members(name: str, data: bytes):
    """(name, bytes) of each direct member of a zip, tar or gzip container (none for other blobs)."""
    if data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                for member in z.namelist():
                    yield f"{name}!{member}", z.read(member)
        except zipfile.BadZipFile:
            pass
    elif data[:2] == b"\x1f\x8b" or name.endswith((".tar", ".tgz", ".tar.gz")):
        try:
            with tarfile.open(fileobj=io.BytesIO(data)) as t:
                for member in t.getmembers():
                    if member.isfile():
                        yield f"{name}!{member.name}", t.extractfile(member).read()
        except tarfile.TarError:
            import gzip

            try:
                yield f"{name}!gunzip", gzip.decompress(data)
            except OSError:
                pass


def _expand(name: str, data: bytes, depth: int = 0):
    """(name, bytes) of a blob and of every member of a zip/tar/gzip container inside it."""
    yield name, data
    if depth <= 3:
        for member, content in _members(name, data):
            yield from _expand(member, content, depth + 1)


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


class Corpus:
    """Every byte medtl wrote or printed, searched once for planted strings.

    Counting, so that `bytes_counted` is each byte searched exactly once:
    - a file counts once, by its real path, however many roots (or hard links) lead to it;
    - a container member (zip, e.g. predictions.npz; tar; gzip) is searched as well as the raw
      container (a string can hide in either form), but its bytes count only when they are not
      stored verbatim in the container: a stored member is a slice of bytes already counted,
      a compressed one is new bytes;
    - each log stream (one command's stdout + stderr, all ranks under horovodrun) counts as its own
      bytes. A line that is both on stderr and in a run folder's medtl.log is in two artefacts that
      can differ, so it is searched, and counted, in both;
    - the relative paths of the artefact files themselves are one more blob (a name can leak as a
      file name).
    """

    def __init__(self):
        self.blobs: dict[str, bytes] = {}
        self.bytes_counted = 0
        self.files = 0
        self._real: set[str] = set()

    def add_tree(self, folder, skip=()) -> None:
        skip = {os.path.realpath(s) for s in skip}
        names = []
        for root, dirs, files in os.walk(folder):
            names += [os.path.relpath(os.path.join(root, n), folder) for n in dirs + files]
            for name in files:
                real = os.path.realpath(os.path.join(root, name))
                if real in skip or real in self._real:
                    continue
                self._real.add(real)
                self.files += 1
                with open(real, "rb") as fh:
                    self.add(os.path.join(root, name), fh.read())
        self.add(f"{folder} (file and folder names)", "\n".join(sorted(names)).encode())

    def add(self, name: str, data: bytes, container: bytes | None = None, depth: int = 0) -> None:
        self.blobs[name] = data
        if container is None or data not in container:
            self.bytes_counted += len(data)
        if depth <= 3:
            for member, content in _members(name, data):
                self.add(member, content, data, depth + 1)

    def find(self, needles) -> dict[str, list[str]]:
        """{needle: [blob names]} for every needle found, as UTF-8/ASCII or UTF-16-LE. A needle of digits
        only (a date) must stand alone (no digit either side): `0.7320190101` is a probability, not a date."""
        return search_blobs(needles, self.blobs)


def search_blobs(needles, blobs: dict[str, bytes]) -> dict[str, list[str]]:
    """{needle: [blob names]} for every needle found in any blob, as UTF-8 or as UTF-16-LE.

    One vectorised pass per blob for all needles: numpy finds the positions whose two bytes begin
    some needle; only there is the next `width` bytes (the shortest needle's length) looked up, and a
    needle with that beginning compared in full. A needle of digits
    only (a date) must stand alone, with no digit either side: `0.7320190101` is a probability,
    not the date 20190101."""
    import numpy as np

    forms = [(needle, needle.encode(enc), enc) for needle in sorted(set(needles)) for enc in ("utf-8", "utf-16-le")]
    width = min(len(f) for _, f, _ in forms)
    assert width >= 5, "needles must be at least 5 characters long"
    by_prefix: dict[bytes, list] = {}
    for form in forms:
        by_prefix.setdefault(form[1][:width], []).append(form)
    starts = np.zeros(1 << 16, bool)
    starts[[int.from_bytes(k[:2], "little") for k in by_prefix]] = True
    found: dict[str, list[str]] = {}
    for name, blob in blobs.items():
        arr = np.frombuffer(blob, np.uint8)
        pairs = arr[:-1].astype(np.uint16) | (arr[1:].astype(np.uint16) << 8) if len(arr) > 1 else arr[:0]
        hits = set()
        for pos in np.nonzero(starts[pairs])[0].tolist():
            for needle, form, enc in by_prefix.get(blob[pos:pos + width], ()):
                if needle not in hits and blob.startswith(form, pos) and not _digit_bounded(needle, blob, pos,
                                                                                           len(form), enc):
                    hits.add(needle)
        for needle in hits:
            found.setdefault(needle, []).append(name)
    return found


def _digit_bounded(needle: str, blob: bytes, pos: int, length: int, enc: str) -> bool:
    """A digits-only needle with a digit right before or after it (part of a longer number)."""
    if not needle.isdigit():
        return False
    unit = 2 if enc == "utf-16-le" else 1
    around = (blob[max(pos - unit, 0):pos], blob[pos + length:pos + length + unit])
    return any(len(c) == unit and c.decode(enc, "replace").isdigit() for c in around)


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
