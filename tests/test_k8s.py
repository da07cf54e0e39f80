"""k8s/ checked offline: `medtl k8s render` = kubectl kustomize, schemas, pod security, secrets, and
the commands in the manifests run through the real parser and config loader."""
from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import re
import subprocess
import sys

import jsonschema
import kubernetes_validate
import pytest
import yaml

import medtl
from medtl.cli import build_parser
from medtl.config import load_config
from medtl.errors import MedtlError
from medtl.k8s.render import containers, kustomize, mounted_file, overlays, render

from conftest import JOBS, REPO, assert_user_error, cli_env, run_cli

K8S = os.path.join(REPO, "k8s")
PHASED = ("chestxray14-b4-phase-head", "chestxray14-b4-phase-top", "chestxray14-b4-phase-all")
OVERLAYS = ("chestxray14-b4", "cpu-smoke", "gpu", *PHASED)
# The oldest Kubernetes the manifests are written for, and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.29.0", "1.37.0")
CRD = os.path.join(K8S, "crds", "mpijob-crd-v2beta1.yaml")
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
# Environment a container image provides (forwarded by mpirun -x without being set in the pod).
IMAGE_ENV = {"PATH", "LD_LIBRARY_PATH"}
SECRET_NAMES = re.compile(r"SECRET|PASSWORD|TOKEN|SALT|ACCESS_KEY|CREDENTIAL", re.I)


def kubectl_kustomize(folder: str) -> list[dict]:
    result = subprocess.run(["kubectl", "kustomize", folder], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return list(yaml.safe_load_all(result.stdout))


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    """Each overlay as a user renders it: `medtl k8s render --overlay NAME`."""
    out = {}
    for overlay in OVERLAYS:
        result = run_cli("k8s", "render", "--overlay", overlay)
        assert result.returncode == 0, result.stderr
        out[overlay] = [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]
    return out


def by_name(objects: list[dict], kind: str, name: str) -> dict:
    (obj,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(label, pod spec) for a Job's template and each MPIJob replica's template."""
    if obj["kind"] == "MPIJob":
        return [(f"MPIJob/{obj['metadata']['name']}/{role}", spec["template"]["spec"])
                for role, spec in obj["spec"]["mpiReplicaSpecs"].items()]
    if obj["kind"] == "Job":
        return [(f"Job/{obj['metadata']['name']}", obj["spec"]["template"]["spec"])]
    if obj["kind"] == "Pod":
        return [(f"Pod/{obj['metadata']['name']}", obj["spec"])]
    assert "template" not in obj.get("spec", {}), f"{obj['kind']} has a pod template this test does not walk"
    return []


def all_pods(objects: list[dict]) -> list[tuple[str, dict]]:
    return [pod for obj in objects for pod in pod_templates(obj)]


# Every container's command starts with the image's init (PID 1 that passes SIGTERM on and reaps).
INIT = ["tini", "--"]


def argv_of(container: dict) -> list[str]:
    """The container's command and args, after the init (test_every_container_runs_under_tini)."""
    argv = [str(a) for a in (container.get("command") or []) + (container.get("args") or [])]
    return argv[len(INIT):] if argv[:len(INIT)] == INIT else argv


def expand(argv: list[str], container: dict, index: int = 0) -> list[str]:
    """Kubernetes' $(VAR) expansion from the container's env; an undefined VAR would stay literal."""
    env = {e["name"]: e for e in container.get("env", [])}

    def value(match):
        entry = env.get(match.group(1))
        assert entry is not None, f"$({match.group(1)}) is not defined in the container's env"
        if "value" in entry:
            return entry["value"]
        assert entry["valueFrom"].get("fieldRef", {}).get("fieldPath") == COMPLETION_INDEX, \
            f"$({match.group(1)}) in a command must not come from a Secret or anything but the completion index"
        return str(index)

    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value, arg) for arg in argv]


