"""The RayService on separate emulated hosts, under steady load through an emulated cloud LoadBalancer.

kuberay/serving/ray-service.mnist.yaml's RayCluster runs with one network namespace per pod (tests/kuberay_pods.py,
tests/pod_network.py): Redis for GCS fault tolerance, the head (0 Ray CPUs, not a Serve endpoint) and the two serve
workers, each with its own address, the manifest's ``ray start`` line, env and read-only model volume. The test PUTs
``serveConfigV2`` as the operator does; clients (8 concurrent, one fresh connection per request) POST a digit through
a round-robin L4 balancer over the Ready serve workers' :8000 that never retries. One cluster is shared by the
scenarios, in this order; each reports requests sent, non-2xx, connection errors and the longest gap without a
success (also to ``$KUBERAY_PODS_REPORT`` as JSON, which ``python -m bench.cluster`` renders):

1. a new model published on the volume while requests flow: every answer from the old or the new version;
2. ``num_replicas`` 2 -> 3 -> 2 re-PUT (a third worker pod added as the autoscaler would): the count follows;
3. a serve worker pod deleted gracefully (endpoint removal, preStop, SIGTERM, grace period) and recreated;
4. a serve worker pod killed abruptly (SIGKILL to every process of its namespace) and recreated;
5. the head's container killed and restarted with GCS fault tolerance on a real redis-server.

"Zero failed" scenarios fail with the numbers when a request fails: a finding about the manifests or the app.
Run: MNIST_DATA_DIR=../shared/data pytest tests/test_kuberay_pods.py -q   (as root; needs redis-server)
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ray_app.model import load_artifact
from tests.conftest import require
from tests.kuberay_manifests import serve_config
from tests.kuberay_pods import PodCluster, rayservice_doc
from tests.pod_network import (
    Load,
    LoadBalancer,
    LoadReport,
    LoopThread,
    PodNetwork,
    namespaces_supported,
    remove_leftovers,
)
from tests.serving import publish_copy

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
IMAGE = (ROOT / "samples" / "zero.png").read_bytes()
CLIENTS = 8
WARMUP_S = 3  # steady load before the disruption
SETTLE_S = 4  # steady load after recovery
APP, DEPLOYMENT = "mnist", "MNISTClassifier"
REPORTS: dict[str, LoadReport] = {}


@dataclass
class Env:
    """The shared cluster, its network, balancer and the event loop the load runs on."""

    cluster: PodCluster
    balancer: LoadBalancer
    loop: LoopThread
    config: dict[str, Any]
    volume: Path
    source: Path  # the trained model


def record(name: str, report: LoadReport) -> None:
    """Keep a scenario's numbers (log, ``$KUBERAY_PODS_REPORT``)."""
    REPORTS[name] = report
    log.warning("%s: %s", name, report.line())
    if path := os.environ.get("KUBERAY_PODS_REPORT"):
        data = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
        data[name] = report.as_dict()
        Path(path).write_text(json.dumps(data, indent=2))


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str, env: Env | None = None) -> float:
    """Poll ``condition`` each 0.5 s; returns the seconds it took, fails naming ``what`` after ``timeout_s``."""
    started = time.monotonic()
    while not condition():
        if env:
            env.cluster.check_alive()
        if time.monotonic() - started > timeout_s:
            probes = {b.pod: b.probe for b in env.balancer.backends.values()} if env else {}
            pytest.fail(f"not within {timeout_s} s: {what} (readiness answers: {probes})")
        time.sleep(0.5)
    return time.monotonic() - started


def replicas(env: Env) -> int:
    """RUNNING replicas of the deployment (0 while the dashboard does not answer)."""
    try:
        return len(env.cluster.running_replicas(APP, DEPLOYMENT))
    except Exception:  # noqa: BLE001 - the head may be restarting
        return 0


def ready_backends(env: Env) -> int:
    """Serve workers in the balancer's rotation."""
    return len(env.balancer.in_rotation())


def with_replicas(config: dict[str, Any], count: int) -> dict[str, Any]:
    """``config`` with ``num_replicas: count``."""
    changed = copy.deepcopy(config)
    changed["applications"][0]["deployments"][0]["num_replicas"] = count
    return changed


