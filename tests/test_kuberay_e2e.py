"""Local emulation of the KubeRay operator, end to end (integration; minutes; one small cluster at a time).

1. The RayJob of kuberay/training/ray-job.mnist-train.yaml: its RayCluster as local `ray start` nodes (head with 0
   CPUs, the worker replicas, CPUs scaled to this machine), its own ``entrypoint`` and ``runtimeEnvYAML``
   submitted with ``ray job submit`` as KubeRay's submitter does, the model volume mapped to a temporary
   folder. It must succeed and leave model.pth + model.json on the "volume".
2. The RayService of kuberay/serving/ray-service.mnist.yaml: its RayCluster the same way (head with 0 Ray
   CPUs, two serve workers with the manifest's num-cpus, ``MODEL_DIR`` from the container env), its own
   ``serveConfigV2`` PUT to the dashboard's Serve REST API as the operator does; the app must reach RUNNING,
   put its replicas on distinct serve workers and answer /healthz and /predict on the config's HTTP port
   with the trained model.
3. That cluster restarted (head and workers) and the config PUT again: serving comes back with the same
   model from the volume. This is the worst case, a head loss without GCS fault tolerance: the emulation runs
   no Redis (the operator's gcsFaultToleranceOptions and env injection are not emulated).

Both clusters use token authentication like the manifests: a fresh token per cluster, given to every process
as the operator does (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN``), so ``~/.ray/auth_token`` plays no part.

Run: MNIST_DATA_DIR=../shared/data pytest tests/test_kuberay_e2e.py -q
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from filelock import FileLock

from ray_app.model import METADATA, WEIGHTS, load_artifact
from tests.conftest import require
from tests.helpers import SAMPLES, WORDS
from tests.kuberay_emulation import EmulatedCluster, map_path, submission_id, wait_port_free
from tests.kuberay_manifests import MANIFESTS, load_yaml, serve_config, volume_mounts
from tests.serving import PORT_LOCK

CPU_BUDGET = 2  # CPUs one emulated cluster may advertise (the contract's limit for a shared machine)
# A short run through the manifest's own option handling (the training CLI reads each option from the env);
# small batches give enough optimizer steps on 3000 images for the samples to be recognised (about 95 %
# test accuracy; every sample right with probability > 0.9).
JOB_OVERRIDES = {"TRAIN_LIMIT": "3000", "EPOCHS": "1", "BATCH_SIZE": "32", "MIN_ACCURACY": "0"}
JOB_TIMEOUT_S = 900
SERVE_TIMEOUT_S = 600
TEST_TIMEOUT_S = 2400  # a test's fixtures included: run alone, the serving tests train first


def claim_mount(doc: dict[str, Any]) -> str:
    """Where the Ray containers of ``doc`` mount the model PVC (the same path in every group)."""
    claim = load_yaml(MANIFESTS["PersistentVolumeClaim"])["metadata"]["name"]
    (path,) = {mount["mountPath"] for _, _, mount in volume_mounts(doc, claim)}
    return path


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder that stands in for the model PVC, shared by the training and the serving cluster."""
    return tmp_path_factory.mktemp("pvc")


@dataclass(frozen=True)
class Training:
    """A finished RayJob run on the emulated cluster."""

    job_id: str
    status: str
    logs: str
    env_vars: dict[str, str]