def mounts(spec: dict) -> list[tuple[dict, dict]]:
    """(volumeMount, volume) of the pod's first container."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    return [(m, volumes[m["name"]]) for m in spec["containers"][0].get("volumeMounts", [])]


def mount_for(spec: dict, path: str) -> tuple[dict, dict]:
    """The mount holding `path` (the longest mountPath that is a prefix of it)."""
    found = [(m, v) for m, v in mounts(spec) if (path + "/").startswith(m["mountPath"].rstrip("/") + "/")]
    assert found, f"{path} is on no mounted volume"
    return max(found, key=lambda mv: len(mv[0]["mountPath"]))


def read_only(mount: dict, volume: dict) -> bool:
    claim = volume.get("persistentVolumeClaim")
    return bool(mount.get("readOnly")) and (claim is None or bool(claim.get("readOnly")))


# ----------------------------------------------------------------------------- rendering


def test_the_overlays_are_the_documented_ones():
    assert overlays() == sorted(OVERLAYS)


def test_kubectl_with_kustomize_5_is_installed():
    result = subprocess.run(["kubectl", "version", "--client", "-o", "json"], capture_output=True, text=True)
    assert result.returncode == 0, "kubectl is missing: `make system-deps` installs it"
    version = json.loads(result.stdout)["kustomizeVersion"]
    assert int(version.lstrip("v").split(".")[0]) >= 5, version


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_render_equals_kubectl_kustomize(rendered, overlay):
    assert rendered[overlay] == kubectl_kustomize(os.path.join(K8S, "overlays", overlay))


def test_base_renders_like_kubectl_too():
    assert kustomize(os.path.join(K8S, "base")) == kubectl_kustomize(os.path.join(K8S, "base"))


def one_overlay(tmp_path, kustomization: dict, files: dict[str, object]) -> str:
    """A k8s folder holding one overlay 'x' (kustomization and files), for `render(..., k8s_dir=)`."""
    overlay = tmp_path / "overlays" / "x"
    overlay.mkdir(parents=True)
    for name, content in {"kustomization.yaml": kustomization, **files}.items():
        (overlay / name).write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return str(overlay)


def test_render_is_kubectl_on_patch_edge_cases(tmp_path):
    """add at '-' and at an index, remove, replace, labels, and images by tag and by digest."""
    overlay = one_overlay(tmp_path, {
        "resources": ["job.yaml"],
        "patches": [{"path": "p.yaml", "target": {"group": "batch", "version": "v1", "kind": "Job", "name": "j"}}],
        "labels": [{"pairs": {"team": "x"}}],
        "images": [{"name": "medtl", "newName": "reg.local/medtl", "newTag": "2"},
                   {"name": "other", "digest": "sha256:" + "1" * 64}]}, {
        "job.yaml": {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j"},
                     "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [
                         {"name": "a", "image": "medtl:1", "args": ["x", "y", "z"]},
                         {"name": "b", "image": "other@sha256:" + "0" * 64, "args": ["q"]}]}}}},
        "p.yaml": [
            {"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": "end"},
            {"op": "add", "path": "/spec/template/spec/containers/0/args/1", "value": "mid"},
            {"op": "remove", "path": "/spec/template/spec/containers/1/args"},
            {"op": "replace", "path": "/spec/template/spec/restartPolicy", "value": "OnFailure"},
            {"op": "add", "path": "/spec/backoffLimit", "value": 1}]})
    assert render("x", k8s_dir=str(tmp_path)) == kubectl_kustomize(overlay)


def test_render_takes_any_kustomize_feature(tmp_path):
    """namePrefix and strategic merge, which the hand-written subset refused, come from kubectl too."""
    overlay = one_overlay(tmp_path, {"namePrefix": "a-", "resources": ["cm.yaml"], "patches": [{"path": "p.yaml"}]}, {
        "cm.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {a: b}\n",
        "p.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {b: c}\n"})
    objects = render("x", k8s_dir=str(tmp_path))
    assert objects == kubectl_kustomize(overlay)
    assert [(o["metadata"]["name"], o["data"]) for o in objects] == [("a-c", {"a": "b", "b": "c"})]


def test_a_patch_path_that_does_not_exist_is_named(tmp_path):
    one_overlay(tmp_path, {"resources": ["cm.yaml"], "patches": [{"path": "p.yaml",
                                                                 "target": {"kind": "ConfigMap", "name": "c"}}]}, {
        "cm.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {a: b}\n",
        "p.yaml": [{"op": "remove", "path": "/data/nope"}]})
    with pytest.raises(MedtlError, match=r"kubectl kustomize .*overlays/x` failed: .*'/data/nope'") as caught:
        render("x", k8s_dir=str(tmp_path))
    assert "\n" not in str(caught.value) and "run.go" not in str(caught.value)  # kubectl's reason, on one line


def test_a_missing_kubectl_is_one_clear_line(tmp_path):
    env = {**cli_env(), "PATH": str(tmp_path)}  # run_cli starts python by its full path
    assert_user_error(run_cli("k8s", "render", "--overlay", "gpu", env=env),
                      "kubectl is not on PATH", "make system-deps")


def test_render_does_not_import_the_cli():
    """No import circle cli -> k8s.render -> cli: render reads `medtl train` commands without medtl's parser."""
    code = "import sys, medtl.k8s.render; assert 'medtl.cli' not in sys.modules, 'medtl.cli imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=cli_env())
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_kinds_validate_strictly(rendered, overlay):
    builtin = [o for o in rendered[overlay] if o["kind"] != "MPIJob"]
    assert {o["kind"] for o in builtin} >= {"ServiceAccount", "ConfigMap", "PersistentVolumeClaim", "Job"}
    for obj in builtin:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_builtin_validation_rejects_a_misspelled_field(rendered):
    job = copy.deepcopy(by_name(rendered["gpu"], "Job", "medtl-evaluate"))
    job["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readonly"] = True
    with pytest.raises(kubernetes_validate.ValidationError, match="readonly"):
        kubernetes_validate.validate(job, K8S_VERSIONS[0], strict=True)


