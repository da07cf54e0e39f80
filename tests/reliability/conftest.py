"""The reliability suite's fixtures.

Each test records (check, what was done, what held, figures) with helpers.report(...); tests/conftest.py
prints the summary table at the end of the pytest run (in one process or under pytest-xdist) and writes
it to $MEDTL_RELIABILITY_REPORT (default: reliability-summary.md under the pytest basetemp), which
`make reliability` turns into docs/reliability.md.
"""
from __future__ import annotations

import datetime
import json
import os

import pytest

from reliability.helpers import _RUNNING, env, run_cli


@pytest.fixture(autouse=True)
def _summary_rows(request):
    """Lets helpers.report() put its row in this test's report (see tests/conftest.py)."""
    _RUNNING.append(request.node)
    yield
    _RUNNING.pop()


@pytest.fixture(scope="session")
def dicom_studies(tmp_path_factory) -> str:
    """40 synthetic DICOM studies carrying planted identifiers (synth --dicom), at 64 px."""
    out = tmp_path_factory.mktemp("dicom-studies")
    r = run_cli("synth", "--out", out, "--n", 40, "--seed", 9, "--size", 64, "--dicom", env=env())
    assert r.returncode == 0, r.stderr
    return str(out)
