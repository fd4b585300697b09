"""Static checks of what a user applies on Kubernetes: kuberay/*/*.yaml, docker/Dockerfile and .dockerignore.

1. strict schema validation: RayJob/RayService/RayCronJob (and their RayCluster parts) against the KubeRay
   v1.7.0 CRDs, unknown fields rejected as `kubeconform -strict` does; every core object (PVCs, Redis,
   PodDisruptionBudget, NetworkPolicies, the rollback Job, pod templates) against Kubernetes' own schemas;
2. KubeRay's own rules that a schema cannot express (the operator's validation.go), HA serving (replica
   placement, PDB, GCS fault tolerance) and the Pod Security Standard `restricted` for every pod;
3. consistency with the code: volume, model directory, Serve config, versions, image contents; the rollback
   Job's own command run against a real model folder;
4. `kubectl kustomize kuberay/<part>/` renders what a user applies, and only that part.

Run: KUBERAY_CRDS_DIR=../shared/kuberay/crds pytest tests/test_kuberay.py -q
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import importlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zoneinfo
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import kuberay_crds_dir, require
from tests.kuberay_manifests import (
    KUBERAY,
    MANIFESTS,
    MULTI_MANIFESTS,
    ROOT,
    cluster_spec,
    cpus,
    groups,
    job_env,
    load_manifests,
    load_yaml,
    ray_containers,
    ray_cpus,
    serve_config,
    volume_mounts,
)

DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SERVE_CONFIG = ROOT / "ray_app" / "serve_config.yaml"
PYPROJECT = ROOT / "pyproject.toml"
CONSTRAINTS = ROOT / "constraints.txt"
NOT_MANIFESTS = {"kustomization.yaml", "operator-values.yaml"}  # kustomize and Helm inputs
# What each kustomization renders, as (kind, name); serving and the schedule never create a RayJob.
KUSTOMIZATIONS = {
    "volume": {("PersistentVolumeClaim", "mnist-model")},
    "training": {("RayJob", "rayjob-mnist-train")},
    "serving": {
        ("PersistentVolumeClaim", "mnist-redis-data"),
        ("Deployment", "mnist-redis"),
        ("Service", "mnist-redis"),
        ("RayService", "rayservice-mnist"),
        ("PodDisruptionBudget", "mnist-serve-workers"),
        ("NetworkPolicy", "mnist-serving"),
        ("NetworkPolicy", "mnist-redis"),
    },
    "retrain": {("RayCronJob", "mnist-retrain")},
    "rollback": {("Job", "mnist-rollback")},
}
IMAGE_COMPONENT = KUBERAY / "image" / "kustomization.yaml"
CRD_FILES = {
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayCronJob": "ray.io_raycronjobs.yaml",
}
RAY_KINDS = ["RayJob", "RayService", "RayCronJob"]
# Oldest Kubernetes minor the manifests are meant for, and the newest schema kubernetes-validate ships.
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
SERVE_PORT = 8000
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
GO_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")
RESOURCE_START_PARAMS = {"num-cpus", "num-gpus", "memory", "resources"}
UID, GID = 1000, 100
# A node of the README's example cluster (GKE e2-standard-4: 3.92 CPUs and about 13 GiB allocatable), less
# what GKE's own DaemonSets request; every pod must fit one.
EXAMPLE_NODE = {"cpu": 3.4, "memory": 12 * 2**30}


# ---------------------------------------------------------------------------------------------- loading


def required_file(path: Path) -> str:
    """Text of a file another part of the project provides; fail with a clear message if it is missing."""
    if not path.is_file():
        pytest.fail(f"{path.relative_to(ROOT)} does not exist yet; this check needs it")
    return path.read_text()


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    """Every manifest in kuberay/ (see load_manifests)."""
    return load_manifests()


def test_every_manifest_is_checked() -> None:
    """Each YAML file under kuberay/ is a kustomize/Helm input or a manifest these tests load."""
    files = {p for p in KUBERAY.rglob("*.yaml") if p.name not in NOT_MANIFESTS}
    assert files == set(MANIFESTS.values()) | set(MULTI_MANIFESTS)


@pytest.fixture(scope="module")
def rayjob(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """kuberay/ray-job.mnist-train.yaml."""
    return manifests["RayJob"]


@pytest.fixture(scope="module")
def rayservice(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """kuberay/ray-service.mnist.yaml."""
    return manifests["RayService"]


def test_every_manifest_says_how_to_apply_it() -> None:
    """The comment header of each manifest names the command that applies it (kubectl, always with -k or a
    filled-in placeholder piped to kubectl, since only kustomize sets the image)."""
    for path in [*MANIFESTS.values(), *MULTI_MANIFESTS]:
        header = path.read_text().split("apiVersion:", 1)[0]
        commands = [
            line for line in header.splitlines() if re.search(r"kubectl (apply|create|kustomize) ", line)
        ]
        assert any(f"kuberay/{path.parent.name}/" in line for line in commands), path


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity (``500m``, ``2``, ``4Gi``, ``256Mi``) as a number."""
    text = str(value)
    for suffix, factor in (("Ki", 2**10), ("Mi", 2**20), ("Gi", 2**30), ("Ti", 2**40), ("m", 1e-3)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def pod_specs(manifests: dict[str, dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, pod spec) of every pod the manifests create: Ray pods, the submitter, Redis, the rollback Job."""
    for kind in RAY_KINDS:
        for name, group in groups(manifests[kind]):
            yield f"{kind}/{name}", group["template"]["spec"]
    yield "RayJob/submitter", manifests["RayJob"]["spec"]["submitterPodTemplate"]["spec"]
    yield (
        "RayCronJob/submitter",
        manifests["RayCronJob"]["spec"]["jobTemplate"]["submitterPodTemplate"]["spec"],
    )
    yield "Deployment/mnist-redis", manifests["Deployment/mnist-redis"]["spec"]["template"]["spec"]
    yield "Job/mnist-rollback", manifests["Job"]["spec"]["template"]["spec"]


def ray_pin() -> str:
    """The Ray version pinned in pyproject.toml."""
    deps = tomllib.loads(required_file(PYPROJECT))["project"]["dependencies"]
    (ray,) = [Requirement(d) for d in deps if canonicalize_name(Requirement(d).name) == "ray"]
    (spec,) = ray.specifier
    assert spec.operator == "==", f"ray must be pinned exactly in pyproject.toml, got {ray}"
    return spec.version


# ------------------------------------------------------------------------------- 1. strict schemas

# ObjectMeta as written in a manifest: the CRDs leave the top-level metadata open (the API server checks it).
OBJECT_META = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "required": ["name"],
    "additionalProperties": False,
}


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """An OpenAPI v3 (Kubernetes structural) schema as JSON Schema that rejects unknown fields.

    Every object with ``properties`` and no ``additionalProperties`` gets ``additionalProperties: false``
    unless it is ``x-kubernetes-preserve-unknown-fields``; an embedded resource keeps apiVersion, kind and
    metadata; ``nullable`` and ``x-kubernetes-int-or-string`` become plain JSON Schema.
    """
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: strict(sub) for name, sub in out["properties"].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = strict(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [strict(sub) for sub in out[key]]
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("x-kubernetes-embedded-resource"):
        properties = out.setdefault("properties", {})
        for field in ("apiVersion", "kind"):
            properties.setdefault(field, {"type": "string"})
        properties.setdefault("metadata", {"type": "object"})
    open_object = "additionalProperties" in out or out.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and not open_object:
        out["additionalProperties"] = False
    return out


def _unchecked_cel(validator: Any, rules: list[dict[str, str]], instance: Any, schema: Any) -> Iterator[Any]:
    """A field guarded by CEL rules (x-kubernetes-validations) is an error: they are not evaluated offline."""
    messages = "; ".join(rule.get("message", rule["rule"]) for rule in rules)
    yield jsonschema.ValidationError(f"field has CEL rules this offline check does not evaluate: {messages}")


StrictValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"x-kubernetes-validations": _unchecked_cel}
)


@functools.cache
def crd_root_schema(kind: str) -> dict[str, Any]:
    """``openAPIV3Schema`` of the served, non-deprecated ``v1`` of the KubeRay CRD for ``kind``."""
    crds_dir = kuberay_crds_dir()  # KUBERAY_CRDS_DIR, else KubeRay's release (pinned, cached) or a skip
    path = crds_dir / CRD_FILES[kind]
    assert path.is_file(), f"KUBERAY_CRDS_DIR={crds_dir} has no {CRD_FILES[kind]}"
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(path.read_text(), Loader=loader)
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert version["served"] and not version.get("deprecated"), "ray.io/v1 must be served and not deprecated"
    return version["schema"]["openAPIV3Schema"]


@functools.cache
def crd_validator(kind: str, part: str = "") -> Any:
    """Strict validator for a whole object of ``kind`` (metadata and spec only), or for one top-level part."""
    root = crd_root_schema(kind)
    if part:
        return StrictValidator(strict(root["properties"][part]))
    schema = strict({**root, "properties": {k: v for k, v in root["properties"].items() if k != "status"}})
    schema["properties"]["metadata"] = OBJECT_META
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    schema["properties"]["apiVersion"] = {"const": "ray.io/v1"}
    schema["properties"]["kind"] = {"const": kind}
    return StrictValidator(schema)


def schema_errors(validator: Any, instance: dict[str, Any]) -> list[str]:
    """Every violation, as ``path: message``."""
    return [
        "/".join(map(str, e.absolute_path)) + ": " + e.message
        for e in sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))
    ]


def core_objects(manifests: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Core Kubernetes objects in the manifests, including those embedded in the Ray resources."""
    svc = manifests["RayService"]["spec"]["serveService"]
    objects = [(key, doc) for key, doc in manifests.items() if doc["kind"] not in CRD_FILES]
    objects.append(
        (
            "serveService",
            {"apiVersion": "v1", "kind": "Service", **svc, "metadata": {"name": "x", **svc["metadata"]}},
        )
    )
    pod_template = {"apiVersion": "v1", "kind": "PodTemplate"}
    for kind in RAY_KINDS:
        for name, group in groups(manifests[kind]):
            objects.append(
                (
                    f"{kind}/{name}",
                    {**pod_template, "metadata": {"name": name}, "template": group["template"]},
                )
            )
    for kind, spec in (
        ("RayJob", manifests["RayJob"]["spec"]),
        ("RayCronJob", manifests["RayCronJob"]["spec"]["jobTemplate"]),
    ):
        template = spec["submitterPodTemplate"]
        objects.append(
            (f"{kind}/submitter", {**pod_template, "metadata": {"name": "submitter"}, "template": template})
        )
    return objects


@pytest.mark.parametrize("kind", RAY_KINDS)
def test_ray_resource_matches_crd_strictly(manifests: dict[str, dict[str, Any]], kind: str) -> None:
    """The whole object, pod templates and serveService included, against the v1.7.0 CRD; no unknown field."""
    assert schema_errors(crd_validator(kind), manifests[kind]) == []


@pytest.mark.parametrize("kind", RAY_KINDS)
def test_embedded_cluster_matches_raycluster_crd(manifests: dict[str, dict[str, Any]], kind: str) -> None:
    """The embedded cluster is also a valid RayCluster spec (what the operator creates from it)."""
    assert schema_errors(crd_validator("RayCluster", "spec"), cluster_spec(manifests[kind])) == []


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_objects_match_kubernetes_schema(manifests: dict[str, dict[str, Any]], version: str) -> None:
    """PVCs, Redis, PDB, NetworkPolicies, Secret, the rollback Job, the serve Service and every pod template
    (submitters included) against Kubernetes' schemas, strictly."""
    errors = []
    for name, obj in core_objects(manifests):
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{name}: {'/'.join(map(str, e.path))}: {e.message}")
    assert errors == []


def rename(path: list[str | int], new: str) -> Callable[[dict[str, Any]], None]:
    """A mutation that renames the key at ``path`` (a typo in a field name)."""

    def mutate(doc: dict[str, Any]) -> None:
        parent = functools.reduce(lambda node, key: node[key], path[:-1], doc)
        parent[new] = parent.pop(path[-1])

    return mutate


def put(path: list[str | int], value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation that sets the value at ``path``."""

    def mutate(doc: dict[str, Any]) -> None:
        functools.reduce(lambda node, key: node[key], path[:-1], doc)[path[-1]] = value

    return mutate


HEAD = ["headGroupSpec", "template", "spec"]
MUTATIONS = {
    "RayJob spec field": ("RayJob", rename(["spec", "shutdownAfterJobFinishes"], "shutdownAfterJobFinish")),
    "RayJob metadata": ("RayJob", rename(["metadata", "name"], "nmae")),
    "RayJob status": ("RayJob", put(["status"], {"jobStatus": "SUCCEEDED"})),
    "worker group field": (
        "RayJob",
        rename(["spec", "rayClusterSpec", "workerGroupSpecs", 0, "minReplicas"], "minReplica"),
    ),
    "container field": (
        "RayJob",
        rename(["spec", "rayClusterSpec", *HEAD, "containers", 0, "volumeMounts"], "volumeMount"),
    ),
    "unquoted rayStartParams": (
        "RayJob",
        put(["spec", "rayClusterSpec", "headGroupSpec", "rayStartParams", "num-cpus"], 0),
    ),
    "RayService spec field": ("RayService", rename(["spec", "serveConfigV2"], "serveConfig")),
    "serveService port field": (
        "RayService",
        rename(["spec", "serveService", "spec", "ports", 0, "targetPort"], "targetport"),
    ),
    "pod securityContext": (
        "RayService",
        rename(["spec", "rayClusterConfig", *HEAD, "securityContext", "fsGroup"], "fsgroup"),
    ),
    "wrong type": ("RayService", put(["spec", "rayClusterConfig", "workerGroupSpecs", 0, "replicas"], "1")),
    "PVC field": ("PersistentVolumeClaim", rename(["spec", "accessModes"], "accessMode")),
    "NetworkPolicy field": ("NetworkPolicy/mnist-serving", rename(["spec", "podSelector"], "podSelecter")),
    "RayService HA field": (
        "RayService",
        rename(["spec", "excludeHeadPodFromServeSvc"], "excludeHeadPodFromServeSVC"),
    ),
    "GCS FT field": (
        "RayService",
        rename(["spec", "rayClusterConfig", "gcsFaultToleranceOptions", "redisAddress"], "redisAddr"),
    ),
    "submitter pod field": (
        "RayJob",
        rename(["spec", "submitterPodTemplate", "spec", "restartPolicy"], "restart"),
    ),
    "RayCronJob field": ("RayCronJob", rename(["spec", "schedule"], "cron")),
    "RayCronJob jobTemplate field": (
        "RayCronJob",
        rename(["spec", "jobTemplate", "entrypoint"], "entryPoint"),
    ),
    "PDB field": ("PodDisruptionBudget", rename(["spec", "minAvailable"], "minAvailible")),
    "PDB wrong type": ("PodDisruptionBudget", put(["spec", "unhealthyPodEvictionPolicy"], 1)),
    "Redis Deployment field": (
        "Deployment/mnist-redis",
        rename(["spec", "template", "spec", "containers"], "container"),
    ),
    "Redis Service field": ("Service/mnist-redis", rename(["spec", "ports", 0, "targetPort"], "target")),
    "Secret field": ("Secret", rename(["stringData"], "stringdata")),
    "rollback Job field": ("Job", rename(["spec", "template", "spec", "restartPolicy"], "restartpolicy")),
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_typo_is_rejected(manifests: dict[str, dict[str, Any]], mutation: str) -> None:
    """The validation above is not vacuous: a misspelled field or a wrong type anywhere fails it."""
    key, mutate = MUTATIONS[mutation]
    doc = copy.deepcopy(manifests[key])
    mutate(doc)
    kind = doc["kind"]
    if kind in CRD_FILES:
        assert schema_errors(crd_validator(kind), doc) != []
    else:
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


# -------------------------------------------------------------------------------- 2. KubeRay rules


@pytest.mark.parametrize("kind", ["RayJob", "RayService"])
def test_names_fit_kuberay_limits(manifests: dict[str, dict[str, Any]], kind: str) -> None:
    """RayJob/RayService names: DNS-1035, ≤ 47 characters (KubeRay appends -xxxxx and -serve-svc)."""
    doc = manifests[kind]
    name = doc["metadata"]["name"]
    assert len(name) <= 47 and DNS_1035.match(name), name
    group_names = [g["groupName"] for g in cluster_spec(doc)["workerGroupSpecs"]]
    assert len(set(group_names)) == len(group_names)
    assert all(DNS_1123_LABEL.match(g) for g in group_names), group_names


def test_ttl_only_with_shutdown(rayjob: dict[str, Any]) -> None:
    """TTL (and suspend) need shutdownAfterJobFinishes; deletionRules exclude it. Both are set here."""
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert "deletionStrategy" not in spec and not spec.get("suspend", False)


def test_rayjob_deadlines_and_no_whole_cluster_retry(rayjob: dict[str, Any]) -> None:
    """Deadlines that fail a stuck job; no RayJob-level retry (it would rerun a failed gate on a new cluster
    and delete the first attempt's logs); K8sJobMode with a submitter pod of our own."""
    spec = rayjob["spec"]
    assert spec["activeDeadlineSeconds"] > 0
    assert 1 <= spec["preRunningDeadlineSeconds"] < spec["activeDeadlineSeconds"]
    assert spec["backoffLimit"] == 0
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode" and "clusterSelector" not in spec
    assert int(job_env(rayjob)["MAX_FAILURES"]) > 0  # lost workers are restarted by Ray Train instead


def test_submitter_pod_like_the_ray_pods(rayjob: dict[str, Any]) -> None:
    """submitterPodTemplate replaces KubeRay's default wholesale: the head's image, Never restarts, resources,
    and the Ray pods' securityContext (the default submitter has none)."""
    pod = rayjob["spec"]["submitterPodTemplate"]["spec"]
    head = cluster_spec(rayjob)["headGroupSpec"]["template"]["spec"]
    submitter = pod["containers"][0]
    assert pod["restartPolicy"] == "Never"
    assert submitter["image"] == head["containers"][0]["image"]
    assert "command" not in submitter and "args" not in submitter  # the operator fills them in
    assert {"cpu", "memory"} <= submitter["resources"]["limits"].keys()
    assert {"cpu", "memory"} <= submitter["resources"]["requests"].keys()
    assert submitter["securityContext"] == head["containers"][0]["securityContext"]
    shared = {k: v for k, v in head["securityContext"].items() if not k.startswith("fsGroup")}
    assert pod["securityContext"] == shared


def test_retrain_schedule_runs_the_training_job(manifests: dict[str, dict[str, Any]]) -> None:
    """The RayCronJob: the training RayJob's spec verbatim, shipped suspended, a valid schedule and zone,
    a name the operator accepts (≤ 36 characters, it appends the run's minute)."""
    cron = manifests["RayCronJob"]
    spec = cron["spec"]
    assert spec["jobTemplate"] == manifests["RayJob"]["spec"]
    assert spec["suspend"] is True
    name = cron["metadata"]["name"]
    assert len(name) <= 36 and DNS_1035.match(name), name
    fields = spec["schedule"].split()
    assert len(fields) == 5 and not spec["schedule"].startswith(("TZ=", "CRON_TZ=")), spec["schedule"]
    assert all(re.fullmatch(r"[0-9*/,-]+", f) for f in fields), spec["schedule"]
    assert spec["timeZone"] in zoneinfo.available_timezones()
    # Each run ends within its deadline, well before the next tick (the operator has no concurrency policy).
    assert fields[2:] == ["*", "*", fields[4]] and fields[4] != "*", "expected a weekly schedule"
    assert spec["jobTemplate"]["activeDeadlineSeconds"] < 24 * 3600


def test_retrain_switch_on_command(manifests: dict[str, dict[str, Any]]) -> None:
    """The documented `sed "s/suspend: true/suspend: false/"` touches exactly the RayCronJob's own field."""
    text = MANIFESTS["RayCronJob"].read_text()
    assert 'sed "s/suspend: true/suspend: false/"' in text
    body = text[text.index("apiVersion:") :]
    assert body.count("suspend: true") == 1
    switched = yaml.safe_load(body.replace("suspend: true", "suspend: false"))
    assert switched["spec"]["suspend"] is False
    assert {**switched["spec"], "suspend": True} == manifests["RayCronJob"]["spec"]


@pytest.mark.parametrize("kind", ["RayJob", "RayService"])
def test_replica_bounds(manifests: dict[str, dict[str, Any]], kind: str) -> None:
    """Every worker group sets minReplicas ≤ replicas ≤ maxReplicas explicitly (no server-side defaults)."""
    for group in cluster_spec(manifests[kind])["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]


@pytest.mark.parametrize("kind", ["RayJob", "RayService"])
def test_ray_container_first(manifests: dict[str, dict[str, Any]], kind: str) -> None:
    """Container 0 of every pod is the Ray container: ray-head/ray-worker, running the project's image."""
    for name, container in ray_containers(manifests[kind]):
        assert container["name"] == ("ray-head" if name == "head" else "ray-worker")
        assert container["image"].split(":")[0] == kustomize_image()["name"]


@pytest.mark.parametrize("kind", ["RayJob", "RayService"])
def test_ray_start_params(manifests: dict[str, dict[str, Any]], kind: str) -> None:
    """Quoted string values; the head takes no Ray CPUs; resources not also in the group's `resources`."""
    for name, group in groups(manifests[kind]):
        params = group["rayStartParams"]
        assert all(isinstance(v, str) for v in params.values()), (name, params)
        assert "labels" not in params
        assert not (RESOURCE_START_PARAMS & params.keys() and group.get("resources")), name
    assert cluster_spec(manifests[kind])["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


@pytest.mark.parametrize("kind", ["RayJob", "RayService"])
def test_resources_requests_equal_limits(manifests: dict[str, dict[str, Any]], kind: str) -> None:
    """Ray sizes itself from limits; requests = limits (whole CPUs) keeps Kubernetes and Ray in agreement."""
    for name, container in ray_containers(manifests[kind]):
        resources = container["resources"]
        assert resources["requests"] == resources["limits"], name
        assert set(resources["limits"]) == {"cpu", "memory"}, name
        assert str(resources["limits"]["cpu"]).isdigit(), name


def test_ray_versions_agree(manifests: dict[str, dict[str, Any]]) -> None:
    """rayVersion = the image tag's Ray version = installed ray = the pyproject.toml pin = the base image."""
    import ray

    pinned = ray_pin()
    assert ray.__version__ == pinned
    for kind in ("RayJob", "RayService"):
        assert cluster_spec(manifests[kind])["rayVersion"] == pinned
        for _, container in ray_containers(manifests[kind]):
            tag = container["image"].rpartition(":")[2]
            assert tag == pinned or tag.startswith(f"{pinned}-"), container["image"]
    assert kustomize_image()["newTag"] == pinned or kustomize_image()["newTag"].startswith(f"{pinned}-")
    assert dockerfile_base().startswith(f"rayproject/ray:{pinned}-")


@pytest.mark.parametrize("kind", ["RayJob", "RayService"])
def test_ports_named_as_kuberay_expects(manifests: dict[str, dict[str, Any]], kind: str) -> None:
    """Heads name gcs-server/dashboard/client (+ serve for RayService); serving workers name serve too."""
    expected = {"gcs-server": 6379, "dashboard": 8265, "client": 10001}
    if kind == "RayService":
        expected["serve"] = SERVE_PORT
    for name, container in ray_containers(manifests[kind]):
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        if name == "head":
            assert ports == expected
        else:
            assert ports == ({"serve": SERVE_PORT} if kind == "RayService" else {})


def test_rayservice_rules(rayservice: dict[str, Any]) -> None:
    """Upgrade strategy, initializing timeout, head service and autoscaler as validation.go wants them."""
    spec = rayservice["spec"]
    assert spec["upgradeStrategy"]["type"] in {"NewCluster", "None"}  # incremental needs a Gateway controller
    timeout = rayservice["metadata"]["annotations"]["ray.io/initializing-timeout"]
    assert GO_DURATION.match(timeout) or (timeout.isdigit() and int(timeout) > 0), timeout
    cluster = spec["rayClusterConfig"]
    assert "name" not in cluster["headGroupSpec"].get("headService", {}).get("metadata", {})
    if cluster.get("enableInTreeAutoscaling"):
        for name, group in groups(rayservice):
            assert group["template"]["spec"].get("restartPolicy", "Never") == "Never", name
            env = {e["name"] for e in group["template"]["spec"]["containers"][0].get("env", [])}
            assert "RAY_enable_autoscaler_v2" not in env, name


@pytest.mark.parametrize("kind", ["RayJob", "RayService"])
def test_token_auth(manifests: dict[str, dict[str, Any]], kind: str) -> None:
    """Ray token auth managed by the operator (Ray ≥ 2.52; no K8s token auth for these kinds)."""
    spec = cluster_spec(manifests[kind])
    assert spec["authOptions"] == {"mode": "token"}
    assert tuple(map(int, spec["rayVersion"].split("."))) >= (2, 52, 0)


def test_dashboard_and_gcs_never_on_the_load_balancer(rayservice: dict[str, Any]) -> None:
    """Only Serve's port is public: serveService is the LoadBalancer, port 80 → 8000 named `serve`."""
    spec = rayservice["spec"]
    service = spec["serveService"]["spec"]
    assert service["type"] == "LoadBalancer"
    assert service["ports"] == [{"name": "serve", "port": 80, "targetPort": SERVE_PORT}]
    assert "selector" not in service  # the operator sets it
    head = spec["rayClusterConfig"]["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
    assert serve_config(rayservice).get("http_options", {}).get("port", SERVE_PORT) == SERVE_PORT


@pytest.mark.parametrize("kind", ["RayJob", "RayService"])
def test_pods_run_as_non_root(manifests: dict[str, dict[str, Any]], kind: str) -> None:
    """uid 1000/gid 100 like the image's `ray` user; fsGroup 100 so it can write the volume; no escalation."""
    for name, group in groups(manifests[kind]):
        context = group["template"]["spec"]["securityContext"]
        assert (context["runAsUser"], context["runAsGroup"], context["fsGroup"]) == (UID, GID, GID), name


def test_every_pod_meets_the_restricted_pod_security_standard(manifests: dict[str, dict[str, Any]]) -> None:
    """Ray pods, submitters, Redis and the rollback Job pass a namespace enforcing `restricted`: non-root,
    RuntimeDefault seccomp, no privilege escalation, every capability dropped, no host namespaces/paths."""
    names = []
    for name, pod in pod_specs(manifests):
        names.append(name)
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True and context.get("runAsUser", 1) != 0, name
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert not {"hostNetwork", "hostPID", "hostIPC"} & pod.keys(), name
        assert not [v for v in pod.get("volumes", []) if "hostPath" in v], name
        for container in pod["containers"] + pod.get("initContainers", []):
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["capabilities"] == {"drop": ["ALL"]}, name
            assert not security.get("privileged") and "runAsUser" not in security, name
    assert len(names) >= 9


def test_every_pod_fits_a_node_of_the_example_cluster(manifests: dict[str, dict[str, Any]]) -> None:
    """Requests and limits of every container set, and each pod's requests fit one e2-standard-4 node."""
    for name, pod in pod_specs(manifests):
        requested = {"cpu": 0.0, "memory": 0.0}
        for container in pod["containers"]:
            resources = container["resources"]
            assert {"cpu", "memory"} <= resources["requests"].keys() <= resources["limits"].keys(), name
            for key in requested:
                requested[key] += quantity(resources["requests"][key])
                assert quantity(resources["requests"][key]) <= quantity(resources["limits"][key]), name
        assert all(requested[key] <= EXAMPLE_NODE[key] for key in requested), (name, requested)


# ------------------------------------------------------------------------------------- HA serving


def serve_worker_group(rayservice: dict[str, Any]) -> dict[str, Any]:
    """The RayService's one worker group (where the replicas run)."""
    (group,) = cluster_spec(rayservice)["workerGroupSpecs"]
    return group


def place_replicas(pod_cpus: list[float], replicas: list[float]) -> list[list[int]]:
    """Where Ray can put each replica: every pod (index) with room for it after the earlier ones were placed
    anywhere. Returns, per replica, the pods it may land on; a replica with no room gets []. Placement is
    first-fit here, but the check below makes the answer independent of Ray's strategy: a pod whose free CPUs
    never hold two replicas can host at most one, whichever pods Ray prefers."""
    free = list(pod_cpus)
    options = []
    for need in replicas:
        fits = [i for i, cpus_left in enumerate(free) if cpus_left + 1e-9 >= need]
        options.append(fits)
        if fits:
            free[fits[0]] -= need
    return options


def test_replicas_land_on_distinct_serve_pods(rayservice: dict[str, Any]) -> None:
    """With the manifest's sizes every serve pod holds at most one replica (its Ray CPUs < two replicas'),
    the head none (num-cpus 0), and the pods that exist from the start (minReplicas) hold all replicas: the
    two replicas are on two pods, whatever placement Ray chooses. The Serve config itself stays the one
    `serve run` uses on a single node (no per-node placement keys)."""
    cluster = cluster_spec(rayservice)
    group = serve_worker_group(rayservice)
    head_cpus = ray_cpus(cluster["headGroupSpec"])
    worker_cpus = ray_cpus(group)
    config = serve_config(rayservice)
    replicas = []
    for app in config["applications"]:
        for deployment in app["deployments"]:
            per_replica = deployment.get("ray_actor_options", {}).get("num_cpus", 1)
            assert "autoscaling_config" not in deployment and "max_replicas_per_node" not in deployment
            replicas += [per_replica] * deployment["num_replicas"]
            assert head_cpus < per_replica, "a replica fits the head"
            assert per_replica <= worker_cpus < 2 * per_replica, "a serve pod fits zero or two replicas"
    assert len(replicas) >= 2, "one replica cannot survive losing its pod"
    pods = [head_cpus] + [worker_cpus] * group["minReplicas"]
    options = place_replicas(pods, replicas)
    assert all(options), f"replicas without room on the {group['minReplicas']} serve pods: {options}"
    chosen = [fits[0] for fits in options]
    assert 0 not in chosen and len(set(chosen)) == len(chosen), chosen


def test_placement_check_is_not_vacuous() -> None:
    """The same check sees two replicas on one pod when the pod advertises two CPUs (the old sizes)."""
    options = place_replicas([0, 2, 2], [1, 1])
    assert [fits[0] for fits in options] == [1, 1]


def test_serve_workers_spread_over_nodes_and_guarded_by_the_pdb(manifests: dict[str, dict[str, Any]]) -> None:
    """Serve workers of one cluster on different nodes; the PDB selects exactly them with an integer
    minAvailable (Ray pods have no scale subresource) and lets NotReady replica-less workers go."""
    group = serve_worker_group(manifests["RayService"])
    labels = group["template"]["metadata"]["labels"]
    (spread,) = group["template"]["spec"]["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname" and spread["maxSkew"] == 1
    assert spread["whenUnsatisfiable"] == "DoNotSchedule"
    assert spread["labelSelector"]["matchLabels"].items() <= labels.items()
    assert spread["matchLabelKeys"] == ["ray.io/cluster"]
    pdb = manifests["PodDisruptionBudget"]["spec"]
    selector = pdb["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    head_labels = cluster_spec(manifests["RayService"])["headGroupSpec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= head_labels.items()
    assert not any(
        selector.items() <= g["template"]["metadata"]["labels"].items()
        for _, g in groups(manifests["RayJob"])
    )
    assert "ray.io/cluster" not in selector  # changes with every cluster the RayService creates
    assert isinstance(pdb["minAvailable"], int) and "maxUnavailable" not in pdb
    assert 1 <= pdb["minAvailable"] < group["minReplicas"]
    assert pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_head_is_no_serve_endpoint(rayservice: dict[str, Any]) -> None:
    assert rayservice["spec"]["excludeHeadPodFromServeSvc"] is True


def test_gcs_fault_tolerance_uses_the_shipped_redis(manifests: dict[str, dict[str, Any]]) -> None:
    """gcsFaultToleranceOptions points at the Redis Service and password Secret in kuberay/serving/; the
    variables the operator injects are not set by hand (validation.go rejects that); the storage namespace
    is left to the operator (a fixed one would be shared by the two clusters of an upgrade)."""
    cluster = cluster_spec(manifests["RayService"])
    options = cluster["gcsFaultToleranceOptions"]
    service, deployment = manifests["Service/mnist-redis"], manifests["Deployment/mnist-redis"]
    host, port = options["redisAddress"].rsplit(":", 1)
    assert host == service["metadata"]["name"] and int(port) == service["spec"]["ports"][0]["port"]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    secret = manifests["Secret"]
    ref = options["redisPassword"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    (redis,) = deployment["spec"]["template"]["spec"]["containers"]
    assert {e["name"]: e["valueFrom"]["secretKeyRef"] for e in redis["env"]}["REDIS_PASSWORD"] == ref
    assert "$(REDIS_PASSWORD)" in redis["args"] and "--requirepass" in redis["args"]
    assert "backend" not in options and "externalStorageNamespace" not in options
    assert "ray.io/ft-enabled" not in manifests["RayService"]["metadata"].get("annotations", {})
    for name, container in ray_containers(manifests["RayService"]):
        env = {e["name"] for e in container.get("env", [])}
        assert not env & {"RAY_REDIS_ADDRESS", "REDIS_PASSWORD", "RAY_external_storage_namespace"}, name
        assert "redis-password" not in cluster["headGroupSpec"]["rayStartParams"]


def test_redis_is_pinned_and_keeps_its_data(manifests: dict[str, dict[str, Any]]) -> None:
    """A pinned image, append-only file on its own claim, one pod at a time (Recreate, RWO)."""
    deployment = manifests["Deployment/mnist-redis"]["spec"]
    (redis,) = deployment["template"]["spec"]["containers"]
    name, _, tag = redis["image"].partition(":")
    assert name == "redis" and re.fullmatch(r"\d+\.\d+\.\d+", tag), redis["image"]
    assert deployment["replicas"] == 1 and deployment["strategy"]["type"] == "Recreate"
    args = redis["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    data_dir = args[args.index("--dir") + 1]
    (mount,) = redis["volumeMounts"]
    assert mount["mountPath"] == data_dir
    (volume,) = deployment["template"]["spec"]["volumes"]
    claim = manifests["PersistentVolumeClaim/mnist-redis-data"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_redis_password_secret_is_created_once_with_a_random_password() -> None:
    """The Secret is not in any kustomization (re-applying never rotates it); its header's command replaces
    the placeholder, which occurs once."""
    text = MANIFESTS["Secret"].read_text()
    (placeholder,) = set(re.findall(r"REPLACE_WITH_[A-Z_]+", text))
    command = next(line for line in text.splitlines() if "kubectl create -f -" in line)
    assert f'sed "s/{placeholder}/$(openssl rand -hex 24)/" kuberay/serving/redis-secret.yaml' in command
    assert text[text.index("apiVersion:") :].count(placeholder) == 1
    for path in KUBERAY.glob("*/kustomization.yaml"):
        assert MANIFESTS["Secret"].name not in load_yaml(path).get("resources", []), path


# ------------------------------------------------------------------------------------ 3. consistency


def module_constant(path: Path, name: str) -> Any:
    """The literal value of a module-level constant, read without importing the module (and torch)."""
    for node in ast.parse(required_file(path)).body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets if isinstance(t, ast.Name)] == [name]:
            return ast.literal_eval(node.value)
    pytest.fail(f"{path.relative_to(ROOT)} has no constant {name}")


def model_dir() -> str:
    """The model directory the code reads by default (ray_app.model.DEFAULT_MODEL_DIR)."""
    return module_constant(ROOT / "ray_app" / "model.py", "DEFAULT_MODEL_DIR")


def test_model_volume(manifests: dict[str, dict[str, Any]]) -> None:
    """One RWX claim at the code's model directory on every pod: read-write to train, read-only to serve."""
    pvc = manifests["PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    claim, path = pvc["metadata"]["name"], model_dir()
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for kind in ("RayJob", "RayService")
        for _, g in groups(manifests[kind])
        for v in g["template"]["spec"].get("volumes", [])
        if "persistentVolumeClaim" in v
    }
    assert claims == {claim}
    for _, volume, mount in volume_mounts(manifests["RayJob"], claim):
        assert (
            mount["mountPath"] == path
            and not mount.get("readOnly")
            and not volume["persistentVolumeClaim"].get("readOnly")
        )
    for _, volume, mount in volume_mounts(manifests["RayService"], claim):
        assert (
            mount["mountPath"] == path
            and mount["readOnly"] is True
            and volume["persistentVolumeClaim"]["readOnly"] is True
        )


def test_job_environment(rayjob: dict[str, Any]) -> None:
    """The job's env points the CLI at the volume; MNIST is kept on it; values are strings."""
    env = job_env(rayjob)
    assert all(isinstance(v, str) for v in env.values()), env
    assert env["MODEL_DIR"] == model_dir()
    assert Path(env["MNIST_DATA_DIR"]).is_relative_to(model_dir())
    assert {"NUM_WORKERS", "CPUS_PER_WORKER", "EPOCHS", "TRAIN_LIMIT"} <= env.keys()
    assert rayjob["spec"]["entrypoint"].split()[:3] == ["python", "-m", "ray_app.train"]


def test_train_cli_reads_job_environment(rayjob: dict[str, Any]) -> None:
    """The entrypoint module has a main() and reads every env var the RayJob sets (as string literals)."""
    path = ROOT / Path(*rayjob["spec"]["entrypoint"].split()[2].split(".")).with_suffix(".py")
    tree = ast.parse(required_file(path))
    assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)
    names = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert sorted(set(job_env(rayjob)) - names) == []


def test_job_fits_worker_group(rayjob: dict[str, Any]) -> None:
    """NUM_WORKERS × CPUS_PER_WORKER fits the fixed worker group, one training worker per pod at least."""
    env = job_env(rayjob)
    workers, per_worker = int(env["NUM_WORKERS"]), int(env["CPUS_PER_WORKER"])
    (group,) = cluster_spec(rayjob)["workerGroupSpecs"]
    pod_cpus = cpus(group["template"]["spec"]["containers"][0])
    assert per_worker <= pod_cpus
    assert workers <= group["replicas"] * (pod_cpus // per_worker)


def test_serving_environment(rayservice: dict[str, Any]) -> None:
    """Every Ray container of the RayService sets MODEL_DIR to the mount path and the HAProxy ingress on, as make does."""
    makefile = required_file(ROOT / "Makefile")
    assert "export RAY_SERVE_ENABLE_HA_PROXY" in makefile
    for name, container in ray_containers(rayservice):
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env.get("MODEL_DIR") == model_dir(), name
        assert env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1", name


def test_serve_config_embedded_verbatim(rayservice: dict[str, Any]) -> None:
    """serveConfigV2 is ray_app/serve_config.yaml byte for byte (one Serve config for laptop and cluster)."""
    assert rayservice["spec"]["serveConfigV2"] == required_file(SERVE_CONFIG)


def test_serve_config_imports(rayservice: dict[str, Any]) -> None:
    """serveConfigV2 is a valid Serve config; import_path is an application with those deployments."""
    from ray.serve import Application
    from ray.serve._private.build_app import build_app
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(serve_config(rayservice))
    assert config.applications
    for app_config in config.applications:
        module, _, attr = app_config.import_path.replace(":", ".").rpartition(".")
        app = getattr(importlib.import_module(module), attr)
        assert isinstance(app, Application), app_config.import_path
        built = {d.name for d in build_app(app, name=app_config.name).deployments}
        assert {d.name for d in app_config.deployments} <= built, app_config.import_path


def test_serve_replicas_fit_worker_group(rayservice: dict[str, Any]) -> None:
    """Each replica fits one worker pod, and all replicas fit the worker group at maxReplicas."""
    (group,) = cluster_spec(rayservice)["workerGroupSpecs"]
    pod_cpus = cpus(group["template"]["spec"]["containers"][0])
    needed = 0.0
    for app in serve_config(rayservice)["applications"]:
        for deployment in app.get("deployments", []):
            per_replica = deployment.get("ray_actor_options", {}).get("num_cpus", 1)
            if "autoscaling_config" in deployment:
                replicas = deployment["autoscaling_config"]["max_replicas"]
            else:
                replicas = deployment.get("num_replicas", 1)
            assert isinstance(replicas, int), f"{deployment['name']}: cannot size num_replicas={replicas!r}"
            assert per_replica <= pod_cpus, deployment["name"]
            needed += replicas * per_replica
    assert needed <= group["maxReplicas"] * pod_cpus


def test_networkpolicy_selects_serving_pods(manifests: dict[str, dict[str, Any]]) -> None:
    """The serving policy selects exactly the RayService's pods and keeps Serve's port open."""
    policy = manifests["NetworkPolicy/mnist-serving"]["spec"]
    selector = policy["podSelector"]["matchLabels"]

    def selected(kind: str) -> list[bool]:
        return [
            selector.items() <= g["template"]["metadata"]["labels"].items()
            for _, g in groups(manifests[kind])
        ]

    assert all(selected("RayService")) and not any(selected("RayJob"))
    peers = [
        peer["podSelector"]["matchLabels"]
        for rule in policy["ingress"]
        for peer in rule.get("from", [])
        if "podSelector" in peer
    ]
    assert selector in peers
    assert any(
        "from" not in rule and {"port": SERVE_PORT, "protocol": "TCP"} in rule["ports"]
        for rule in policy["ingress"]
    )


def test_redis_reachable_only_from_serving_pods(manifests: dict[str, dict[str, Any]]) -> None:
    """mnist-redis selects the Redis pod and admits only the RayService's pods (head, cleanup Job) on 6379."""
    policy = manifests["NetworkPolicy/mnist-redis"]["spec"]
    redis_labels = manifests["Deployment/mnist-redis"]["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= redis_labels.items()
    (rule,) = policy["ingress"]
    (peer,) = rule["from"]
    head_labels = cluster_spec(manifests["RayService"])["headGroupSpec"]["template"]["metadata"]["labels"]
    assert peer["podSelector"]["matchLabels"].items() <= head_labels.items()
    assert rule["ports"] == [{"port": 6379, "protocol": "TCP"}]


def kustomize_image() -> dict[str, str]:
    """The single `images:` entry of the image Component (kuberay/image/kustomization.yaml)."""
    component = load_yaml(IMAGE_COMPONENT)
    assert component["kind"] == "Component"
    (image,) = component["images"]
    return image


def test_one_image_everywhere(manifests: dict[str, dict[str, Any]]) -> None:
    """Ray pods, submitters and the rollback Job use the one image that the image Component rewrites."""
    images = {
        c["image"]
        for name, pod in pod_specs(manifests)
        if not name.startswith("Deployment/mnist-redis")
        for c in pod["containers"]
    }
    assert len(images) == 1
    assert images.pop().split(":")[0] == kustomize_image()["name"]


def test_rollback_job_command_rolls_back_a_real_model_folder(
    manifests: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """The Job's own command, with the version filled in as its header shows, makes a stored version current
    in a real model folder; the unfilled placeholder fails without touching it."""
    from ray_app.model import ModelConfig, Net, load_artifact, save_artifact

    job = manifests["Job"]["spec"]
    assert job["backoffLimit"] == 0 and job["template"]["spec"]["restartPolicy"] == "Never"
    (container,) = job["template"]["spec"]["containers"]
    (volume,) = job["template"]["spec"]["volumes"]
    (mount,) = container["volumeMounts"]
    assert (
        volume["persistentVolumeClaim"]["claimName"] == manifests["PersistentVolumeClaim"]["metadata"]["name"]
    )
    assert mount["mountPath"] == model_dir() and not mount.get("readOnly")
    assert not volume["persistentVolumeClaim"].get("readOnly")
    meta = {"config": dataclasses.asdict(ModelConfig())}
    versions = [save_artifact(tmp_path, Net().state_dict(), meta) for _ in range(2)]
    assert versions[0] != versions[1]

    def run(version: str) -> subprocess.CompletedProcess:
        command = [arg.replace(mount["mountPath"], str(tmp_path)) for arg in container["command"]]
        command = [arg.replace("ROLLBACK_VERSION", version) for arg in command]
        assert command[0] == "python"
        return subprocess.run(
            [sys.executable, *command[1:]], capture_output=True, text=True, timeout=120, cwd=ROOT
        )

    untouched = run("ROLLBACK_VERSION")
    assert untouched.returncode == 1 and "invalid model version 'ROLLBACK_VERSION'" in untouched.stderr
    assert load_artifact(tmp_path).meta["version"] == versions[1]
    done = run(versions[0])
    assert done.returncode == 0, done.stderr
    assert load_artifact(tmp_path).meta["version"] == versions[0]
    header = MANIFESTS["Job"].read_text()
    assert (
        'kubectl kustomize kuberay/rollback/ | sed "s/ROLLBACK_VERSION/$VERSION/" | kubectl create -f -'
        in header
    )


# Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def copy_sources(args: str) -> list[str]:
    """Source paths of a COPY instruction (flags and the destination dropped)."""
    return [word for word in args.split()[:-1] if not word.startswith("--")]


def dockerfile_base() -> str:
    """The image of the FROM line."""
    (base,) = [args for instr, args in dockerfile_instructions() if instr == "FROM"]
    return base


def test_dockerfile_base_matches_pinned_ray() -> None:
    """rayproject/ray:<pinned ray>-py<this Python>-cpu."""
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert dockerfile_base() == f"rayproject/ray:{ray_pin()}-{python}-cpu"
    requires = tomllib.loads(required_file(PYPROJECT))["project"]["requires-python"]
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in requires


def pins(lines: list[str]) -> dict[str, str]:
    """name → version of every ``name==version`` requirement (local version labels dropped)."""
    out = {}
    for line in lines:
        requirement = Requirement(line)
        for spec in requirement.specifier:
            if spec.operator == "==":
                out[canonicalize_name(requirement.name)] = spec.version.split("+")[0]
    return out


def test_dockerfile_torch_is_the_pinned_cpu_build() -> None:
    """torch/torchvision from the CPU wheel index, at the versions the project pins."""
    (torch_run,) = [args for instr, args in dockerfile_instructions() if instr == "RUN" and "torch==" in args]
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_run
    docker = pins([word for word in torch_run.split() if "==" in word])
    assert set(docker) == {"torch", "torchvision"}
    project = pins(tomllib.loads(required_file(PYPROJECT))["project"]["dependencies"])
    locked = pins(constraint_lines())
    for name, version in docker.items():
        assert locked[name] == version, name
        assert project.get(name, version) == version, name


def test_dockerfile_layers_and_user() -> None:
    """torch, then dependencies from the constraints file, then the code; non-root; no CMD (KubeRay's)."""
    steps = dockerfile_instructions()
    index = {
        key: next(i for i, (instr, args) in enumerate(steps) if match(instr, args))
        for key, match in {
            "torch": lambda i, a: i == "RUN" and "torch==" in a,
            "deps files": lambda i, a: i == "COPY" and "pyproject.toml" in a and "constraints.txt" in a,
            "deps": lambda i, a: (
                i == "RUN" and "-c constraints.txt" in a and "['project']['dependencies']" in a
            ),
            "code": lambda i, a: i == "COPY" and a.split()[-2] == "ray_app",
            "install": lambda i, a: i == "RUN" and "pip install --no-cache-dir --no-deps ." in a,
        }.items()
    }
    assert index["torch"] < index["deps files"] < index["deps"] < index["code"] < index["install"]
    early = {src for instr, args in steps[: index["code"]] if instr == "COPY" for src in copy_sources(args)}
    assert early <= {"pyproject.toml", "constraints.txt", "README.md"}, early
    users = [args for instr, args in steps if instr == "USER"]
    assert users and users[0] == f"{UID}:{GID}" and set(users) == {f"{UID}:{GID}"}
    assert index["torch"] > [instr for instr, _ in steps].index("USER")
    assert not {"CMD", "ENTRYPOINT", "ADD"} & {instr for instr, _ in steps}


def dockerignore_allows(path: str) -> bool:
    """Whether the build context includes ``path`` (Docker semantics: last match wins, parents count)."""
    patterns = [
        p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    parts = path.split("/")
    included = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = re.escape(pattern.lstrip("!").rstrip("/"))
        regex = regex.replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        if any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            included = negate
    return included


def test_build_context() -> None:
    """What the Dockerfile copies is in the context; tests, samples, data, the venv and .git are not."""
    sources = [
        src for instr, args in dockerfile_instructions() if instr == "COPY" for src in copy_sources(args)
    ]
    package_files = [str(p.relative_to(ROOT)) for p in (ROOT / "ray_app").rglob("*") if p.is_file()]
    assert all(dockerignore_allows(s) for s in sources), sources
    assert all(dockerignore_allows(f) for f in package_files if "__pycache__" not in f)
    for excluded in (
        "tests/test_kuberay.py",
        "samples/zero.png",
        ".venv/bin/python",
        ".git/HEAD",
        "kuberay/volume/pvc.yaml",
        "ray_app/__pycache__/model.cpython-311.pyc",
    ):
        assert not dockerignore_allows(excluded), excluded
    project = tomllib.loads(required_file(PYPROJECT))["project"]
    needed = [project["readme"]] if isinstance(project.get("readme"), str) else []
    needed += (
        [project["license"]["file"]]
        if isinstance(project.get("license"), dict) and "file" in project["license"]
        else []
    )
    assert set(needed) <= set(sources), "files pyproject.toml needs to build the package are not copied"


def constraint_lines() -> list[str]:
    """Requirement lines of constraints.txt, comments dropped."""
    lines = [line.split("#")[0].strip() for line in required_file(CONSTRAINTS).splitlines()]
    return [line for line in lines if line]


def test_constraints_usable_in_the_image() -> None:
    """Plain `name==version` pins, no local labels (torch+cpu must satisfy torch==X); not the project."""
    bad = [
        line
        for line in constraint_lines()
        if not re.fullmatch(r"[A-Za-z0-9._-]+(\[[^\]]*\])?==[^+\s;@]+", line)
    ]
    assert bad == []
    locked = pins(constraint_lines())
    assert locked["ray"] == ray_pin()
    name = canonicalize_name(tomllib.loads(required_file(PYPROJECT))["project"]["name"])
    assert name not in locked


def dependency_closure(requirements: list[str]) -> set[str]:
    """Distributions that ``requirements`` install, recursively, as the installed packages declare."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        requirement = todo.pop()
        key = (canonicalize_name(requirement.name), frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = metadata.distribution(requirement.name).requires or []
        except metadata.PackageNotFoundError:
            continue
        for sub in map(Requirement, requires):
            extras = requirement.extras or {""}
            if sub.marker is None or any(sub.marker.evaluate({"extra": extra}) for extra in extras):
                todo.append(sub)
    return {name for name, _ in seen}


def third_party_imports(package: Path) -> set[str]:
    """Top-level names of every absolute import in the package that is neither stdlib nor the package."""
    names = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {package.name, "__future__"}


def test_image_installs_everything_the_code_imports() -> None:
    """Every import in ray_app/ comes from something the image installs (pyproject deps + the torch step)."""
    project = tomllib.loads(required_file(PYPROJECT))["project"]
    assert {"serve", "train"} <= next(
        Requirement(d) for d in project["dependencies"] if canonicalize_name(Requirement(d).name) == "ray"
    ).extras
    installed = dependency_closure([*project["dependencies"], "torch", "torchvision"])
    providers = metadata.packages_distributions()
    missing = sorted(
        name
        for name in third_party_imports(ROOT / "ray_app")
        if not {canonicalize_name(d) for d in providers.get(name, [])} & installed
    )
    assert missing == []


# ------------------------------------------------------------------------------------- 4. kustomize


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize <directory>`` (kubectl's built-in kustomize, as the README uses it), parsed."""
    kubectl = shutil.which("kubectl")
    require(kubectl is not None, "kubectl is not installed")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert rendered.returncode == 0, rendered.stderr
    return list(yaml.safe_load_all(rendered.stdout))


def source_docs() -> dict[tuple[str, str], dict[str, Any]]:
    """Every manifest by (kind, name)."""
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in load_manifests().values()}


def with_image(doc: dict[str, Any], image: str) -> dict[str, Any]:
    """``doc`` with every `ray-mnist` container image replaced by ``image`` (what the Component does)."""
    name = kustomize_image()["name"]

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: image if k == "image" and str(v).split(":")[0] == name else walk(v)
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [walk(item) for item in node]
        return node

    return walk(copy.deepcopy(doc))


@pytest.mark.parametrize("part", sorted(KUSTOMIZATIONS))
def test_kustomize_renders(part: str) -> None:
    """`kubectl kustomize kuberay/<part>/` renders exactly that part's objects, unchanged except for the image
    the Component sets: serving never renders a RayJob, training never a RayService."""
    docs = kustomize(KUBERAY / part)
    assert {(d["kind"], d["metadata"]["name"]) for d in docs} == KUSTOMIZATIONS[part]
    assert len(docs) == len(KUSTOMIZATIONS[part])
    image = kustomize_image()
    expected_image = f"{image['newName']}:{image['newTag']}"
    sources = source_docs()
    for doc in docs:
        assert doc == with_image(sources[(doc["kind"], doc["metadata"]["name"])], expected_image), doc["kind"]
    if part == "serving":
        (service,) = [d for d in docs if d["kind"] == "RayService"]
        assert service["spec"]["serveConfigV2"] == required_file(SERVE_CONFIG)


def test_parts_are_separate() -> None:
    """No kustomization at the top of kuberay/ (it would bundle training with serving), each part is listed."""
    assert not (KUBERAY / "kustomization.yaml").exists()
    assert {p.parent.name for p in KUBERAY.glob("*/kustomization.yaml")} == set(KUSTOMIZATIONS) | {"image"}


def test_setting_the_image_as_documented(tmp_path: Path) -> None:
    """The sed command in the image Component's header sets the image every part renders."""
    header = IMAGE_COMPONENT.read_text()
    lines = [
        line.lstrip("# ").rstrip("\\ ")
        for line in header.splitlines()
        if "sed -i.bak" in line or "kuberay/image/kustomization.yaml &&" in line
    ]
    command = " ".join(lines)
    assert command.startswith("sed -i.bak"), command
    copy_root = tmp_path / "kuberay"
    shutil.copytree(KUBERAY, copy_root)
    env = {**os.environ, "REGISTRY": "registry.example/team", "TAG": "2.60.0-abc1234"}
    done = subprocess.run(
        ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert not list(copy_root.rglob("*.bak"))
    changed = set((copy_root / "image" / "kustomization.yaml").read_text().splitlines()) - set(
        header.splitlines()
    )
    assert changed == {"    newName: registry.example/team/ray-mnist", '    newTag: "2.60.0-abc1234"'}
    for part in set(KUSTOMIZATIONS) - {"volume"}:
        images = set(re.findall(r"image: (\S+)", yaml.safe_dump_all(kustomize(copy_root / part))))
        assert images - {"redis:7.4.0"} == {"registry.example/team/ray-mnist:2.60.0-abc1234"}, (part, images)