def strict(schema):
    """The CRD schema with unknown fields rejected, as `kubectl apply` (strict field validation) does."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def mpijob_validator():
    crd = [d for d in yaml.safe_load_all(open(CRD, encoding="utf-8")) if d][0]
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v2beta1"]
    return jsonschema.Draft4Validator(strict(version["schema"]["openAPIV3Schema"]))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mpijobs_validate_against_the_crd(rendered, overlay, mpijob_validator):
    mpijobs = [o for o in rendered[overlay] if o["kind"] == "MPIJob"]
    assert [o["apiVersion"] for o in mpijobs] == ["kubeflow.org/v2beta1"]
    for obj in mpijobs:
        mpijob_validator.validate(obj)
        spec = obj["spec"]
        assert spec["runPolicy"]["cleanPodPolicy"] == "Running" and spec["runPolicy"]["backoffLimit"] >= 1
        assert spec["launcherCreationPolicy"] == "WaitForWorkersReady"
        assert spec["mpiImplementation"] == "OpenMPI"


def test_crd_validation_rejects_a_misspelled_field(rendered, mpijob_validator):
    obj = copy.deepcopy(by_name(rendered["gpu"], "MPIJob", "medtl-train"))
    obj["spec"]["slotPerWorker"] = obj["spec"].pop("slotsPerWorker")
    with pytest.raises(jsonschema.ValidationError, match="slotPerWorker"):
        mpijob_validator.validate(obj)


def test_the_crd_copy_is_the_shared_one():
    shared = os.path.join(REPO, "..", "shared", "k8s", "mpijob-crd-v2beta1.yaml")
    ours = [d for d in yaml.safe_load_all(open(CRD, encoding="utf-8")) if d]
    assert ours[0]["metadata"]["name"] == "mpijobs.kubeflow.org"
    if os.path.exists(shared):  # beside a checkout in the workplace; CI clones only the repo
        assert ours == [d for d in yaml.safe_load_all(open(shared, encoding="utf-8")) if d]


# ----------------------------------------------------------------------------- security


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_locked_down(rendered, overlay):
    pods = all_pods(rendered[overlay])
    assert len(pods) >= 5
    for where, spec in pods:
        pod_sc = spec.get("securityContext", {})
        assert not (spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC")), where
        assert not any("hostPath" in v for v in spec.get("volumes", [])), where
        assert spec.get("serviceAccountName") == "medtl" and spec.get("automountServiceAccountToken") is False, where
        for container in spec["containers"] + spec.get("initContainers", []):
            sc = {**pod_sc, **container.get("securityContext", {})}
            assert sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) != 0, where
            assert sc.get("seccompProfile") == {"type": "RuntimeDefault"}, where
            assert sc.get("allowPrivilegeEscalation") is False and not sc.get("privileged"), where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not sc.get("capabilities", {}).get("add"), where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_and_limits(rendered, overlay):
    for where, spec in all_pods(rendered[overlay]):
        for container in spec["containers"] + spec.get("initContainers", []):
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(kind, {})), f"{where}: {kind}"
            for name, amount in resources["limits"].items():
                if "/" in name:  # extended resources (GPUs): Kubernetes wants requests == limits
                    assert resources["requests"].get(name) == amount, where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_patient_data_is_mounted_read_only(rendered, overlay):
    """Raw studies and weights: read-only for every pod but the smoke run's synth, which writes fake ones.
    Records: read-only wherever they are read (training workers, evaluation)."""
    writers = []
    for where, spec in all_pods(rendered[overlay]):
        for mount, volume in mounts(spec):
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            if claim in ("medtl-raw", "medtl-weights") and not read_only(mount, volume):
                writers.append(where)
            if claim == "medtl-records" and ("MPIJob" in where or "evaluate" in where):
                assert read_only(mount, volume), where
    assert writers == (["Job/medtl-synth"] if overlay == "cpu-smoke" else [])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_value_is_written_in_a_manifest(rendered, overlay):
    assert not [o for o in rendered[overlay] if o["kind"] == "Secret"]
    used = set()
    for where, spec in all_pods(rendered[overlay]):
        for container in spec["containers"]:
            assert "envFrom" not in container, where
            for entry in container.get("env", []):
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if SECRET_NAMES.search(entry["name"]):
                    assert "value" not in entry and ref, f"{where}: {entry['name']} must come from a secretKeyRef"
                if ref:
                    used.add(ref["name"])
            joined = " ".join(argv_of(container))
            assert "--salt-file" not in joined and not re.search(r"(?i)(secret|password|token)=", joined), where
    assert {"medtl-id-salt", "medtl-object-store"} <= used


def test_the_id_salt_is_required_where_ids_are_hashed(rendered):
    ingest = by_name(rendered["gpu"], "Job", "medtl-ingest")["spec"]["template"]["spec"]["containers"][0]
    (salt,) = [e for e in ingest["env"] if e["name"] == "MEDTL_ID_SALT"]
    assert salt["valueFrom"]["secretKeyRef"] == {"name": "medtl-id-salt", "key": "salt"}  # not optional


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_the_release_and_labels_tell_the_stages(rendered, overlay):
    stages = set()
    for obj in rendered[overlay]:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "medtl", obj["metadata"]["name"]
        stages.add(labels["app.kubernetes.io/component"])
    expected = {"setup", "ingest", "finalize", "train", "evaluate", "report", "search"} | (
        {"synth"} if overlay == "cpu-smoke" else set())
    assert stages == expected
    for _, spec in all_pods(rendered[overlay]):
        for container in spec["containers"]:
            assert container["image"] == f"medtl:{medtl.__version__}"


def containers_of(spec: dict) -> list[dict]:
    return spec["containers"] + spec.get("initContainers", [])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_runs_under_tini(rendered, overlay):
    for where, spec in all_pods(rendered[overlay]):
        for container in containers_of(spec):
            assert container["command"][:len(INIT)] == INIT, f"{where}/{container['name']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_root_filesystems_are_read_only_with_tmp_and_home_on_empty_dirs(rendered, overlay):
    for where, spec in all_pods(rendered[overlay]):
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in containers_of(spec):
            assert container["securityContext"].get("readOnlyRootFilesystem") is True, f"{where}/{container['name']}"
        for container in spec["containers"]:
            mounted = {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}
            for path in ("/tmp", "/home/medtl"):
                assert path in mounted, f"{where}: nothing writable at {path}"
                assert mounted[path].get("emptyDir", {}).get("sizeLimit"), f"{where}: {path} is not a bounded emptyDir"


def quantity(text) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"(\d+)(\w*)", str(text))
    return int(match.group(1)) * units.get(match.group(2), 1)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_ephemeral_storage_requests_and_limits(rendered, overlay):
    for where, spec in all_pods(rendered[overlay]):
        for container in containers_of(spec):
            resources = container["resources"]
            request, limit = (resources.get(k, {}).get("ephemeral-storage") for k in ("requests", "limits"))
            assert request and limit, f"{where}/{container['name']}: ephemeral-storage requests and limits"
            assert quantity(request) <= quantity(limit), f"{where}/{container['name']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_jobs_fail_fast_on_exit_2_and_ignore_disruptions(rendered, overlay):
    """medtl exits 2 for usage and config errors (medtl.errors): a retry cannot fix them."""
    jobs = [o for o in rendered[overlay] if o["kind"] == "Job"]
    assert {o["metadata"]["name"] for o in jobs} >= {"medtl-ingest", "medtl-ingest-finalize", "medtl-evaluate",
                                                     "medtl-search"}
    for job in jobs:
        where, spec = f"Job/{job['metadata']['name']}", job["spec"]
        assert spec["template"]["spec"]["restartPolicy"] == "Never", where  # podFailurePolicy needs it
        rules = spec["podFailurePolicy"]["rules"]
        (container,) = spec["template"]["spec"]["containers"]
        assert {"action": "FailJob", "onExitCodes": {"containerName": container["name"], "operator": "In",
                                                     "values": [2]}} in rules, where
        assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules, where


def matches(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions with In/NotIn/Exists)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        value, op = labels.get(expr["key"]), expr["operator"]
        if (op == "In" and value not in expr["values"]) or (op == "NotIn" and value in expr["values"]) \
                or (op == "Exists" and value is None):
            return False
    return True


def admitted(policy: dict, source: dict, target: dict, port: int) -> bool:
    """Whether `policy` (when it selects `target`) lets a pod labelled `source` reach `port` over TCP."""
    spec = policy["spec"]
    if not matches(spec["podSelector"], target):
        return True  # not this policy's pod
    for rule in spec.get("ingress", []):
        sources = rule.get("from", [])
        if sources and not any(matches(peer.get("podSelector", {"matchLabels": {"-": "-"}}), source)
                               for peer in sources):
            continue
        for p in rule.get("ports", [{}]):
            low = p.get("port", 0)
            if p.get("protocol", "TCP") == "TCP" and low <= port <= p.get("endPort", low if "port" in p else 65535):
                return True
    return False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_launcher_reaches_the_workers_sshd(rendered, overlay):
    objects = rendered[overlay]
    (policy,) = [o for o in objects if o["kind"] == "NetworkPolicy"]
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(policy, version, strict=True)
    assert "Ingress" in policy["spec"]["policyTypes"]
    (mpijob,) = [o for o in objects if o["kind"] == "MPIJob"]
    replicas = mpijob["spec"]["mpiReplicaSpecs"]
    sshd = replicas["Worker"]["template"]["spec"]["containers"][0]["readinessProbe"]["tcpSocket"]["port"]

    def pod(role: str, job: str = mpijob["metadata"]["name"]) -> dict:  # labels as the mpi-operator sets them
        return {**replicas[role]["template"]["metadata"]["labels"], "training.kubeflow.org/job-name": job,
                "training.kubeflow.org/job-role": role.lower()}

    launcher, worker = pod("Launcher"), pod("Worker")
    evaluate = by_name(objects, "Job", "medtl-evaluate")["spec"]["template"]["metadata"]["labels"]
    assert admitted(policy, launcher, worker, sshd)
    assert not admitted(policy, worker, worker, sshd)  # ranks talk to each other, but not over SSH
    assert not admitted(policy, evaluate, worker, sshd) and not admitted(policy, {}, worker, sshd)
    assert admitted(policy, worker, worker, 40000) and admitted(policy, launcher, worker, 40000)  # MPI, NCCL
    assert not admitted(policy, evaluate, worker, 40000)
    assert not matches(policy["spec"]["podSelector"], launcher)  # the launcher itself stays reachable


def dockerfile_text() -> str:
    return open(os.path.join(REPO, "Dockerfile"), encoding="utf-8").read()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_sshd_host_keys_are_made_in_each_worker_pod(rendered, overlay):
    (mpijob,) = [o for o in rendered[overlay] if o["kind"] == "MPIJob"]
    worker = mpijob["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]
    host_key = re.search(r"'HostKey (\S+)'", dockerfile_text()).group(1)
    assert not host_key.startswith(mpijob["spec"]["sshAuthMountPath"])  # never the job's user key
    (init,) = [c for c in worker["initContainers"] if "ssh-keygen" in argv_of(c)]
    argv = argv_of(init)
    assert argv[argv.index("-f") + 1] == host_key
    volumes = {v["name"]: v for v in worker["volumes"]}
    (made,) = [m for m in init["volumeMounts"] if host_key.startswith(m["mountPath"] + "/")]
    assert "emptyDir" in volumes[made["name"]]  # new in every pod, gone with it
    sshd = worker["containers"][0]
    assert any(m["name"] == made["name"] and m["mountPath"] == made["mountPath"] for m in sshd["volumeMounts"])


def test_sshd_keeps_strict_modes():
    files = [os.path.join(REPO, "Dockerfile")] + glob.glob(os.path.join(K8S, "**", "*.yaml"), recursive=True)
    for path in files:
        assert not re.search(r"StrictModes\W+no", open(path, encoding="utf-8").read(), re.I), path
    assert "AuthorizedKeysCommand /usr/bin/cat" in dockerfile_text()


# ----------------------------------------------------------------------------- commands


def exact_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """medtl's parser, with flags spelled out in full: an abbreviation in a manifest breaks when a flag is added."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                exact_parser(sub)
    return parser


