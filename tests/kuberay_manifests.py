"""The manifests under kuberay/ as data: where they are, how to load them, and the parts of a Ray resource that
the static checks (tests/test_kuberay.py) and the operator emulation (tests/kuberay_emulation.py) both read."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "kuberay"
# Single-document manifests, by kind.
MANIFESTS = {
    "PersistentVolumeClaim": KUBERAY / "volume" / "pvc.yaml",
    "RayJob": KUBERAY / "training" / "ray-job.mnist-train.yaml",
    "RayService": KUBERAY / "serving" / "ray-service.mnist.yaml",
    "PodDisruptionBudget": KUBERAY / "serving" / "pdb.yaml",
    "Secret": KUBERAY / "serving" / "redis-secret.yaml",
    "RayCronJob": KUBERAY / "retrain" / "raycronjob.mnist-retrain.yaml",
    "Job": KUBERAY / "rollback" / "job.mnist-rollback.yaml",
}
# Multi-document manifests: their objects are keyed "Kind/name".
MULTI_MANIFESTS = [KUBERAY / "serving" / "redis.yaml", KUBERAY / "serving" / "networkpolicy.yaml"]


def load_yaml(path: Path) -> dict[str, Any]:
    """The single YAML document in ``path``."""
    (doc,) = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return doc


def load_manifests() -> dict[str, dict[str, Any]]:
    """Every manifest in kuberay/: single documents by kind, those of multi-document files by "Kind/name"."""
    docs = {kind: load_yaml(path) for kind, path in MANIFESTS.items()}
    assert {kind: doc["kind"] for kind, doc in docs.items()} == {kind: kind for kind in docs}
    for path in MULTI_MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            key = f"{doc['kind']}/{doc['metadata']['name']}"
            assert key not in docs, key
            docs[key] = doc
    return docs


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    """The RayCluster spec embedded in a RayJob, a RayCronJob's job template or a RayService."""
    if doc["kind"] == "RayCronJob":
        return doc["spec"]["jobTemplate"]["rayClusterSpec"]
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


def ray_cpus(group: dict[str, Any]) -> int:
    """CPUs a pod of the group advertises to Ray: ``num-cpus`` if set, else the container's CPU limit."""
    params = group.get("rayStartParams", {})
    return (
        int(params["num-cpus"]) if "num-cpus" in params else cpus(group["template"]["spec"]["containers"][0])
    )


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
