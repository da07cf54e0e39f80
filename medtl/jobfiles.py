"""Where the job configs of jobs/ are: the copy a wheel installs as medtl/jobs, or a source checkout's jobs/.

`jobs/` stays a top-level folder of the repository (kustomize builds the k8s ConfigMaps from it);
setup.py ships it inside the package, so `medtl demo` and `--config jobs/X.yaml` work after a wheel
install and in the container image too.
"""
from __future__ import annotations

import importlib.resources
import os

_PACKAGE_ROOT = os.path.dirname(os.path.abspath(__file__))


def jobs_dir() -> str:
    """The folder holding demo.yaml, smoke.yaml, ..., search/heads.yaml."""
    installed = importlib.resources.files("medtl") / "jobs"  # a wheel's copy (not zip-safe: a real folder)
    if installed.is_dir():
        return str(installed)
    checkout = os.path.dirname(_PACKAGE_ROOT)  # an editable install or a plain checkout: jobs/ beside medtl/
    return os.path.join(checkout, "jobs")


def job_file(name: str) -> str:
    """The path of a shipped job file, e.g. job_file("demo.yaml") or job_file("search/heads.yaml")."""
    return os.path.join(jobs_dir(), *name.split("/"))


def resolve(path: str | os.PathLike) -> str | os.PathLike:
    """`path` itself when it exists; otherwise a `jobs/NAME` path is the shipped job file NAME (so the
    commands in the docs work from any folder after a wheel install). Anything else is left alone."""
    text = os.fspath(path)
    if os.path.exists(text) or os.path.isabs(text):
        return path
    parts = os.path.normpath(text).split(os.sep)
    if len(parts) > 1 and parts[0] == "jobs":
        shipped = job_file("/".join(parts[1:]))
        if os.path.isfile(shipped):
            return shipped
    return path
