"""`medtl k8s render`: the manifests of one overlay in k8s/overlays, as `kubectl kustomize` prints them.

`--set KEY=VALUE` adds a config override to the training command (checked against the overlay's
job config first); `--image REF` sets the image of every container.
"""
from __future__ import annotations

import os
import re

import yaml

from medtl.errors import ConfigError, MedtlError
from medtl.k8s import kustomize

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
K8S_DIR = os.path.join(REPO, "k8s")
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
    """The overlay's objects, with `overrides` added to every `medtl train` command."""
    names = overlays(k8s_dir)
    if overlay not in names:
        raise MedtlError(f"unknown overlay {overlay!r}; choose one of: {', '.join(names)} (folders in "
                         f"{os.path.join(k8s_dir, 'overlays')})")
    objects = kustomize.build(os.path.join(k8s_dir, "overlays", overlay))
    if overrides:
        _add_overrides(objects, list(overrides), overlay)
    if image is not None:
        if not IMAGE_REF.fullmatch(image):
            raise MedtlError(f"--image {image!r} is not an image reference; give e.g. registry.local/medtl:0.1.0")
        for obj in objects:
            for container in kustomize.containers(obj):
                container["image"] = image
    return objects


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


def _add_overrides(objects: list[dict], overrides: list[str], overlay: str) -> None:
    """Append `--set` overrides to each training command, after loading its config with them."""
    from medtl.cli import build_parser
    from medtl.config import load_config

    trained = 0
    for obj in objects:
        for container in kustomize.containers(obj):
            found = medtl_command(container)
            if not found or found[0][found[1] + 1: found[1] + 2] != ["train"]:
                continue
            argv, start = found
            args = build_parser().parse_args(argv[start + 1:])
            text = mounted_file(obj, args.config, objects)
            if text is None:
                raise MedtlError(f"{obj['kind']}/{obj['metadata']['name']}: {args.config} is not mounted from a "
                                 "ConfigMap; cannot check --set against it")
            try:
                load_config(raw=yaml.safe_load(text), overrides=[*args.overrides, *overrides])
            except ConfigError as exc:
                raise MedtlError(f"invalid --set for the {overlay} overlay's training config ({args.config}): "
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