@pytest.fixture(scope="module")
def training(volume: Path, mnist_dir: Path) -> Training:
    """Run the RayJob on its emulated RayCluster; the cluster is stopped before this returns."""
    rayjob = load_yaml(MANIFESTS["RayJob"])
    cluster = EmulatedCluster(rayjob, {claim_mount(rayjob): volume}, CPU_BUDGET)
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    env_vars = {key: map_path(value, cluster.volumes) for key, value in runtime_env["env_vars"].items()}
    scaled_cpus = max(1, int(cluster.scale_cpus(int(env_vars["CPUS_PER_WORKER"]))))
    env_vars |= {
        "MNIST_DATA_DIR": str(mnist_dir),  # the manifest keeps MNIST on the volume; here the offline copy
        "CPUS_PER_WORKER": str(scaled_cpus),  # scaled like the worker pods
        **JOB_OVERRIDES,
    }
    assert int(env_vars["NUM_WORKERS"]) * scaled_cpus <= cluster.cluster_cpus(), (
        "job does not fit the cluster"
    )
    job_id = submission_id(rayjob["metadata"]["name"])
    with cluster:
        cluster.submit_job(job_id, rayjob["spec"]["entrypoint"], {**runtime_env, "env_vars": env_vars})
        status, logs = cluster.wait_job(job_id, JOB_TIMEOUT_S)
    return Training(job_id, status, logs, env_vars)


@pytest.mark.integration
@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_rayjob_trains_and_publishes_to_the_volume(training: Training, volume: Path) -> None:
    assert training.status == "SUCCEEDED", (
        f"job {training.job_id} {training.status}:\n{training.logs[-6000:]}"
    )
    assert training.env_vars["MODEL_DIR"] == str(volume), "the RayJob's MODEL_DIR is not on the model volume"
    assert (volume / WEIGHTS).is_file() and (volume / METADATA).is_file()
    meta = load_artifact(volume).meta
    assert meta["num_workers"] == int(training.env_vars["NUM_WORKERS"])
    assert meta["cpus_per_worker"] == int(training.env_vars["CPUS_PER_WORKER"])
    assert (meta["epochs"], meta["train_images"]) == (1, int(JOB_OVERRIDES["TRAIN_LIMIT"]))
    assert any((volume / "ray_results").iterdir()), "Ray Train's run storage is not on the shared volume"


def sample_images() -> list[tuple[Path, int]]:
    """The committed samples named after their digit (``samples/zero.png`` …)."""
    return [
        (SAMPLES / f"{word}.png", d) for d, word in enumerate(WORDS) if (SAMPLES / f"{word}.png").is_file()
    ]


@dataclass
class Serving:
    """The RayService's emulated cluster with the Serve config deployed."""

    cluster: EmulatedCluster
    config: dict[str, Any]
    url: str


def deploy(cluster: EmulatedCluster, config: dict[str, Any], url: str, timeout_s: float = 60) -> None:
    """PUT the config, wait until every application is RUNNING and the app answers /healthz with a model.

    Serve binds the config's fixed HTTP port, which another server on this machine may hold: wait for it
    first, and skip (fail in CI) if it is taken meanwhile.
    """
    port = config["http_options"]["port"]
    require(wait_port_free(port, 60), f"port {port} is busy (another server on this machine); try later")
    response = cluster.deploy_serve(config)
    require("Failed to bind to address" not in response.text, f"port {port} was taken by another server")
    assert response.status_code == 200, (
        f"PUT /api/serve/applications/: {response.status_code} {response.text}"
    )
    cluster.wait_serve_running([app["name"] for app in config["applications"]], SERVE_TIMEOUT_S)
    deadline = time.monotonic() + timeout_s
    status = "no answer"
    while time.monotonic() < deadline:
        with suppress(httpx.HTTPError):
            response = httpx.get(f"{url}/healthz", timeout=10)
            if response.status_code == 200:
                return
            status = f"{response.status_code} {response.text}"
        cluster.check_alive()
        time.sleep(1)
    pytest.fail(f"{url}/healthz: {status}")


