"""The subset of kustomize that k8s/ uses, so `medtl k8s render` works without kustomize.

Supported: resources (files and kustomization folders), configMapGenerator from files with the
name hash disabled, JSON 6902 patches with a target, labels (metadata only) and images. Any
other field is refused by name rather than ignored; tests compare the output with kubectl's.
"""
from __future__ import annotations

import copy
import os
import re

import yaml

from medtl.errors import MedtlError

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "configMapGenerator", "generatorOptions", "patches",
                    "labels", "images"}
# kustomize's "legacy" output order (kinds listed first go first; others in between, by GVK).
ORDER_FIRST = ("Namespace", "ResourceQuota", "StorageClass", "CustomResourceDefinition", "ServiceAccount",
               "PodSecurityPolicy", "Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding", "ConfigMap",
               "Secret", "Endpoints", "Service", "LimitRange", "PriorityClass", "PersistentVolume",
               "PersistentVolumeClaim", "Deployment", "StatefulSet", "CronJob", "PodDisruptionBudget")
ORDER_LAST = ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration")


class KustomizeError(MedtlError):
    """A kustomization that is invalid, or uses kustomize features outside the supported subset."""


def build(folder: str) -> list[dict]:
    """The objects `kubectl kustomize FOLDER` prints, in the same order."""
    return sorted(_build(os.path.abspath(folder)), key=_order_key)


def _build(root: str) -> list[dict]:
    path = _kustomization_file(root)
    spec = _load_yaml(path) or {}
    if not isinstance(spec, dict):
        raise KustomizeError(f"{path} must hold a mapping")
    unsupported = sorted(set(spec) - SUPPORTED_FIELDS)
    if unsupported:
        raise KustomizeError(f"{path}: field(s) {', '.join(unsupported)} are not supported by `medtl k8s render`; "
                             "use `kubectl kustomize` for this kustomization")
    objects = []
    for entry in spec.get("resources") or []:
        objects.extend(_load_resource(root, path, entry))
    objects.extend(_generate_configmaps(root, path, spec))
    for patch in spec.get("patches") or []:
        _apply_patch(objects, root, path, patch)
    for group in spec.get("labels") or []:
        _apply_labels(objects, path, group)
    for image in spec.get("images") or []:
        set_image(objects, image, path)
    _check_unique(objects, path)
    return objects


def _kustomization_file(root: str) -> str:
    found = [os.path.join(root, name) for name in KUSTOMIZATION_FILES if os.path.isfile(os.path.join(root, name))]
    if len(found) != 1:
        what = "no" if not found else "more than one"
        raise KustomizeError(f"{root} has {what} kustomization file (one of {', '.join(KUSTOMIZATION_FILES)})")
    return found[0]


def _load_yaml(path: str):
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise KustomizeError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None


def _inside(root: str, path: str, kfile: str, what: str) -> str:
    """A file a kustomization reads must be in or below its folder (kustomize's load restriction)."""
    full = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([full, os.path.realpath(root)]) != os.path.realpath(root):
        raise KustomizeError(f"{kfile}: {what} {path} is not in or below {root}")
    if not os.path.isfile(full):
        raise KustomizeError(f"{kfile}: {what} {path} does not exist")
    return full


def _load_resource(root: str, kfile: str, entry: str) -> list[dict]:
    target = os.path.normpath(os.path.join(root, entry))
    if os.path.isdir(target):
        return _build(target)
    full = _inside(root, entry, kfile, "resource")
    try:
        with open(full, encoding="utf-8") as fh:
            docs = [d for d in yaml.safe_load_all(fh) if d is not None]
    except yaml.YAMLError as exc:
        raise KustomizeError(f"{full} is not valid YAML: {str(exc).splitlines()[0]}") from None
    for doc in docs:
        if not (isinstance(doc, dict) and doc.get("kind") and doc.get("metadata", {}).get("name")):
            raise KustomizeError(f"{full}: every document must be a Kubernetes object with kind and metadata.name")
    return docs


def _generate_configmaps(root: str, kfile: str, spec: dict) -> list[dict]:
    generators = spec.get("configMapGenerator") or []
    options = spec.get("generatorOptions") or {}
    if not generators:
        return []
    if options.get("disableNameSuffixHash") is not True or set(options) - {"disableNameSuffixHash", "labels"}:
        raise KustomizeError(f"{kfile}: `medtl k8s render` supports configMapGenerator only with generatorOptions "
                             "{disableNameSuffixHash: true, labels: ...}")
    maps = []
    for gen in generators:
        if set(gen) - {"name", "files"}:
            raise KustomizeError(f"{kfile}: configMapGenerator {gen.get('name')!r} may only have name and files")
        data = {}
        for entry in gen.get("files") or []:
            key, _, path = entry.rpartition("=") if "=" in entry else (os.path.basename(entry), "", entry)
            with open(_inside(root, path, kfile, "file"), encoding="utf-8") as fh:
                data[key] = fh.read()
        metadata = {"name": gen["name"]}
        if options.get("labels"):
            metadata["labels"] = dict(options["labels"])
        maps.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
    return maps


# ----------------------------------------------------------------------------- transformers


def _matches(obj: dict, target: dict) -> bool:
    group, _, version = obj.get("apiVersion", "").rpartition("/")
    wanted = {"group": group, "version": version, "kind": obj.get("kind"), "name": obj["metadata"]["name"]}
    return all(target[key] == wanted[key] for key in target)


