"""The Dockerfile cannot be built here (no Docker engine): check that it installs what the Makefile and
setup.cfg pin, builds Horovod with NCCL, MPI and Gloo, and fits the manifests (user, SSH, entrypoint)."""
from __future__ import annotations

import configparser
import json
import os
import re
import shlex

import yaml
from dockerfile_parse import DockerfileParser

from conftest import REPO

DOCKERFILE = os.path.join(REPO, "Dockerfile")


def instructions() -> list[tuple[str, str]]:
    parser = DockerfileParser(path=DOCKERFILE)
    return [(s["instruction"], s["value"]) for s in parser.structure if s["instruction"] != "COMMENT"]


def makefile_var(name: str) -> str:
    text = open(os.path.join(REPO, "Makefile"), encoding="utf-8").read().replace("\\\n", " ")
    (value,) = re.findall(rf"^{name}\s*[:?]?=\s*(.*)$", text, re.M)
    return value.strip()


def setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    return cfg


def pins(text: str) -> dict[str, str]:
    """{package (without extras): version} of `name[extra]==version` lines."""
    found = {}
    for line in text.splitlines():
        match = re.match(r"\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^\s;#]+)", line)
        if match:
            found[match.group(1).lower()] = match.group(3)
    return found


def args_defaults() -> dict[str, str]:
    return dict(value.split("=", 1) for kind, value in instructions() if kind == "ARG" and "=" in value)


def runs() -> list[str]:
    return [value for kind, value in instructions() if kind == "RUN"]


def test_horovod_version_is_the_makefiles():
    assert args_defaults()["HOROVOD_VERSION"] == makefile_var("HOROVOD_VERSION") == "0.28.1"
    (build,) = [r for r in runs() if "horovod==" in r]
    assert "horovod==${HOROVOD_VERSION}" in build


def test_horovod_is_built_with_nccl_mpi_and_gloo_like_the_makefile():
    (build,) = [r for r in runs() if "horovod==" in r]
    flags = set(re.findall(r"\b(HOROVOD_[A-Z_]+=\S+)", build))
    assert {"HOROVOD_WITH_MPI=1", "HOROVOD_WITH_GLOO=1", "HOROVOD_GPU_OPERATIONS=NCCL"} <= flags
    makefile = set(makefile_var("HOROVOD_BUILD_ENV").split())
    # The same build as `make horovod`, except that MPI is on in the image.
    assert makefile - {"HOROVOD_WITHOUT_MPI=1"} <= flags and "HOROVOD_WITHOUT_MPI=1" not in flags
    assert "--no-build-isolation" in build and "nccl_built()" in build and "mpi_built()" in build


def test_every_other_version_comes_from_setup_cfg():
    """One list of pins: the image pip-installs the project with its gpu extra and pins nothing itself."""
    installs = [shlex.split(r.replace("\\\n", " ")) for r in runs() if "pip install" in r]
    project = [cmd for cmd in installs if any(a.startswith("/src[") for a in cmd)]
    assert project and project[0][-1] == "/src[gpu]"
    other_pins = [a for cmd in installs for a in cmd if "==" in a and not a.startswith("horovod==")
                  and not a.startswith("HOROVOD_")]
    assert other_pins == []
    cfg = setup_cfg()
    base, gpu = pins(cfg["options"]["install_requires"]), pins(cfg["options.extras_require"]["gpu"])
    assert gpu == {"tensorflow": base["tensorflow"]} == {"tensorflow": "2.17.1"}


def test_python_is_the_projects():
    wanted = re.search(r"python3\.\d+", makefile_var("PYTHON")).group(0)
    assert wanted == "python3.11" and ">=3.11,<3.12" in setup_cfg()["options"]["python_requires"]
    used = set(re.findall(r"python3\.\d+", " ".join(runs())))
    assert used == {wanted}


def test_runtime_image_runs_medtl_as_the_manifests_user():
    steps = instructions()
    final = steps[max(i for i, (kind, _) in enumerate(steps) if kind == "FROM"):]
    assert ("USER", "medtl") in final and ("ENTRYPOINT", '["tini", "--", "medtl"]') in final
    assert any(k == "RUN" and re.search(r"apt-get install .*\btini\b", v.replace("\\\n", " ")) for k, v in final)
    assert "medtl = medtl.cli:main" in setup_cfg()["options.entry_points"]["console_scripts"]
    (useradd,) = [v for k, v in final if k == "RUN" and "useradd" in v]
    uid = int(re.search(r"--uid (\d+)", useradd).group(1))
    train = yaml.safe_load(open(os.path.join(REPO, "k8s", "base", "train.yaml"), encoding="utf-8"))
    for replica in train["spec"]["mpiReplicaSpecs"].values():
        assert replica["template"]["spec"]["securityContext"]["runAsUser"] == uid != 0


def test_sshd_matches_the_mpijob():
    (useradd,) = [v for k, v in instructions() if k == "RUN" and "useradd" in v]
    train = yaml.safe_load(open(os.path.join(REPO, "k8s", "base", "train.yaml"), encoding="utf-8"))
    worker = train["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    config = worker["args"][worker["args"].index("-f") + 1]
    assert f"> {config}" in useradd  # the worker's sshd config is written by the image
    port = worker["readinessProbe"]["tcpSocket"]["port"]
    assert f"Port {port}" in useradd and f"    Port {port}\\n" in useradd  # sshd and the ssh client agree
    # The host key is made in each worker pod (an emptyDir), never the operator's user key (id_rsa).
    host_key = re.search(r"'HostKey (\S+)'", useradd).group(1)
    assert not host_key.startswith(train["spec"]["sshAuthMountPath"])
    assert "StrictModes" not in useradd  # on, the default
    keys = re.search(r"'AuthorizedKeysCommand /usr/bin/cat (\S+)'", useradd).group(1)
    assert keys == f"{train['spec']['sshAuthMountPath']}/authorized_keys"  # what the operator mounts
    assert port > 1024  # no capability to bind below 1024: they are all dropped


def test_the_image_ships_the_job_configs():
    """The wheel built in the image carries jobs/ (setup.py maps it to medtl/jobs): `medtl demo` needs it."""
    copies = [v.split() for k, v in instructions() if k == "COPY" and "--from" not in v]
    sources = {src for *srcs, dest in copies for src in srcs if dest.startswith("/src")}
    assert {"setup.py", "setup.cfg", "pyproject.toml", "medtl", "jobs"} <= sources
    assert ["jobs", "/src/jobs"] in copies
    steps = instructions()
    install = next(i for i, (kind, value) in enumerate(steps) if kind == "RUN" and "/src[gpu]" in value)
    assert steps.index(("COPY", "jobs /src/jobs")) < install


def test_base_images_are_cuda_for_tensorflow_2_17():
    froms = [v for k, v in instructions() if k == "FROM"]
    defaults = args_defaults()
    resolved = [re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], f.split()[0]) for f in froms]
    # TensorFlow 2.17 is built for CUDA 12.3; the build stage needs the devel image for nvcc and NCCL headers.
    assert resolved == ["nvidia/cuda:12.3.2-devel-ubuntu22.04", "nvidia/cuda:12.3.2-runtime-ubuntu22.04"]
    assert json.loads(dict(instructions())["ENTRYPOINT"]) == ["tini", "--", "medtl"]