@pytest.fixture(scope="module")
def serving(training: Training, volume: Path) -> Iterator[Serving]:
    """The RayService's cluster (started fresh) with serveConfigV2 deployed through the dashboard."""
    if training.status != "SUCCEEDED":
        pytest.fail(f"no model to serve: the RayJob {training.status}")
    require(SAMPLES.joinpath("zero.png").is_file(), "samples/zero.png is not there yet")
    rayservice = load_yaml(MANIFESTS["RayService"])
    config = serve_config(rayservice)
    cluster = EmulatedCluster(rayservice, {claim_mount(rayservice): volume}, CPU_BUDGET)
    assert cluster.cpu_factor == 1, "the RayService's workers need more CPUs than this test may use"
    needed = sum(
        d.get("num_replicas", 1) * d.get("ray_actor_options", {}).get("num_cpus", 1)
        for app in config["applications"]
        for d in app["deployments"]
    )
    assert needed <= cluster.cluster_cpus(), f"replicas need {needed} CPUs, the worker group has fewer"
    url = f"http://127.0.0.1:{config['http_options']['port']}"
    with FileLock(PORT_LOCK, timeout=1800), cluster:
        deploy(cluster, config, url)
        yield Serving(cluster, config, url)


def predict(url: str, path: Path) -> dict[str, Any]:
    """POST one image file to /predict as the README's curl does."""
    response = httpx.post(
        f"{url}/predict", files={"file": (path.name, path.read_bytes(), "image/png")}, timeout=30
    )
    assert response.status_code == 200, f"{path.name}: {response.status_code} {response.text}"
    return response.json()


@pytest.mark.integration
@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_rayservice_serves_the_trained_model(serving: Serving, volume: Path) -> None:
    version = load_artifact(volume).meta["version"]
    dashboard = serving.cluster.dashboard_url
    assert httpx.get(f"{dashboard}/api/serve/applications/", timeout=30).status_code == 401, "no token auth"
    health = httpx.get(f"{serving.url}/healthz", timeout=10)
    assert health.status_code == 200, health.text
    assert (health.json()["status"], health.json()["model_version"]) == ("ok", version)
    samples = sample_images()
    results = {path.name: (digit, predict(serving.url, path)) for path, digit in samples}
    for name, (_, body) in results.items():
        assert body["model_version"] == version, name
        assert len(body["probs"]) == 10 and abs(sum(body["probs"]) - 1) < 1e-3, name
    predicted = {name: body["prediction"] for name, (_, body) in results.items()}
    assert predicted == {path.name: digit for path, digit in samples}


@pytest.mark.integration
@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_replicas_run_on_distinct_serve_workers(serving: Serving) -> None:
    """The manifest's pod sizes put one replica on each serve worker and none on the head."""
    cluster = serving.cluster
    apps = httpx.get(
        f"{cluster.dashboard_url}/api/serve/applications/", headers=cluster.headers, timeout=30
    ).json()["applications"]
    nodes = httpx.get(f"{cluster.dashboard_url}/api/v0/nodes", headers=cluster.headers, timeout=30).json()
    head_ids = {n["node_id"] for n in nodes["data"]["result"]["result"] if n["is_head_node"]}
    for app in serving.config["applications"]:
        for deployment in app["deployments"]:
            replicas = apps[app["name"]]["deployments"][deployment["name"]]["replicas"]
            node_ids = [r["node_id"] for r in replicas if r["state"] == "RUNNING"]
            assert len(node_ids) == deployment["num_replicas"], replicas
            assert len(set(node_ids)) == len(node_ids), f"replicas share a node: {node_ids}"
            assert not set(node_ids) & head_ids, "a replica runs on the head"


@pytest.mark.integration
@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_serving_comes_back_after_the_head_restarts(serving: Serving, volume: Path) -> None:
    before = predict(serving.url, SAMPLES / "zero.png")
    cluster = serving.cluster
    survivors = cluster.stop()
    assert not survivors, f"processes left after stopping the cluster: {survivors}"
    # Without GCS fault tolerance the workers' raylets exit with the head and their containers restart too.
    cluster.start()  # a new head: no Serve applications until the operator deploys the config again
    deploy(cluster, serving.config, serving.url)
    after = predict(serving.url, SAMPLES / "zero.png")
    assert after["model_version"] == before["model_version"] == load_artifact(volume).meta["version"]
    assert after["prediction"] == before["prediction"]
    assert after["probs"] == pytest.approx(before["probs"], abs=1e-4)
