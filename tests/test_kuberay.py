"""Static checks of what a user applies on Kubernetes: kuberay/*.yaml, docker/Dockerfile and .dockerignore.

1. strict schema validation: RayJob/RayService (and their RayCluster parts) against the KubeRay v1.7.0 CRDs,
   unknown fields rejected as `kubeconform -strict` does; core objects against Kubernetes' own schemas;
2. KubeRay's own rules that a schema cannot express (the operator's validation.go);
3. consistency with the code: volume, model directory, Serve config, versions, image contents;
4. `kubectl kustomize kuberay/` renders what a user applies.

Run: KUBERAY_CRDS_DIR=../shared/kuberay/crds pytest tests/test_kuberay.py -q
"""

from __future__ import annotations

import ast
import copy
import functools
import importlib
import re
import shutil
import subprocess
import sys
import tomllib
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

from tests.conftest import kuberay_crds_dir

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "kuberay"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SERVE_CONFIG = ROOT / "ray_app" / "serve_config.yaml"
PYPROJECT = ROOT / "pyproject.toml"
CONSTRAINTS = ROOT / "constraints.txt"
MANIFESTS = {
    "PersistentVolumeClaim": KUBERAY / "pvc.yaml",
    "RayJob": KUBERAY / "ray-job.mnist-train.yaml",
    "RayService": KUBERAY / "ray-service.mnist.yaml",
    "NetworkPolicy": KUBERAY / "networkpolicy.yaml",
}
CRD_FILES = {
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
    "RayCluster": "ray.io_rayclusters.yaml",
}
# Oldest Kubernetes minor the manifests are meant for, and the newest schema kubernetes-validate ships.
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
SERVE_PORT = 8000
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
GO_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")
RESOURCE_START_PARAMS = {"num-cpus", "num-gpus", "memory", "resources"}
UID, GID = 1000, 100


# ---------------------------------------------------------------------------------------------- loading


def load_yaml(path: Path) -> dict[str, Any]:
    """The single YAML document in ``path``."""
    (doc,) = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return doc


def required_file(path: Path) -> str:
    """Text of a file another part of the project provides; fail with a clear message if it is missing."""
    if not path.is_file():
        pytest.fail(f"{path.relative_to(ROOT)} does not exist yet; this check needs it")
    return path.read_text()


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    """Every manifest in kuberay/, by kind."""
    docs = {kind: load_yaml(path) for kind, path in MANIFESTS.items()}
    assert {kind: doc["kind"] for kind, doc in docs.items()} == {kind: kind for kind in docs}
    return docs


@pytest.fixture(scope="module")
def rayjob(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """kuberay/ray-job.mnist-train.yaml."""
    return manifests["RayJob"]


@pytest.fixture(scope="module")
def rayservice(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """kuberay/ray-service.mnist.yaml."""
    return manifests["RayService"]


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    """The RayCluster spec embedded in a RayJob or a RayService."""
    return doc["spec"]["rayClusterSpec" if doc["kind"] == "RayJob" else "rayClusterConfig"]


def groups(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, group spec) of the head group and of every worker group."""
    spec = cluster_spec(doc)
    yield "head", spec["headGroupSpec"]
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group


def ray_containers(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(group name, Ray container) for every group: KubeRay treats the first container as the Ray one."""
    for name, group in groups(doc):
        yield name, group["template"]["spec"]["containers"][0]


def job_env(rayjob: dict[str, Any]) -> dict[str, Any]:
    """``env_vars`` of the RayJob's runtime environment."""
    return yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])["env_vars"]


def serve_config(rayservice: dict[str, Any]) -> dict[str, Any]:
    """The RayService's ``serveConfigV2``, parsed."""
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def cpus(container: dict[str, Any]) -> int:
    """The container's CPU limit as the whole number Ray advertises."""
    return int(container["resources"]["limits"]["cpu"])


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
    objects = [
        ("pvc", manifests["PersistentVolumeClaim"]),
        ("networkpolicy", manifests["NetworkPolicy"]),
        (
            "serveService",
            {"apiVersion": "v1", "kind": "Service", **svc, "metadata": {"name": "x", **svc["metadata"]}},
        ),
    ]
    for kind in ("RayJob", "RayService"):
        for name, group in groups(manifests[kind]):
            pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}}
            objects.append((f"{kind}/{name}", {**pod_template, "template": group["template"]}))
    return objects


@pytest.mark.parametrize("kind", ["RayJob", "RayService"])
def test_ray_resource_matches_crd_strictly(manifests: dict[str, dict[str, Any]], kind: str) -> None:
    """The whole object, pod templates and serveService included, against the v1.7.0 CRD; no unknown field."""
    assert schema_errors(crd_validator(kind), manifests[kind]) == []


