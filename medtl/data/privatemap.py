"""The private map: salted study id -> the input path it stands for, for the person who must find a bad file.

Quarantine rows and log lines name a study only by its salted id (the records' key hash). This
module alone writes the one file that undoes that, and only where the user names it
(`medtl ingest --private-map PATH`): a local file, never inside the records or the input folder.
"""
from __future__ import annotations

import csv
import io
import os

from medtl.errors import MedtlError
from medtl.utils import fs

COLUMNS = ("study", "path")


def _inside(path: str, folder: str) -> bool:
    folder = os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_location(path: str, records: str, images: str) -> None:
    """Refuse a map that would sit in the records (shared) or in the input (read-only), before any work."""
    if fs.is_remote(path) or "://" in path:
        raise MedtlError(f"--private-map {path} must be a local file: it maps study ids back to input paths, "
                         "so keep it off shared storage")
    where = os.path.realpath(path)
    if os.path.isdir(where):
        raise MedtlError(f"--private-map {path} is a folder; name a file, e.g. {os.path.join(path, 'private-map.csv')}")
    if not fs.is_remote(records) and _inside(where, records):
        raise MedtlError(f"--private-map {path} is inside the records folder {records}, which is shared; "
                         "write the map to a private place outside it")
    if os.path.isdir(images) and _inside(where, images):
        raise MedtlError(f"--private-map {path} is inside the input folder {images}, which is read-only to medtl; "
                         "write the map to a private place outside it")


def write_private_map(path: str, rows: dict[str, str]) -> None:
    """{study id: input path} as CSV (study,path), readable by its owner only."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(sorted(rows.items()))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(buf.getvalue())
    os.replace(tmp, path)


def read_private_map(path: str) -> dict[str, str]:
    """{study id: input path} from a map written by write_private_map."""
    with open(path, newline="", encoding="utf-8") as fh:
        return {row["study"]: row["path"] for row in csv.DictReader(fh)}