@pytest.fixture(scope="module")
def env(trained_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """The RayService's cluster in pods, serveConfigV2 deployed, both serve workers in the balancer's rotation."""
    reason = namespaces_supported()
    require(
        not reason,
        f"pods as hosts need network namespaces ({reason}); tests/test_kuberay_e2e.py covers the loopback emulation",
        "sudo make test",
    )
    require(
        shutil.which("redis-server") is not None,
        "redis-server is not installed",
        "apt-get install redis-server",
    )
    remove_leftovers()
    volume = tmp_path_factory.mktemp("pvc")
    publish_copy(trained_model_dir, volume)
    volume.chmod(0o755)
    doc = rayservice_doc()
    config = serve_config(doc)
    loop = LoopThread()
    balancer = LoadBalancer()
    network = PodNetwork()
    cluster = PodCluster(doc, volume, network, balancer)
    failed = True
    try:
        loop.run(balancer.start(), 10)
        cluster.start()
        response = cluster.put_serve_config(config)
        assert response.status_code == 200, (
            f"PUT /api/serve/applications/: {response.status_code} {response.text}"
        )
        cluster.wait_running(300)
        built = Env(cluster, balancer, loop, config, volume, trained_model_dir)
        wait_for(lambda: ready_backends(built) == 2, 120, "both serve workers Ready", built)
        yield built
        failed = False
    finally:
        cluster.stop()
        left = network.close()
        loop.run(balancer.stop(), 10)
        loop.close()
        if not failed:
            shutil.rmtree(cluster.root, ignore_errors=True)
        assert not left, f"left behind: {left}"


def under_load(
    env: Env, disrupt: Callable[[], None], recovered: Callable[[], bool], timeout_s: float
) -> LoadReport:
    """Steady load, then ``disrupt()``, until ``recovered()`` (within ``timeout_s``), then a little more load."""
    load = Load(env.balancer.port, IMAGE, clients=CLIENTS)
    env.loop.run(load.start(), 10)
    try:
        time.sleep(WARMUP_S)
        disrupt()
        wait_for(recovered, timeout_s, "recovery", env)
        time.sleep(SETTLE_S)
    finally:
        report = env.loop.run(load.stop(), 60)
    return report


def zero_failed(report: LoadReport, scenario: str) -> None:
    """The scenario promised no failed request."""
    assert report.ok > 0, f"{scenario}: no request succeeded: {report.line()}"
    assert report.failed == 0, f"{scenario}: FINDING: {report.line()}; first failures: {report.examples}"


@pytest.mark.integration
@pytest.mark.timeout(900)  # includes starting the cluster (about 3 minutes alone)
def test_new_model_published_while_requests_flow(env: Env) -> None:
    old = load_artifact(env.volume).meta["version"]
    new: list[str] = []

    def publish() -> None:
        new.append(publish_copy(env.source, env.volume))  # as the RayJob's driver writes the volume

    def only_new_answers() -> bool:
        return bool(new) and env.loop.run(latest_version(env), 10) == new[0]

    report = under_load(env, publish, only_new_answers, 60)
    report.notes.append(
        f"answers from the old model {report.versions.get(old, 0)}, the new {report.versions.get(new[0], 0)}"
    )
    record("new model published", report)
    zero_failed(report, "new model published")
    assert set(report.versions) <= {old, new[0]}, report.versions
    assert report.versions.get(new[0]), f"no answer from the new model: {report.versions}"


async def latest_version(env: Env) -> str:
    """The model version of one answer through the balancer."""
    load = Load(env.balancer.port, IMAGE, clients=1)
    status, body, _ = await load._one()
    match = Load.VERSION.search(body)
    return match.group(1).decode() if status == 200 and match else ""


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_num_replicas_follows_the_serve_config(env: Env) -> None:
    timings: dict[str, float] = {}

    def scale_up() -> None:
        response = env.cluster.put_serve_config(with_replicas(env.config, 3))
        assert response.status_code == 200, response.text
        env.cluster.start_pod("serve")  # the autoscaler adds a worker for the pending replica (maxReplicas 4)

    started = time.monotonic()
    report_up = under_load(env, scale_up, lambda: replicas(env) == 3 and ready_backends(env) == 3, 180)
    timings["2->3 s"] = time.monotonic() - started - WARMUP_S - SETTLE_S

    def scale_down() -> None:
        response = env.cluster.put_serve_config(env.config)
        assert response.status_code == 200, response.text

    started = time.monotonic()
    report_down = under_load(env, scale_down, lambda: replicas(env) == 2 and ready_backends(env) == 2, 120)
    timings["3->2 s"] = time.monotonic() - started - WARMUP_S - SETTLE_S
    report_up.notes.append(f"3 replicas RUNNING and Ready {timings['2->3 s']:.1f} s after the PUT")
    report_down.notes.append(
        f"2 replicas, the idle pod out of rotation {timings['3->2 s']:.1f} s after the PUT"
    )
    record("num_replicas 2 -> 3", report_up)
    record("num_replicas 3 -> 2", report_down)
    zero_failed(report_up, "num_replicas 2 -> 3")
    zero_failed(report_down, "num_replicas 3 -> 2")
    # The autoscaler removes the idle worker after idleTimeoutSeconds; here at once, gracefully.
    idle = [name for name in env.cluster.serve_pods() if not env.balancer.backends[name].ready]
    assert len(idle) == 1, {n: b.ready for n, b in env.balancer.backends.items()}
    env.cluster.delete_pod(idle[0])


def replica_pod(env: Env) -> str:
    """A serve worker pod hosting a replica (the first in rotation)."""
    return env.balancer.in_rotation()[0].pod


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_serve_worker_removed_gracefully(env: Env) -> None:
    victim = replica_pod(env)
    took: list[float] = []

    def drain() -> None:
        took.append(env.cluster.delete_pod(victim))  # a node drain's eviction
        env.cluster.start_pod("serve")  # the RayCluster controller restores replicas: 2

    def done() -> bool:
        return replicas(env) == 2 and ready_backends(env) == 2

    report = under_load(env, drain, done, 180)
    report.notes.append(
        f"pod gone after {took[0]:.1f} s; SIGKILLed at the end of the grace period: "
        f"{env.cluster.killed_after_grace or 'nothing'}"
    )
    record("serve worker removed gracefully", report)
    zero_failed(report, "serve worker removed gracefully")


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_serve_worker_killed_abruptly(env: Env) -> None:
    victim = replica_pod(env)
    at_kill: dict[str, float] = {}

    def kill() -> None:
        at_kill["in_flight"] = env.balancer.backends[victim].active
        at_kill["time"] = time.monotonic()
        env.cluster.kill_pod(victim)
        wait_for(lambda: not env.balancer.backends[victim].ready, 10, "the balancer's probe notices")
        at_kill["refused"] = env.balancer.backends[victim].refused
        env.cluster.remove_pod(victim)
        env.cluster.start_pod("serve")  # the RayCluster controller recreates the pod

    report = under_load(env, kill, lambda: replicas(env) == 2 and ready_backends(env) == 2, 180)
    report.notes.append(
        f"{at_kill['in_flight']:.0f} requests in flight on the pod at the kill, {at_kill['refused']:.0f} "
        "connections refused by it before the balancer's probe took it out"
    )
    record("serve worker killed abruptly", report)
    assert not report.timeouts, f"requests unanswered within the client timeout: {report.line()}"
    # Bound: the requests in flight at the kill (any of the 8 clients may have had its request on the killed
    # replica, through either pod's proxy) and the connections the pod refused before the probe noticed.
    bound = CLIENTS + at_kill["refused"]
    assert report.failed <= bound, (
        f"FINDING: {report.failed} failed > {bound}: {report.line()} {report.examples}"
    )
    assert report.longest_gap_s <= 10, (
        f"FINDING: no success for {report.longest_gap_s:.1f} s: {report.line()}"
    )


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_head_restart_with_gcs_fault_tolerance(env: Env) -> None:
    assert env.cluster.gcs_ft, "the RayService has no gcsFaultToleranceOptions"
    before = sorted(r["replica_id"] for r in env.cluster.running_replicas(APP, DEPLOYMENT))
    (head,) = [name for name, p in env.cluster.pods.items() if p.group == "head"]

    def restart_head() -> None:
        env.cluster.restart_container(head)

    def head_back() -> bool:
        return env.cluster.alive_nodes() == 3 and replicas(env) == 2

    report = under_load(env, restart_head, head_back, 180)
    record("head restarted (GCS FT)", report)
    zero_failed(report, "head restarted (GCS FT)")
    after = sorted(r["replica_id"] for r in env.cluster.running_replicas(APP, DEPLOYMENT))
    assert after == before, "the replicas were replaced: the cluster state did not survive the head restart"
    assert env.cluster.serve_status()["applications"][APP]["status"] == "RUNNING"