@pytest.mark.parametrize("kind", ["RayJob", "RayService"])
def test_embedded_cluster_matches_raycluster_crd(manifests: dict[str, dict[str, Any]], kind: str) -> None:
    """The embedded cluster is also a valid RayCluster spec (what the operator creates from it)."""
    assert schema_errors(crd_validator("RayCluster", "spec"), cluster_spec(manifests[kind])) == []


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_objects_match_kubernetes_schema(manifests: dict[str, dict[str, Any]], version: str) -> None:
    """PVC, NetworkPolicy, the serve Service and every pod template against Kubernetes' schemas, strictly."""
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
    "NetworkPolicy field": ("NetworkPolicy", rename(["spec", "podSelector"], "podSelecter")),
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_typo_is_rejected(manifests: dict[str, dict[str, Any]], mutation: str) -> None:
    """The validation above is not vacuous: a misspelled field or a wrong type anywhere fails it."""
    kind, mutate = MUTATIONS[mutation]
    doc = copy.deepcopy(manifests[kind])
    mutate(doc)
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


def test_rayjob_deadlines_and_retries(rayjob: dict[str, Any]) -> None:
    """Deadlines that fail a stuck job, a bounded number of retries, the default submitter."""
    spec = rayjob["spec"]
    assert spec["activeDeadlineSeconds"] > 0
    assert 1 <= spec["preRunningDeadlineSeconds"] < spec["activeDeadlineSeconds"]
    assert spec["backoffLimit"] >= 0
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode" and "clusterSelector" not in spec


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
        pod = group["template"]["spec"]
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True, name
        assert (context["runAsUser"], context["runAsGroup"], context["fsGroup"]) == (UID, GID, GID), name
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], name


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


def volume_mounts(doc: dict[str, Any], claim: str) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(group, volume, mount) of ``claim`` in the Ray container of every group (fails where it is missing)."""
    for name, group in groups(doc):
        pod = group["template"]["spec"]
        volumes = [
            v for v in pod.get("volumes", []) if v.get("persistentVolumeClaim", {}).get("claimName") == claim
        ]
        assert len(volumes) == 1, f"{doc['kind']} {name}: claim {claim} not mounted"
        mounts = [m for m in pod["containers"][0].get("volumeMounts", []) if m["name"] == volumes[0]["name"]]
        assert len(mounts) == 1, f"{doc['kind']} {name}: volume {volumes[0]['name']} not mounted"
        yield name, volumes[0], mounts[0]


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
    """The example policy selects exactly the RayService's pods and keeps Serve's port open."""
    policy = manifests["NetworkPolicy"]["spec"]
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


def kustomize_image() -> dict[str, str]:
    """The single `images:` entry of kuberay/kustomization.yaml."""
    (image,) = load_yaml(KUBERAY / "kustomization.yaml")["images"]
    return image


def test_one_image_everywhere(manifests: dict[str, dict[str, Any]]) -> None:
    """Head, workers (and so the submitter) of both resources use the one image that kustomize rewrites."""
    images = {
        c["image"]
        for kind in ("RayJob", "RayService")
        for _, g in groups(manifests[kind])
        for c in g["template"]["spec"]["containers"]
    }
    assert len(images) == 1
    assert images.pop().split(":")[0] == kustomize_image()["name"]


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
        "kuberay/pvc.yaml",
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


def test_kustomize_renders(manifests: dict[str, dict[str, Any]]) -> None:
    """`kubectl kustomize kuberay/` renders the PVC, RayJob and RayService with the image set in `images:`."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(KUBERAY)], capture_output=True, text=True, timeout=60
    )
    assert rendered.returncode == 0, rendered.stderr
    docs = {doc["kind"]: doc for doc in yaml.safe_load_all(rendered.stdout)}
    assert sorted(docs) == ["PersistentVolumeClaim", "RayJob", "RayService"]
    image = kustomize_image()
    expected_image = f"{image['newName']}:{image['newTag']}"
    for kind, doc in docs.items():
        source = copy.deepcopy(manifests[kind])
        if kind != "PersistentVolumeClaim":
            assert {c["image"] for _, c in ray_containers(doc)} == {expected_image}
            for (_, group), (_, rendered_group) in zip(groups(source), groups(doc), strict=True):
                group["template"]["spec"]["containers"][0]["image"] = expected_image
                assert rendered_group == group
        assert doc == source, f"kustomize changed {kind} beyond the image"
    assert docs["RayService"]["spec"]["serveConfigV2"] == manifests["RayService"]["spec"]["serveConfigV2"]