def _apply_patch(objects: list[dict], root: str, kfile: str, entry: dict) -> None:
    if set(entry) - {"path", "patch", "target"} or ("path" in entry) == ("patch" in entry):
        raise KustomizeError(f"{kfile}: a patch needs exactly one of path or patch, a target, and nothing else")
    where = entry.get("path", "inline patch")
    if "path" in entry:
        ops = _load_yaml(_inside(root, entry["path"], kfile, "patch"))
    else:
        ops = yaml.safe_load(entry["patch"])
    target = entry.get("target") or {}
    if not isinstance(ops, list) or not target:
        raise KustomizeError(f"{kfile}: {where}: only JSON 6902 patches (a list of operations) with a target "
                             "are supported by `medtl k8s render`")
    if set(target) - {"group", "version", "kind", "name"}:
        raise KustomizeError(f"{kfile}: {where}: a target may select by group, version, kind and name only")
    hits = [i for i, obj in enumerate(objects) if _matches(obj, target)]
    if not hits:
        raise KustomizeError(f"{kfile}: {where}: the target {target} matches no resource")
    for i in hits:
        objects[i] = json_patch(objects[i], ops, f"{kfile}: {where}")


def _apply_labels(objects: list[dict], kfile: str, group: dict) -> None:
    if set(group) - {"pairs"} or not isinstance(group.get("pairs"), dict):
        raise KustomizeError(f"{kfile}: labels entries may only have `pairs` (selectors and templates untouched)")
    for obj in objects:
        obj["metadata"].setdefault("labels", {}).update(group["pairs"])


def split_image(ref: str) -> tuple[str, str, str]:
    """(name, tag, digest) of an image reference; tag and digest may be empty."""
    name, _, digest = ref.partition("@")
    slash = name.rfind("/")
    if name.rfind(":") > slash:
        name, _, tag = name.rpartition(":")
        return name, tag, digest
    return name, "", digest


def set_image(objects: list[dict], image: dict, kfile: str = "--image") -> None:
    """kustomize's images transformer: every container or initContainer running image `name`."""
    if set(image) - {"name", "newName", "newTag", "digest"} or "name" not in image:
        raise KustomizeError(f"{kfile}: an images entry has name and newName, newTag or digest")

    def rewrite(ref: str) -> str:
        name, tag, digest = split_image(ref)
        if name != image["name"]:
            return ref
        name = image.get("newName", name)
        if image.get("digest"):
            return f"{name}@{image['digest']}"
        if image.get("newTag"):
            return f"{name}:{image['newTag']}"
        return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")

    for obj in objects:
        for container in containers(obj):
            if "image" in container:
                container["image"] = rewrite(str(container["image"]))


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


def _check_unique(objects: list[dict], kfile: str) -> None:
    seen = set()
    for obj in objects:
        key = (obj.get("apiVersion"), obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"])
        if key in seen:
            raise KustomizeError(f"{kfile}: {obj['kind']}/{obj['metadata']['name']} is defined twice")
        seen.add(key)


def _order_key(obj: dict):
    kind = obj["kind"]
    rank = (-len(ORDER_FIRST) + ORDER_FIRST.index(kind) if kind in ORDER_FIRST
            else 1 + ORDER_LAST.index(kind) if kind in ORDER_LAST else 0)
    group, _, version = obj.get("apiVersion", "").rpartition("/")
    gvk = "_".join(part for part in (group, version, kind) if part)
    return rank, gvk, obj["metadata"].get("namespace") or "", obj["metadata"]["name"]


# ----------------------------------------------------------------------------- JSON patch (RFC 6902)


def _pointer(path: str, where: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"{where}: patch path {path!r} must start with /")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _index(container: list, token: str, where: str, path: str, append: bool = False) -> int:
    if append and token == "-":
        return len(container)
    if not re.fullmatch(r"0|[1-9][0-9]*", token) or int(token) > len(container) - (0 if append else 1):
        raise KustomizeError(f"{where}: patch path {path} does not exist (index {token})")
    return int(token)


def json_patch(obj: dict, ops: list, where: str) -> dict:
    """`obj` with the add/remove/replace operations applied (a copy); clear errors for bad paths."""
    result = copy.deepcopy(obj)
    for op in ops:
        if not isinstance(op, dict) or op.get("op") not in ("add", "remove", "replace") or "path" not in op:
            raise KustomizeError(f"{where}: only add, remove and replace operations with a path are supported, "
                                 f"got {op!r}")
        tokens = _pointer(op["path"], where)
        parent = result
        for token in tokens[:-1]:
            if isinstance(parent, list):
                parent = parent[_index(parent, token, where, op["path"])]
            elif isinstance(parent, dict) and token in parent:
                parent = parent[token]
            else:
                raise KustomizeError(f"{where}: patch path {op['path']} does not exist in "
                                     f"{obj['kind']}/{obj['metadata']['name']}")
        _apply_op(parent, tokens[-1], op, where)
    return result


def _apply_op(parent, last: str, op: dict, where: str) -> None:
    kind, path = op["op"], op["path"]
    if kind != "remove" and "value" not in op:
        raise KustomizeError(f"{where}: {kind} {path} needs a value")
    value = copy.deepcopy(op.get("value"))
    if isinstance(parent, list):
        i = _index(parent, last, where, path, append=kind == "add")
        if kind == "add":
            parent.insert(i, value)
        elif kind == "remove":
            del parent[i]
        else:
            parent[i] = value
    elif isinstance(parent, dict):
        if kind != "add" and last not in parent:
            raise KustomizeError(f"{where}: patch path {path} does not exist")
        if kind == "remove":
            del parent[last]
        else:
            parent[last] = value
    else:
        raise KustomizeError(f"{where}: patch path {path} does not exist")