def parse(argv: list[str]):
    """argv (starting at 'medtl') through the real parser; argparse's exit becomes a test failure."""
    assert argv[0] == "medtl", argv
    try:
        return exact_parser(build_parser()).parse_args(argv[1:])
    except SystemExit as exc:
        pytest.fail(f"`{' '.join(argv)}` is rejected by medtl's parser (exit {exc.code})")


def job_command(objects, name, index=0):
    spec = by_name(objects, "Job", name)["spec"]["template"]["spec"]
    container = spec["containers"][0]
    return parse(expand(argv_of(container), container, index)), spec


def mpi_train(objects):
    """(train args, -np, MPIJob spec, worker pod spec) of the overlay's MPIJob."""
    (obj,) = [o for o in objects if o["kind"] == "MPIJob"]  # medtl-train, or medtl-train-PHASE
    launcher = obj["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]
    argv = expand(argv_of(launcher), launcher)
    assert argv[0] == "mpirun" and "-H" not in argv and "--hostfile" not in argv  # the operator's hostfile
    defined = {e["name"] for e in launcher.get("env", [])} | IMAGE_ENV
    exported = [argv[i + 1] for i, a in enumerate(argv[:argv.index("medtl")]) if a == "-x"]
    assert set(exported) <= defined, f"mpirun -x of variables the launcher does not have: {set(exported) - defined}"
    np_ = int(argv[argv.index("-np") + 1])
    return parse(argv[argv.index("medtl"):]), np_, obj["spec"], obj["spec"]["mpiReplicaSpecs"]["Worker"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingest_pods_cover_every_worker_index_and_finalize_matches(rendered, overlay):
    objects = rendered[overlay]
    job = by_name(objects, "Job", "medtl-ingest")["spec"]
    assert job["completionMode"] == "Indexed" and job["parallelism"] <= job["completions"]
    for index in range(job["completions"]):
        args, spec = job_command(objects, "medtl-ingest", index)
        assert args.command == "ingest" and args.worker_index == index and args.num_workers == job["completions"]
        for path in (args.images, args.labels):
            assert read_only(*mount_for(spec, path)), path
        assert not read_only(*mount_for(spec, args.out))
    final, _ = job_command(objects, "medtl-ingest-finalize")
    assert final.command == "ingest-finalize" and final.num_workers == job["completions"]
    same = {k: v for k, v in vars(args).items() if k not in ("command", "worker_index", "workers")}
    assert {k: v for k, v in vars(final).items() if k != "command"} == same


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_training_command_loads_its_config_and_fits_the_workers(rendered, overlay):
    objects = rendered[overlay]
    args, np_, spec, worker = mpi_train(objects)
    assert args.command == "train"
    assert np_ == worker["replicas"] * spec["slotsPerWorker"]
    gpus = worker["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
    assert gpus in (None, spec["slotsPerWorker"])  # one rank per GPU
    pod = worker["template"]["spec"]
    mount, volume = mount_for(pod, args.config)
    assert "configMap" in volume, "the job config must come from the medtl-jobs ConfigMap"
    data = by_name(objects, "ConfigMap", volume["configMap"]["name"])["data"]
    text = data[os.path.relpath(args.config, mount["mountPath"])]
    cfg = load_config(raw=yaml.safe_load(text), overrides=args.overrides)
    ingest, _ = job_command(objects, "medtl-ingest")
    assert cfg.data.records == ingest.out
    assert read_only(*mount_for(pod, cfg.data.records))
    assert not read_only(*mount_for(pod, args.workdir))
    if cfg.model.weights not in ("imagenet", "none"):
        assert read_only(*mount_for(pod, cfg.model.weights))
    assert spec["sshAuthMountPath"] == "/home/medtl/.ssh"


def test_the_overlays_run_the_jobs_they_say(rendered):
    configs = {o: mpi_train(rendered[o])[0].config for o in OVERLAYS}
    assert configs == {"cpu-smoke": "/etc/medtl/jobs/smoke.yaml", "gpu": "/etc/medtl/jobs/chestxray14_b4.yaml",
                       "chestxray14-b4": "/etc/medtl/jobs/chestxray14_b4.yaml",
                       **{o: "/etc/medtl/jobs/chestxray14_b4.yaml" for o in PHASED}}
    shapes = {o: (mpi_train(rendered[o])[1], mpi_train(rendered[o])[3]["replicas"]) for o in OVERLAYS}
    assert shapes == {"cpu-smoke": (2, 1), "gpu": (16, 2), "chestxray14-b4": (16, 2), **{o: (16, 2) for o in PHASED}}
    args = mpi_train(rendered["chestxray14-b4"])[0]
    assert "model.weights=/weights/efficientnetb4_notop.h5" in args.overrides  # offline: weights from a volume


def test_phased_overlays_chain_every_phase_of_the_job_in_one_run(rendered):
    """chestxray14-b4 as one MPIJob per phase: the phases in order, each the same training otherwise."""
    whole, _, whole_spec, _ = mpi_train(rendered["chestxray14-b4"])
    (text,) = {mounted_file(o, whole.config, rendered["chestxray14-b4"]) for o in rendered["chestxray14-b4"]
               if o["kind"] == "MPIJob"}
    phases = [p.name for p in load_config(raw=yaml.safe_load(text), overrides=whole.overrides).phases]
    assert [mpi_train(rendered[o])[0].until_phase for o in PHASED] == phases
    for overlay, phase in zip(PHASED, phases):
        args, _, spec, _ = mpi_train(rendered[overlay])
        (job,) = [o for o in rendered[overlay] if o["kind"] == "MPIJob"]
        assert job["metadata"]["name"] == f"medtl-train-{phase}"
        assert (args.config, args.workdir, args.overrides) == (whole.config, whole.workdir, whole.overrides)
        assert 0 < spec["runPolicy"]["activeDeadlineSeconds"] < whole_spec["runPolicy"]["activeDeadlineSeconds"]
        others = [o for o in rendered[overlay] if o["kind"] != "MPIJob"]
        assert others == [o for o in rendered["chestxray14-b4"] if o["kind"] != "MPIJob"]
    assert whole.until_phase is None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_evaluation_reports_into_the_training_run(rendered, overlay):
    objects = rendered[overlay]
    train, _, _, worker = mpi_train(objects)
    args, spec = job_command(objects, "medtl-evaluate")
    assert args.command == "evaluate" and args.workdir == train.workdir and args.split == "test"
    assert os.path.dirname(args.out) == args.workdir
    assert not read_only(*mount_for(spec, args.out))
    # The report pod reads that folder from the same claim, read-only (for kubectl cp).
    report = by_name(objects, "Pod", "medtl-report")["spec"]
    (report_mount, report_volume), (_, eval_volume) = mount_for(report, args.out), mount_for(spec, args.out)
    assert read_only(report_mount, report_volume) and report_volume["persistentVolumeClaim"]["claimName"] == \
        eval_volume["persistentVolumeClaim"]["claimName"]
    # The run's config.yaml names the records at the training workers' path: same claim, same mount.
    records = [(m["mountPath"], v["persistentVolumeClaim"]["claimName"]) for m, v in mounts(spec)
               if v.get("persistentVolumeClaim", {}).get("claimName") == "medtl-records"]
    assert records == [(m["mountPath"], v["persistentVolumeClaim"]["claimName"])
                       for m, v in mounts(worker["template"]["spec"])
                       if v.get("persistentVolumeClaim", {}).get("claimName") == "medtl-records"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_search_pods_share_one_study_from_a_secret(rendered, overlay):
    """The optional head search: parallel pods, the study's database URL from a Secret (never in the
    manifest or the command), configs and space from ConfigMaps, records read-only, outputs writable."""
    from medtl.search.space import defaults_from, load_space

    objects = rendered[overlay]
    job = by_name(objects, "Job", "medtl-search")
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "search"
    assert job["spec"]["parallelism"] >= 2 and job["spec"]["completions"] == job["spec"]["parallelism"]
    args, spec = job_command(objects, "medtl-search")
    assert args.command == "search" and args.storage is None  # read from the environment
    container = spec["containers"][0]
    (storage,) = [e for e in container["env"] if e["name"] == "MEDTL_SEARCH_STORAGE"]
    assert "value" not in storage and storage["valueFrom"]["secretKeyRef"] == {"name": "medtl-search-db", "key": "url"}
    mount, volume = mount_for(spec, args.config)
    cfg = load_config(raw=yaml.safe_load(by_name(objects, "ConfigMap", volume["configMap"]["name"])["data"][
        os.path.relpath(args.config, mount["mountPath"])]), overrides=args.overrides)
    mount, volume = mount_for(spec, args.space)
    text = by_name(objects, "ConfigMap", volume["configMap"]["name"])["data"][os.path.relpath(args.space, mount["mountPath"])]
    assert text == open(os.path.join(JOBS, "search", os.path.basename(args.space)), encoding="utf-8").read()
    space_file = os.path.join(JOBS, "search", os.path.basename(args.space))
    space = load_space(space_file, defaults_from(cfg.model.head, cfg.phases[0].learning_rate, cfg.train.loss.name))
    assert args.budget <= space.size / 4
    ingest, _ = job_command(objects, "medtl-ingest")
    assert cfg.data.records == ingest.out and read_only(*mount_for(spec, cfg.data.records))
    for path in (args.workdir, cfg.search.feature_cache):
        assert not read_only(*mount_for(spec, path)), path
        assert mount_for(spec, path)[1]["persistentVolumeClaim"]["claimName"] == "medtl-runs"  # shared by the pods
    if cfg.model.weights not in ("imagenet", "none"):
        assert read_only(*mount_for(spec, cfg.model.weights))


def test_smoke_ingest_reads_what_synth_writes(rendered):
    objects = rendered["cpu-smoke"]
    synth, _ = job_command(objects, "medtl-synth")
    ingest, _ = job_command(objects, "medtl-ingest")
    assert (ingest.images, ingest.labels) == (f"{synth.out}/images", f"{synth.out}/labels.csv")


# ----------------------------------------------------------------------------- the job configs


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_configmap_is_the_jobs_folder(rendered, overlay):
    files = {os.path.basename(p): open(p, encoding="utf-8").read() for p in glob.glob(os.path.join(JOBS, "*.yaml"))}
    assert by_name(rendered[overlay], "ConfigMap", "medtl-jobs")["data"] == files


# ----------------------------------------------------------------------------- the CLI


def test_render_help():
    result = run_cli("k8s", "render", "--help")
    assert result.returncode == 0 and "usage: medtl k8s render" in result.stdout and "--overlay" in result.stdout


def test_render_adds_checked_overrides_to_training_and_sets_the_image():
    result = run_cli("k8s", "render", "--overlay", "gpu", "--set", "train.batch_size=16",
                     "--image", "registry.local:5000/medtl:0.1.0")
    assert result.returncode == 0, result.stderr
    objects = list(yaml.safe_load_all(result.stdout))
    args = mpi_train(objects)[0]
    assert args.overrides[-1] == "train.batch_size=16"
    assert {c["image"] for o in objects for c in containers(o)} == {"registry.local:5000/medtl:0.1.0"}


@pytest.mark.parametrize("argv, fragments", [
    (["--overlay", "gpus"], ["unknown overlay 'gpus'", "chestxray14-b4, chestxray14-b4-phase-all, "
                             "chestxray14-b4-phase-head, chestxray14-b4-phase-top, cpu-smoke, gpu"]),
    (["--overlay", "gpu", "--set", "train.bath_size=16"], ["--set train.bath_size", "batch_size"]),
    (["--overlay", "cpu-smoke", "--set", "train.batch_size=many"], ["train.batch_size", "must be int"]),
    (["--overlay", "gpu", "--set", "phases.7.epochs=2"], ["phases.7", "3 entries"]),
    (["--overlay", "gpu", "--set", "batch_size"], ["expected KEY=VALUE"]),
    (["--overlay", "gpu", "--image", "Not An Image"], ["--image", "not an image reference"]),
])
def test_render_bad_input_is_one_clear_line(argv, fragments):
    assert_user_error(run_cli("k8s", "render", *argv), *fragments)


# ----------------------------------------------------------------------------- the walk-through


def k8s_page() -> str:
    """docs/kubernetes.md, the Kubernetes walk-through (the README links it)."""
    return open(os.path.join(REPO, "docs", "kubernetes.md"), encoding="utf-8").read()


def test_the_kubernetes_page_names_what_the_overlays_have(rendered):
    section = k8s_page()
    named = {name for name in re.findall(r"k8s/overlays/([\w-]+)", section) if not name.endswith("-")}  # -$phase
    assert named - {"NAME"} == set(OVERLAYS)
    components = {o["metadata"]["labels"]["app.kubernetes.io/component"] for objs in rendered.values() for o in objs}
    assert set(re.findall(r"app\.kubernetes\.io/component=(\w+)", section)) == components
    kinds = {"job": "Job", "mpijob": "MPIJob", "pod": "Pod"}
    existing = {(o["kind"], o["metadata"]["name"]) for objs in rendered.values() for o in objs}
    for kind, name in re.findall(r"\b(job|mpijob|pod)/([\w-]+)", section):
        if name.endswith("-"):  # mpijob/medtl-train-$phase: one per phased overlay
            assert all((kinds[kind], name + p) in existing for p in ("head", "top", "all"))
            continue
        if name.endswith("-launcher"):  # the launcher Job the operator creates for MPIJob NAME
            kind, name = "mpijob", name.removesuffix("-launcher")
        assert (kinds[kind], name) in existing, f"docs/kubernetes.md names {kind}/{name}, which no overlay has"
    reports = {job_command(rendered[o], "medtl-evaluate")[0].out for o in OVERLAYS}
    copies = [line for line in section.splitlines() if "kubectl cp medtl-report:" in line]
    assert set(re.findall(r"(/runs/[\w-]+/report)\b", "\n".join(copies))) == reports


def test_the_kubernetes_page_volume_example_validates():
    import textwrap

    blocks = re.findall(r"```yaml\n(.*?)```", k8s_page(), re.S)
    docs = [d for block in blocks for d in yaml.safe_load_all(textwrap.dedent(block)) if d]
    assert {(d["kind"], d["metadata"]["name"]) for d in docs} == {("PersistentVolume", "medtl-raw"),
                                                                  ("PersistentVolumeClaim", "medtl-raw")}
    for doc in docs:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
