"""`medtl k8s render`: the manifests of one overlay in k8s/overlays, built by `kubectl kustomize`.

kubectl's built-in kustomize builds the overlay; medtl then adds `--set KEY=VALUE` config overrides to
the training command (checked against the overlay's job config first) and, with `--image REF`, sets
the image of every container.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess

import yaml

from medtl.config import load_config
from medtl.errors import ConfigError, MedtlError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
K8S_DIR = os.path.join(REPO, "k8s")
KUBECTL_INSTALL = ("install kubectl >= 1.27 (kustomize v5 built in): `make system-deps`, or your Kubernetes "
                   "apt source, or https://kubernetes.io/docs/tasks/tools/")
# registry[:port]/path[:tag][@sha256:digest], as docker accepts it (no whitespace, no scheme).
IMAGE_REF = re.compile(r"[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-]+[a-z0-9]+)*)*"
                       r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?")


def overlays(k8s_dir: str = K8S_DIR) -> list[str]:
    folder = os.path.join(k8s_dir, "overlays")
    if not os.path.isdir(folder):
        raise MedtlError(f"no Kubernetes manifests at {folder}; `medtl k8s render` runs from a clone of the "
                         "medtl repository (pip install -e .)")
    return sorted(name for name in os.listdir(folder) if os.path.isdir(os.path.join(folder, name)))


def render(overlay: str, overrides: list[str] = (), image: str | None = None, k8s_dir: str = K8S_DIR) -> list[dict]:
    """The overlay's objects as `kubectl kustomize` builds them, with `overrides` added to every `medtl train`."""
    names = overlays(k8s_dir)
    if overlay not in names:
        raise MedtlError(f"unknown overlay {overlay!r}; choose one of: {', '.join(names)} (folders in "
                         f"{os.path.join(k8s_dir, 'overlays')})")
    if image is not None and not IMAGE_REF.fullmatch(image):
        raise MedtlError(f"--image {image!r} is not an image reference; give e.g. registry.local/medtl:0.1.0")
    objects = kustomize(os.path.join(k8s_dir, "overlays", overlay))
    if overrides:
        _add_overrides(objects, list(overrides), overlay)
    if image is not None:
        for obj in objects:
            for container in containers(obj):
                container["image"] = image
    return objects


def kustomize(folder: str) -> list[dict]:
    """The objects `kubectl kustomize FOLDER` prints, in its order."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise MedtlError(f"`medtl k8s render` runs `kubectl kustomize`, and kubectl is not on PATH: {KUBECTL_INSTALL}")
    result = subprocess.run([kubectl, "kustomize", folder], capture_output=True, text=True)
    if result.returncode != 0:
        raise MedtlError(f"`kubectl kustomize {folder}` failed: {_kubectl_reason(result)}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


def _kubectl_reason(result: subprocess.CompletedProcess) -> str:
    """kubectl's error on one line, without its log prefix (`E1201 ... "command failed" err="..."`)."""
    quoted = re.search(r'err="((?:[^"\\]|\\.)*)"', result.stderr)
    block = re.search(r"err=<\n(.*?)\n\s*>", result.stderr, re.S)  # kubectl's multi-line form
    if quoted:
        text = quoted.group(1).replace('\\"', '"').replace("\\n", " ")
    elif block:
        text = block.group(1)
    else:
        text = result.stderr or f"exit status {result.returncode}"
    return " ".join(text.split())


def containers(node) -> list[dict]:
    """Every container and initContainer anywhere in an object (pod templates of any kind)."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                found.extend(c for c in value if isinstance(c, dict))
            else:
                found.extend(containers(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(containers(value))
    return found


def medtl_command(container: dict) -> tuple[list[str], int] | None:
    """(argv, i) with argv[i] == 'medtl' when the container runs medtl (directly or under mpirun)."""
    argv = [str(a) for a in (container.get("command") or []) + (container.get("args") or [])]
    return (argv, argv.index("medtl")) if "medtl" in argv else None


def mounted_file(obj: dict, path: str, objects: list[dict]) -> str | None:
    """The text of `path` when a pod template of `obj` mounts it from a ConfigMap among `objects`."""
    maps = {o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"}
    for spec in pod_specs(obj):
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec.get("containers", []):
            for mount in container.get("volumeMounts", []):
                prefix = mount["mountPath"].rstrip("/") + "/"
                source = volumes.get(mount["name"], {}).get("configMap")
                if source and path.startswith(prefix):
                    return maps.get(source["name"], {}).get(path[len(prefix):])
    return None


def pod_specs(obj: dict) -> list[dict]:
    """The pod specs of a Pod, a Job (its template) or an MPIJob (launcher and workers)."""
    spec = obj.get("spec", {})
    if obj["kind"] == "Pod":
        return [spec]
    if obj["kind"] == "MPIJob":
        return [r["template"]["spec"] for r in spec.get("mpiReplicaSpecs", {}).values()]
    if "template" in spec:
        return [spec["template"]["spec"]]
    return []


def _config_options(argv: list[str]) -> tuple[str | None, list[str]]:
    """(--config, the --set values) of a `medtl train` argv (after 'train'), as medtl's parser reads them.

    Only these two options matter here; the tests run every manifest command through the real parser.
    """
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    known, _ = parser.parse_known_args(argv)
    return known.config, known.overrides


def _add_overrides(objects: list[dict], overrides: list[str], overlay: str) -> None:
    """Append `--set` overrides to each training command, after loading its config with them."""
    trained = 0
    for obj in objects:
        for container in containers(obj):
            found = medtl_command(container)
            if not found or found[0][found[1] + 1: found[1] + 2] != ["train"]:
                continue
            argv, start = found
            config, existing = _config_options(argv[start + 2:])
            where = f"{obj['kind']}/{obj['metadata']['name']}"
            if config is None:
                raise MedtlError(f"{where}: its `medtl train` command has no --config to check --set against")
            text = mounted_file(obj, config, objects)
            if text is None:
                raise MedtlError(f"{where}: --config {config} is not mounted from a ConfigMap; cannot check --set "
                                 "against it")
            try:
                load_config(raw=yaml.safe_load(text), overrides=[*existing, *overrides])
            except ConfigError as exc:
                raise MedtlError(f"invalid --set for the {overlay} overlay's training config ({config}): "
                                 f"{exc}") from None
            for assignment in overrides:
                container.setdefault("args", []).extend(["--set", assignment])
            trained += 1
    if not trained:
        raise MedtlError(f"the {overlay} overlay has no `medtl train` command for --set to go to")


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the job configs in the ConfigMap) as readable literal blocks."""


def _str(dumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(objects: list[dict], header: str = "") -> str:
    body = yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, default_flow_style=False, explicit_start=True)
    return (f"# {header}\n" if header else "") + body
