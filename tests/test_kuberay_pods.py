"""The RayService on separate emulated hosts, under steady load through an emulated cloud LoadBalancer.

kuberay/serving/ray-service.mnist.yaml's RayCluster runs with one network namespace per pod (tests/kuberay_pods.py,
tests/pod_network.py): Redis for GCS fault tolerance, the head (0 Ray CPUs, not a Serve endpoint) and the two serve
workers, each with its own address, the manifest's ``ray start`` line, env and read-only model volume. The test PUTs
``serveConfigV2`` as the operator does (``x-ray-authorization``, once every pod passes its readiness probe);
clients (8 concurrent, one fresh connection per request) POST a digit through a round-robin L4 balancer over the
Ready serve workers' :8000 (the manifest's worker readiness probe: raylet, then Serve's /-/healthz) that never
retries.
One cluster is shared by the scenarios, in this order; each reports requests sent, non-2xx, connection errors and
the longest gap without a success (also to ``$KUBERAY_PODS_REPORT`` as JSON, which ``python -m bench.cluster``
renders):

1. the RayJob (kuberay/training/) on its own RayCluster in pods on the same network, submitted by its submitter
   pod's command line as KubeRay builds it, trains a tiny model and publishes it on the shared volume while
   requests flow: every answer from the old or the new version, none fails;
2. ``autoscaling_config`` (min 2, max 3, target 1 ongoing request) replacing ``num_replicas`` under load, with the
   autoscaler's scale-up emulated (a worker pod per pending replica): replicas rise to 3, then fall back to 2 under
   a trickle once the load stops. Min 2, not 1: the switch restarts every replica (see the test);
3. ``num_replicas`` 2 -> 3 -> 2 re-PUT (the third replica on the idle pod the autoscaling left, as within the
   autoscaler's idleTimeoutSeconds): the count follows; then the idle pod is removed;
4. a serve worker pod deleted gracefully (endpoint removal, preStop, SIGTERM, grace period) and recreated;
5. a serve worker pod killed abruptly (SIGKILL to every process of its namespace) and recreated;
6. the head's container killed and restarted with GCS fault tolerance on a real redis-server.

"Zero failed" scenarios fail with the numbers when a request fails: a finding about the manifests or the app.
Run: MNIST_DATA_DIR=../shared/data pytest tests/test_kuberay_pods.py -q   (as root; needs redis-server)
"""

from __future__ import annotations

import contextlib
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
from tests.kuberay_emulation import TERMINAL_JOB_STATES, submission_id
from tests.kuberay_manifests import serve_config
from tests.kuberay_pods import (
    AGENT_PORT,
    Autoscaler,
    PodCluster,
    rayjob_doc,
    rayservice_doc,
    serve_readiness,
)
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
# The RayJob's training, kept tiny: the manifest's entrypoint with these flags (they override its env_vars), one
# worker pod of the cpu group instead of two, as the CPUs are scaled down for this machine.
JOB_FLAGS = (
    "--num-workers 1 --cpus-per-worker 1 --epochs 1 --train-limit 1000 --batch-size 32 --val-size 500 "
    "--min-accuracy 0.5 --champion-gate off"
)
# On a cluster the RayJob's pods run on other nodes than the serve workers; here they share two cores, so during
# the RayJob each client pauses between requests, leaving CPU to the training.
JOB_LOAD_PAUSE_S = 0.1
# Low target and short delays, so the test sees both directions within a minute. min_replicas 2, as the HA design
# needs (one replica per serve pod, two pods): with 1, switching num_replicas -> autoscaling_config under load left no
# replica for 7-11 s in 2 of 4 runs (see test_autoscaling_follows_the_load).
AUTOSCALING = {
    "min_replicas": 2,
    "max_replicas": 3,
    "target_ongoing_requests": 1,
    "upscale_delay_s": 2,
    "downscale_delay_s": 10,
    "look_back_period_s": 5,
}
REPORTS: dict[str, LoadReport] = {}


