"""Packaging: the wheel ships jobs/ as medtl/jobs, `jobs/X.yaml` resolves from any folder, and the
config module stays free of TensorFlow and albumentations (and of import circles)."""
from __future__ import annotations

import ast
import glob
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from medtl import jobfiles
from medtl.config import load_config
from medtl.errors import ConfigError

from conftest import JOBS, REPO

MINIMAL = {"phases": [{"name": "head", "epochs": 1, "learning_rate": 1e-3}]}


def shipped_job_files() -> list[str]:
    """The job files of the repository's jobs/ that a wheel must carry, relative to jobs/."""
    paths = [p for folder in ("", "search", "heads", "label_maps") for p in glob.glob(os.path.join(JOBS, folder, "*.yaml"))]
    return sorted(os.path.relpath(p, JOBS).replace(os.sep, "/") for p in paths)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    """medtl's wheel, built from a copy of the sources (so no build/ or egg-info lands in the repo)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("setup.py", "setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), src / name)
    for folder in ("medtl", "jobs"):
        shutil.copytree(os.path.join(REPO, folder), src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (path,) = glob.glob(str(tmp / "dist" / "medtl-*.whl"))
    return path


def test_the_wheel_ships_every_job_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = shipped_job_files()
    assert {"demo.yaml", "smoke.yaml", "chestxray14_b4.yaml", "search/heads.yaml", "heads/best_b4.yaml",
            "label_maps/chexpert_to_cxr14.yaml"} <= set(wanted)
    assert {f"medtl/jobs/{name}" for name in wanted} <= names
    with zipfile.ZipFile(wheel) as whl:
        for name in wanted:
            assert whl.read(f"medtl/jobs/{name}") == open(os.path.join(JOBS, name), "rb").read()


def test_an_installed_wheel_finds_its_job_files(wheel, tmp_path):
    """Installed without the checkout on the path, medtl resolves jobs/ to its own copy."""
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile",
                        "--target", str(site), wheel], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    code = ("import medtl, os; from medtl import jobfiles; from medtl.config import load_config; "
            "from medtl.cli import build_parser; "
            "print(medtl.__file__); print(jobfiles.resolve('jobs/search/heads.yaml')); "
            "print(build_parser().parse_args(['demo', '--out', 'd']).config); "
            "print(load_config('jobs/smoke.yaml').model.backbone)")
    env = {**os.environ, "PYTHONPATH": str(site)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=work, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    module, space, demo, backbone = r.stdout.split()
    packaged = site / "medtl" / "jobs"
    assert module == str(site / "medtl" / "__init__.py")
    assert space == str(packaged / "search" / "heads.yaml") and demo == str(packaged / "demo.yaml")
    assert backbone == load_config(os.path.join(JOBS, "smoke.yaml")).model.backbone


def test_job_paths_resolve_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert jobfiles.resolve("jobs/smoke.yaml") == os.path.join(jobfiles.jobs_dir(), "smoke.yaml")
    assert load_config("jobs/smoke.yaml") == load_config(os.path.join(JOBS, "smoke.yaml"))
    assert jobfiles.resolve("jobs/absent.yaml") == "jobs/absent.yaml"
    with pytest.raises(ConfigError, match="config file jobs/absent.yaml does not exist"):
        load_config("jobs/absent.yaml")
    (tmp_path / "jobs").mkdir()  # a file of the user's own jobs/ folder wins over the shipped one
    (tmp_path / "jobs" / "smoke.yaml").write_text("phases: [{name: mine, epochs: 1, learning_rate: 0.1}]\n")
    assert jobfiles.resolve("jobs/smoke.yaml") == "jobs/smoke.yaml"
    assert load_config("jobs/smoke.yaml").phases[0].name == "mine"


def test_config_imports_neither_tensorflow_nor_albumentations():
    code = ("import sys; import medtl.config as c; "
            "heavy = lambda: sorted(m for m in ('tensorflow', 'albumentations') if m in sys.modules); "
            "print(heavy()); "
            f"c.load_config(raw={{**{MINIMAL!r}, 'data': {{'augment': []}}}}); print(heavy()); "
            f"c.load_config({os.path.join(JOBS, 'smoke.yaml')!r}); print(heavy())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    # Only checking an augmentation policy loads albumentations (medtl.data.policy); TensorFlow never.
    assert r.stdout.split("\n")[:3] == ["[]", "[]", "['albumentations']"]


def medtl_imports() -> dict[str, set[str]]:
    """{module: medtl modules it imports anywhere in its source, function-level imports included}."""
    root = os.path.join(REPO, "medtl")
    modules = {}
    for path in glob.glob(os.path.join(root, "**", "*.py"), recursive=True):
        name = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".").removesuffix(".__init__")
        modules[name] = ast.parse(open(path, encoding="utf-8").read())
    graph = {}
    for name, tree in modules.items():
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                             for a in node.names)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_config_is_in_no_import_circle():
    graph = medtl_imports()
    seen, todo = set(), list(graph["medtl.config"])
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph[module])
    assert "medtl.config" not in seen, "a module that medtl.config imports imports medtl.config back"
    assert "medtl.data.augment" not in seen and "medtl.tf" not in seen
