"""The reliability suite's fixtures and its summary table.

Each test records (check, what was done, what held, figures) with helpers.report(...); the table
is printed at the end of the pytest run and written to $MEDTL_RELIABILITY_REPORT (default:
reliability-summary.md under the pytest basetemp), which `make reliability` turns into
docs/reliability.md.
"""
from __future__ import annotations

import datetime
import json
import os

import pytest

from reliability.helpers import _ROWS, REPORT_ENV, env, run_cli, summary_markdown


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _ROWS:
        return
    table = summary_markdown(_ROWS)
    terminalreporter.write_sep("=", "medtl reliability summary")
    terminalreporter.write_line(table)
    path = os.environ.get(REPORT_ENV) or os.path.join(str(config._tmp_path_factory.getbasetemp()),
                                                       "reliability-summary.md")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(table + "\n")
    with open(os.path.splitext(path)[0] + ".json", "w", encoding="utf-8") as fh:
        json.dump({"date": datetime.date.today().isoformat(), "rows": _ROWS}, fh, indent=1)
    terminalreporter.write_line(f"(written to {path})")


@pytest.fixture(scope="session")
def dicom_studies(tmp_path_factory) -> str:
    """40 synthetic DICOM studies carrying planted identifiers (synth --dicom), at 64 px."""
    out = tmp_path_factory.mktemp("dicom-studies")
    r = run_cli("synth", "--out", out, "--n", 40, "--seed", 9, "--size", 64, "--dicom", env=env())
    assert r.returncode == 0, r.stderr
    return str(out)