@dataclass
class Env:
    """The shared cluster, its network, balancer and the event loop the load runs on."""

    cluster: PodCluster
    balancer: LoadBalancer
    loop: LoopThread
    config: dict[str, Any]
    volume: Path


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
def env(
    trained_model_dir: Path,
    mnist_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Iterator[Env]:
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
    (volume / "data").symlink_to(mnist_dir)  # the RayJob's MNIST_DATA_DIR (/mnt/model/data): the offline copy
    volume.chmod(0o755)
    doc = rayservice_doc()
    config = serve_config(doc)
    loop = LoopThread()
    period_s, failure_threshold = serve_readiness(doc)
    balancer = LoadBalancer(period_s, failure_threshold, raylet_port=AGENT_PORT)
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
        built = Env(cluster, balancer, loop, config, volume)
        wait_for(lambda: ready_backends(built) == 2, 120, "both serve workers Ready", built)
        failed_before = request.session.testsfailed
        yield built
        failed = request.session.testsfailed > failed_before  # a scenario failed: its pods' logs stay
    finally:
        cluster.stop()
        left = network.close()
        loop.run(balancer.stop(), 10)
        loop.close()
        if failed:
            log.warning("pod logs kept in %s", cluster.root)
        else:
            shutil.rmtree(cluster.root, ignore_errors=True)
        assert not left, f"left behind: {left}"


def under_load(
    env: Env,
    disrupt: Callable[[], None],
    recovered: Callable[[], bool],
    timeout_s: float,
    clients: int = CLIENTS,
    pause_s: float = 0.0,
) -> LoadReport:
    """Steady load, then ``disrupt()``, until ``recovered()`` (within ``timeout_s``), then a little more load."""
    load = Load(env.balancer.port, IMAGE, clients=clients, pause_s=pause_s)
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
@pytest.mark.timeout(900)  # includes starting the RayService's cluster (about 3 minutes alone)
def test_rayjob_publishes_a_new_model_while_requests_flow(env: Env) -> None:
    doc = rayjob_doc()
    doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = 1
    entrypoint = f"{doc['spec']['entrypoint']} {JOB_FLAGS}"
    job_id = submission_id(doc["metadata"]["name"])
    job = PodCluster(doc, env.volume, env.cluster.network, name="job")
    old = load_artifact(env.volume).meta["version"]
    new: list[str] = []
    timings: dict[str, float] = {}
    try:
        started = time.monotonic()
        job.start()  # Initializing: the RayJob's cluster, every pod Ready
        timings["cluster"] = time.monotonic() - started

        def submit() -> None:
            timings["submitted"] = time.monotonic()
            job.start_submitter(job_id, entrypoint)

        def published() -> bool:
            status = job.job_status(job_id)
            if status in TERMINAL_JOB_STATES - {"SUCCEEDED"}:
                pytest.fail(f"RayJob {job_id} {status}:\n{job_logs(job, job_id)}")
            if status != "SUCCEEDED" or job.pods["jobsubmitter"].proc.poll() is None:
                return False  # the RayJob is Complete once the Ray job is terminal and the submitter finished
            if not new:
                timings["job"] = time.monotonic() - timings["submitted"]
                new.append(load_artifact(env.volume).meta["version"])
            return env.loop.run(latest_version(env), 10) == new[0]

        report = under_load(env, submit, published, 420, CLIENTS, JOB_LOAD_PAUSE_S)
        submitter_exit = job.pods["jobsubmitter"].proc.returncode
    finally:
        job.delete()  # shutdownAfterJobFinishes: the RayJob's cluster goes
    report.notes.append(
        f"{CLIENTS} clients pausing {JOB_LOAD_PAUSE_S} s between requests; "
        f"RayJob cluster Ready in {timings['cluster']:.0f} s (not under load), the job SUCCEEDED "
        f"{timings['job']:.0f} s after its submitter started; answers from the old model "
        f"{report.versions.get(old, 0)}, from the RayJob's {report.versions.get(new[0], 0)}"
    )
    record("RayJob publishes a new model", report)
    assert submitter_exit == 0, f"the submitter exited {submitter_exit}:\n{job_logs(job, job_id)}"
    zero_failed(report, "RayJob publishes a new model")
    assert new[0] != old, "the RayJob published nothing"
    meta = load_artifact(env.volume).meta
    assert (meta["epochs"], meta["train_images"], meta["num_workers"]) == (1, 1000, 1), meta
    assert set(report.versions) <= {old, new[0]}, report.versions
    assert report.versions.get(new[0]), f"no answer from the new model: {report.versions}"


def job_logs(job: PodCluster, job_id: str) -> str:
    """The submitter pod's output (the driver's logs it followed) for a failure message."""
    path = job.root / f"{job.name}submitter.log"
    return path.read_text(errors="replace")[-4000:] if path.is_file() else f"no submitter log for {job_id}"


async def latest_version(env: Env) -> str:
    """The model version of one answer through the balancer."""
    load = Load(env.balancer.port, IMAGE, clients=1)
    status, body, _ = await load._one()
    match = Load.VERSION.search(body)
    return match.group(1).decode() if status == 200 and match else ""


def with_autoscaling(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with :data:`AUTOSCALING` instead of ``num_replicas``."""
    changed = copy.deepcopy(config)
    deployment = changed["applications"][0]["deployments"][0]
    deployment.pop("num_replicas")
    deployment["autoscaling_config"] = AUTOSCALING
    return changed


@pytest.mark.integration
@pytest.mark.timeout(420)
def test_autoscaling_follows_the_load(env: Env) -> None:
    """``num_replicas: 2`` replaced by :data:`AUTOSCALING` under load, and back.

    In Ray 2.60 adding or removing a deployment's ``autoscaling_config`` changes the application's code version
    (ray/serve/_private/deploy_utils.py:158-199 hashes the list of autoscaling policies, [] vs [None]), so the
    PUT rebuilds the app and replaces every replica by a rolling update that stops an old replica before its
    successor runs (deployment_state.py:4340-4397, batch max(1, 20 % of the target)). The old replicas, started
    without autoscaling, push no load metrics (replica.py:757-763), so meanwhile the autoscaler sees no load and
    lowers the target to min_replicas. With min_replicas 1 the rollout then stopped the last old replica before
    its successor ran: no replica, both workers' proxies drained (/-/healthz 503), no Ready endpoint, every
    connection refused for 7-11 s. With min_replicas 2 one replica always runs, but the rollout can still move
    the last replicas to a new pod whose proxy starts after the other pods' proxies drained (with KubeRay's
    failureThreshold 1: 153 connections refused within 1 s); the manifest's readiness probe keeps a draining pod
    an endpoint for 10-15 s (failureThreshold 3), while its proxy still forwards.
    """
    timings: dict[str, float] = {}

    def put_autoscaling() -> None:
        timings["put"] = time.monotonic()
        response = env.cluster.put_serve_config(with_autoscaling(env.config))
        assert response.status_code == 200, response.text

    def settled(count: int) -> bool:
        """``count`` replicas RUNNING and Ready, the rollout done (the application RUNNING)."""
        if replicas(env) != count or ready_backends(env) != count:
            return False
        with contextlib.suppress(Exception):  # the dashboard may not answer under load
            return env.cluster.serve_status()["applications"][APP]["status"] == "RUNNING"
        return False

    with Autoscaler(env.cluster, APP, DEPLOYMENT) as autoscaler:
        report_up = under_load(env, put_autoscaling, lambda: settled(3), 240)
        timings["up"] = time.monotonic() - timings["put"] - SETTLE_S
        started = time.monotonic()
        # The load stops; one client with a pause keeps asking while the third replica goes (the rise's requests
        # stay under the 3 replicas until the trickle starts).
        report_down = under_load(env, lambda: None, lambda: settled(2), 120, 1, 0.2)
        timings["down"] = time.monotonic() - started - WARMUP_S - SETTLE_S
    report_up.notes.append(
        f"every replica replaced (a new code version) and 3 RUNNING and Ready {timings['up']:.1f} s after the PUT "
        f"under load (pods added by the emulated autoscaler: {len(autoscaler.added)})"
    )
    report_down.notes.append(
        f"1 client, 0.2 s between requests: 2 replicas, the third pod out of rotation {timings['down']:.1f} s "
        "after the load stopped"
    )
    record("autoscaling 2..3: load", report_up)
    record("autoscaling 2..3: load stopped", report_down)
    # Back to serveConfigV2 as applied (every replica replaced again); the third pod stays idle (the autoscaler
    # removes it after idleTimeoutSeconds: the next scenario uses it or removes it).
    response = env.cluster.put_serve_config(env.config)
    assert response.status_code == 200, response.text
    wait_for(lambda: settled(2), 180, "2 replicas of serveConfigV2 again", env)
    zero_failed(report_up, "autoscaling 2..3: load")
    zero_failed(report_down, "autoscaling 2..3: load stopped")
    assert autoscaler.added, "the deployment reached 3 replicas without a third pod"


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_num_replicas_follows_the_serve_config(env: Env) -> None:
    timings: dict[str, float] = {}

    def scale_up() -> None:
        response = env.cluster.put_serve_config(with_replicas(env.config, 3))
        assert response.status_code == 200, response.text

    def scale_down() -> None:
        response = env.cluster.put_serve_config(env.config)
        assert response.status_code == 200, response.text

    pods_before = len(env.cluster.serve_pods())
    with Autoscaler(
        env.cluster, APP, DEPLOYMENT
    ) as autoscaler:  # a pod for the third replica, if none is idle
        started = time.monotonic()
        report_up = under_load(env, scale_up, lambda: replicas(env) == 3 and ready_backends(env) == 3, 180)
        timings["2->3 s"] = time.monotonic() - started - WARMUP_S - SETTLE_S
        started = time.monotonic()
        report_down = under_load(
            env, scale_down, lambda: replicas(env) == 2 and ready_backends(env) == 2, 120
        )
        timings["3->2 s"] = time.monotonic() - started - WARMUP_S - SETTLE_S
    added = (
        f"a pod added by the emulated autoscaler ({len(autoscaler.added)})"
        if autoscaler.added
        else f"on the {pods_before} serve pods there (an idle one within idleTimeoutSeconds)"
    )
    report_up.notes.append(f"3 replicas RUNNING and Ready {timings['2->3 s']:.1f} s after the PUT, {added}")
    report_down.notes.append(
        f"2 replicas, the idle pod out of rotation {timings['3->2 s']:.1f} s after the PUT"
    )
    record("num_replicas 2 -> 3", report_up)
    record("num_replicas 3 -> 2", report_down)
    zero_failed(report_up, "num_replicas 2 -> 3")
    zero_failed(report_down, "num_replicas 3 -> 2")
    # The autoscaler removes idle workers beyond minReplicas after idleTimeoutSeconds; here at once, gracefully.
    idle = [name for name in env.cluster.serve_pods() if not env.balancer.backends[name].ready]
    assert len(idle) == len(env.cluster.serve_pods()) - 2, {
        n: b.ready for n, b in env.balancer.backends.items()
    }
    for name in idle:
        env.cluster.delete_pod(name)


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
    backend = env.balancer.backends[victim]
    at_kill: dict[str, float] = {}

    def kill() -> None:
        at_kill.update(in_flight=backend.active, unanswered=backend.unanswered, refused=backend.refused)
        env.cluster.kill_pod(victim)
        wait_for(
            lambda: victim not in {b.pod for b in env.balancer.in_rotation()}, 10, "the pod out of rotation"
        )
        env.cluster.remove_pod(victim)
        env.cluster.start_pod("serve")  # the RayCluster controller recreates the pod

    report = under_load(env, kill, lambda: replicas(env) == 2 and ready_backends(env) == 2, 180)
    dropped = backend.unanswered - at_kill["unanswered"]
    refused = backend.refused - at_kill["refused"]
    report.notes.append(
        f"{at_kill['in_flight']:.0f} requests in flight on the pod at the kill, {dropped:.0f} of its connections "
        f"dropped unanswered while it died, {refused:.0f} refused by it before it left the rotation"
    )
    record("serve worker killed abruptly", report)
    assert not report.timeouts, f"requests unanswered within the client timeout: {report.line()}"
    # Bound: what the killed pod held or was sent before it left the rotation (connections it dropped while its
    # processes died, and refused once they were gone), plus one request per client that may have been on the
    # killed replica through the other pod's proxy. Everything else must succeed.
    bound = refused + dropped + CLIENTS
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
