"""The RayService's RayCluster with every pod on its own emulated host (see tests/pod_network.py).

What the KubeRay v1.7.0 operator and kubelet do, and where (``KR:`` = ray-project/kuberay v1.7.0, under
ray-operator/; see also the reference notes on KubeRay HA):

- Each pod's container runs ``/bin/bash -c -- "ulimit -n 65536; ray start ..."`` with the group's
  ``rayStartParams`` plus the ones the operator adds: ``--block``, ``--metrics-export-port=8080``,
  ``--dashboard-agent-listen-port=52365``, on the head ``--head --dashboard-host=0.0.0.0`` (and ``--no-monitor``
  with in-tree autoscaling), on workers ``--address=<head-svc>:6379``; ``--num-cpus``/``--memory`` from the
  container limits unless given (KR:controllers/ray/common/pod.go, generateRayStartCommand /
  setMissingRayStartParams). The emulation adds ``--node-ip-address`` (the pod has no default route to find its
  address by), ``--temp-dir`` and a small ``--object-store-memory`` (all pods share this host's /dev/shm).
- Env: the container's ``env``, ``RAY_AUTH_MODE=token``/``RAY_AUTH_TOKEN`` (KR:common/pod.go:387-425); with GCS
  fault tolerance ``RAY_REDIS_ADDRESS``, ``REDIS_PASSWORD``, ``RAY_external_storage_namespace`` and
  ``--redis-password=$REDIS_PASSWORD`` on the head (KR:common/pod.go:117-159) and
  ``RAY_gcs_rpc_server_reconnect_timeout_s=600`` on workers (KR:common/pod.go:93-102, utils/constant.go:302).
- Mounts: the container's ``volumeMounts`` at their ``mountPath``, read-only where ``readOnly`` says so.
- The dashboard calls carry ``x-ray-authorization: Bearer <token>``
  (KR:controllers/ray/utils/dashboardclient/dashboard_httpclient.go:55-59): the Serve config ``PUT
  /api/serve/applications/`` with ``serveConfigV2`` as JSON (same file :22-24,62-87;
  rayservice_controller.go:1572-1615) and the status ``GET /api/serve/applications/?api_type=declarative``
  (dashboard_httpclient.go:99-136; rayservice_controller.go:1846-1893), ready when every app is RUNNING
  (:1873-1891). With ``excludeHeadPodFromServeSvc`` the head proxy's /-/healthz is not polled
  (rayservice_controller.go:2074-2118), and the head is no endpoint of the serve Service.
- Deleting a pod (kubelet): the pod leaves the Service's endpoints, its ``preStop`` hook runs, then SIGTERM to the
  container's main process, SIGKILL to all of it after ``terminationGracePeriodSeconds`` (default 30).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.kuberay_manifests import ROOT, cluster_spec, groups, load_yaml
from tests.pod_network import LoadBalancer, Pod, PodNetwork, kill_namespace, netns_pids

log = logging.getLogger(__name__)

GCS_PORT = 6379
DASHBOARD_PORT = 8265
METRICS_PORT = 8080  # KR:controllers/ray/utils/constant.go DefaultMetricsPort
AGENT_PORT = 52365  # KR: DefaultDashboardAgentListenPort
OBJECT_STORE_BYTES = 150 * 1024 * 1024
DEFAULT_GRACE_S = 30  # Kubernetes' terminationGracePeriodSeconds default
REDIS_MANIFEST = ROOT / "kuberay" / "serving" / "redis.yaml"


def memory_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (``4Gi``, ``512Mi``) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9}
    for unit, factor in units.items():
        if quantity.endswith(unit):
            return int(float(quantity[: -len(unit)]) * factor)
    return int(quantity)


def command_line(pid: int) -> str:
    """The start of a process's command line ("" once it is gone)."""
    try:
        return b" ".join(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")).decode(errors="replace")[
            :120
        ]
    except OSError:
        return ""


@dataclass
class RunningPod:
    """A pod of the cluster: its group, namespace and container process."""

    group: str
    pod: Pod
    proc: subprocess.Popen
    log_path: Path


class PodCluster:
    """A RayService's (``rayClusterConfig``) or RayJob's (``rayClusterSpec``) RayCluster, one network namespace
    per pod.

    ``volume`` is the host folder behind the manifest's model volume. With a ``balancer`` (a RayService), the
    workers' addresses are its endpoints; the head is not (``excludeHeadPodFromServeSvc``).
    """

    def __init__(
        self,
        doc: dict[str, Any],
        volume: Path,
        network: PodNetwork,
        balancer: LoadBalancer | None = None,
        name: str = "",
    ) -> None:
        self.doc = doc
        self.name = name  # prefix of the pod names: two clusters share one network (a RayJob's: "job")
        self.spec = cluster_spec(doc)
        self.volume = volume
        self.network = network
        self.balancer = balancer
        self.groups = dict(groups(doc))
        self.token = secrets.token_urlsafe(32)  # the operator's per-cluster Secret (key auth_token)
        self.uid = secrets.token_hex(8)  # the RayCluster's UID: RAY_external_storage_namespace
        self.redis_password = secrets.token_hex(12)
        self.gcs_ft = "gcsFaultToleranceOptions" in self.spec
        self.root = Path(f"/tmp/{network.prefix}")
        self.root.mkdir(exist_ok=True)
        self.pods: dict[str, RunningPod] = {}
        self.head_address = ""
        self.redis_address = ""
        self._count = 0
        self.killed_after_grace: list[str] = []  # processes the last delete_pod() had to SIGKILL

    # ------------------------------------------------------------------------------------- operator

    @property
    def headers(self) -> dict[str, str]:
        """The operator's dashboard headers (dashboard_httpclient.go:55-59)."""
        return {"x-ray-authorization": f"Bearer {self.token}"}

    @property
    def dashboard(self) -> str:
        """``http://<head-svc>:8265``."""
        return f"http://{self.head_address}:{DASHBOARD_PORT}"

    def put_serve_config(self, config: dict[str, Any]) -> httpx.Response:
        """The operator's deploy call: ``serveConfigV2`` as JSON."""
        return httpx.put(
            f"{self.dashboard}/api/serve/applications/",
            content=json.dumps(config),
            headers={**self.headers, "Content-Type": "application/json"},
            timeout=60,
        )

    def serve_status(self) -> dict[str, Any]:
        """The operator's status call."""
        response = httpx.get(
            f"{self.dashboard}/api/serve/applications/?api_type=declarative", headers=self.headers, timeout=10
        )
        response.raise_for_status()
        return response.json()

    def wait_running(self, timeout_s: float) -> dict[str, Any]:
        """Poll the status until every application is RUNNING (rayservice_controller.go:1873-1891)."""
        deadline = time.monotonic() + timeout_s
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            with suppress(httpx.HTTPError, ValueError):
                status = self.serve_status()
                apps = status.get("applications", {})
                failed = {n: a.get("message") for n, a in apps.items() if a["status"] == "DEPLOY_FAILED"}
                if failed:
                    raise AssertionError(f"Serve applications failed: {failed}")
                if apps and all(a["status"] == "RUNNING" for a in apps.values()):
                    return status
            self.check_alive()
            time.sleep(2)
        raise AssertionError(f"Serve not RUNNING in {timeout_s} s: {json.dumps(status)[-2000:]}")

    def running_replicas(self, app: str, deployment: str) -> list[dict[str, Any]]:
        """The deployment's RUNNING replicas (with their node ids)."""
        details = httpx.get(
            f"{self.dashboard}/api/serve/applications/", headers=self.headers, timeout=10
        ).json()
        replicas = details["applications"][app]["deployments"][deployment]["replicas"]
        return [r for r in replicas if r["state"] == "RUNNING"]

    def alive_nodes(self) -> int:
        """Nodes the GCS reports ALIVE."""
        with suppress(httpx.HTTPError, ValueError, KeyError):
            response = httpx.get(f"{self.dashboard}/api/v0/nodes", headers=self.headers, timeout=10)
            return sum(n["state"] == "ALIVE" for n in response.json()["data"]["result"]["result"])
        return 0

    # ------------------------------------------------------------------------------------------ pods

    def ray_start_line(self, group: str, address: str) -> str:
        """The container's command line as the operator builds it, plus the emulation's additions."""
        spec = self.groups[group]
        container = spec["template"]["spec"]["containers"][0]
        params = {key: str(value) for key, value in spec.get("rayStartParams", {}).items()}
        limits = container.get("resources", {}).get("limits", {})
        params.setdefault("num-cpus", str(int(float(limits.get("cpu", 1)))))
        if "memory" in limits:
            params.setdefault("memory", str(memory_bytes(limits["memory"])))
        params.setdefault("metrics-export-port", str(METRICS_PORT))
        params.setdefault("dashboard-agent-listen-port", str(AGENT_PORT))
        if group == "head":
            params.setdefault("dashboard-host", "0.0.0.0")
            if self.spec.get("enableInTreeAutoscaling"):
                params["no-monitor"] = "true"
            if self.gcs_ft:
                params["redis-password"] = "$REDIS_PASSWORD"
        else:
            params.setdefault("address", f"{self.head_address}:{GCS_PORT}")
        flags = " ".join(
            f"--{key}"
            if value == "true"
            else f"--{key}={value if value.startswith('$') else shlex.quote(value)}"
            for key, value in params.items()
        )
        extra = (
            f"--node-ip-address={address} --temp-dir={self.root}/{self.name}{self._count}-{group} "
            f"--object-store-memory={OBJECT_STORE_BYTES} --disable-usage-stats"
        )
        return f"ulimit -n 65536; ray start {'--head ' if group == 'head' else ''}--block {flags} {extra}"

    def pod_env(self, group: str) -> dict[str, str]:
        """The container's environment with the operator's additions."""
        container = self.groups[group]["template"]["spec"]["containers"][0]
        env = {
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), "/usr/sbin:/usr/bin:/sbin:/bin"]),
            "HOME": os.environ.get("HOME", "/root"),
            "PYTHONPATH": str(ROOT),  # the image has the package installed
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            # ray.init() inside the cluster (KR:common/pod.go setContainerEnvVars): 127.0.0.1:6379 on the head,
            # <head-svc>:6379 on workers; here the head's address everywhere (the pods share one PID namespace,
            # where Ray's address="auto" would find every cluster's GCS).
            "RAY_ADDRESS": f"{self.head_address}:{GCS_PORT}",
            **{e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e},
        }
        if self.doc["kind"] == "RayService":
            # "to improve service SLA" (KR:common/pod.go setContainerEnvVars): a request to a dead actor fails at
            # once instead of waiting up to 60 s for its death info. The operator's 5 s GCS and Serve KV timeouts
            # are left out: with every pod on two shared cores, the one autoscaling run with them saw connection
            # resets for 11 s while the third pod joined under load; the runs without them saw none.
            env |= {"RAY_timeout_ms_task_wait_for_death_info": "0"}
        if self.gcs_ft and group == "head":
            env |= {
                "RAY_REDIS_ADDRESS": f"{self.redis_address}:6379",
                "REDIS_PASSWORD": self.redis_password,
                "RAY_external_storage_namespace": self.uid,
            }
        elif self.gcs_ft:
            env["RAY_gcs_rpc_server_reconnect_timeout_s"] = "600"
        return env

    def mounts(self, group: str) -> list[tuple[Path, str, bool]]:
        """(host folder, mount path, read-only) of the container's volume mounts."""
        pod_spec = self.groups[group]["template"]["spec"]
        read_only_claims = {
            v["name"]
            for v in pod_spec.get("volumes", [])
            if v.get("persistentVolumeClaim", {}).get("readOnly")
        }
        return [
            (self.volume, m["mountPath"], bool(m.get("readOnly")) or m["name"] in read_only_claims)
            for m in pod_spec["containers"][0].get("volumeMounts", [])
        ]

    def start_pod(self, group: str, address: str = "") -> RunningPod:
        """Create a pod of ``group`` (a new namespace) and start its container."""
        self._count += 1
        name = f"{self.name}{group}-{self._count}"
        pod = self.network.add_pod(name, address)
        if group == "head":
            self.head_address = pod.address
        line = self.ray_start_line(group, pod.address)
        argv = self.network.command(pod, ["/bin/bash", "-c", "--", line], self.mounts(group))
        log_path = self.root / f"{name}.log"
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                argv,
                env=self.pod_env(group),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
                start_new_session=True,  # a pod's own process group: Ray's reaper signals its whole group
            )
        running = self.pods[name] = RunningPod(group, pod, proc, log_path)
        if group != "head" and self.balancer:
            self.balancer.add(name, pod.address)
        log.info("pod %s at %s: %s", name, pod.address, line)
        return running

    def start_redis(self) -> None:
        """Redis of kuberay/serving/redis.yaml in its own pod: its args, the password, append-only data."""
        (deployment,) = [
            d for d in yaml.safe_load_all(REDIS_MANIFEST.read_text()) if d["kind"] == "Deployment"
        ]
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        data = self.root / "redis-data"
        data.mkdir(exist_ok=True)
        args = [
            {"$(REDIS_PASSWORD)": self.redis_password, "/data": str(data)}.get(a, a)
            for a in container["args"]
        ]
        pod = self.network.add_pod("redis")
        self.redis_address = pod.address
        out = open(self.root / "redis.log", "ab")  # noqa: SIM115 - closed with the process
        self.pods["redis"] = RunningPod(
            "redis",
            pod,
            subprocess.Popen(
                self.network.command(pod, ["redis-server", *args], []),
                stdout=out,
                stderr=out,
                start_new_session=True,
            ),
            self.root / "redis.log",
        )

    def start(self, timeout_s: float = 300) -> None:
        """Redis (with GCS fault tolerance), the head, then each worker once the previous node is alive."""
        deadline = time.monotonic() + timeout_s
        if self.gcs_ft:
            self.start_redis()
        self.start_pod("head")
        self.wait_nodes(1, deadline)
        for name, group in self.groups.items():
            if name != "head":
                for _ in range(int(group["replicas"])):
                    self.start_pod(name)
                    self.wait_nodes(self.alive_nodes() + 1, deadline)
        # The operator calls the dashboard only once the pods are Ready (rayservice_controller.go:1998; a RayJob
        # submits once the RayCluster's state is ready, i.e. every pod Running and Ready).
        for running in self.pods.values():
            if running.group != "redis":
                self.wait_pod_ready(running, deadline)

    @staticmethod
    def pod_ready(running: RunningPod) -> bool:
        """The injected readiness probe of a Ray container (Ray >= 2.53: ``httpGet :52365/api/healthz``;
        KR:controllers/ray/common/pod.go, initLivenessAndReadinessProbe / supportsUnifiedHealthCheck). The
        RayService's serve workers add Serve's /-/healthz: that part is the balancer's probe."""
        with suppress(httpx.HTTPError):
            return (
                httpx.get(f"http://{running.pod.address}:{AGENT_PORT}/api/healthz", timeout=2).status_code
                == 200
            )
        return False

    def wait_pod_ready(self, running: RunningPod, deadline: float) -> None:
        """Wait until ``running`` passes its readiness probe."""
        while not self.pod_ready(running):
            self.check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"pod {running.pod.name} not Ready in time; logs in {self.root}")
            time.sleep(1)

    def wait_nodes(self, count: int, deadline: float) -> None:
        """Wait until at least ``count`` nodes are ALIVE."""
        while self.alive_nodes() < count:
            self.check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"fewer than {count} nodes alive in time; logs in {self.root}")
            time.sleep(1)

    def check_alive(self) -> None:
        """Fail with its log if a pod's container has exited (a submitter may finish)."""
        for name, running in list(self.pods.items()):  # a pod may be deleted meanwhile (another thread)
            if running.group != "submitter" and running.proc.poll() is not None:
                tail = running.log_path.read_text(errors="replace")[-3000:]
                raise AssertionError(f"pod {name} exited {running.proc.returncode}:\n{tail}")

    def serve_pods(self) -> list[str]:
        """The names of the running serve worker pods."""
        return [name for name, p in self.pods.items() if p.group not in ("head", "redis", "submitter")]

    def delete_pod(self, name: str) -> float:
        """Delete a pod as the kubelet does (endpoint removal, preStop, SIGTERM, grace period, SIGKILL).

        Returns the seconds until every process of the pod was gone."""
        running = self.pods.pop(name)
        pod_spec = self.groups[running.group]["template"]["spec"] if running.group in self.groups else {}
        grace = float(pod_spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE_S))
        started = time.monotonic()
        if self.balancer:
            self.balancer.terminating(name)
        pre_stop = pod_spec.get("containers", [{}])[0].get("lifecycle", {}).get("preStop", {})
        if "exec" in pre_stop:
            with suppress(subprocess.TimeoutExpired):
                subprocess.run(
                    ["ip", "netns", "exec", running.pod.namespace, *pre_stop["exec"]["command"]],
                    env=self.pod_env(running.group),
                    timeout=grace,
                    check=False,
                )
        with suppress(ProcessLookupError):
            running.proc.send_signal(signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            running.proc.wait(max(0.1, grace - (time.monotonic() - started)))
        while netns_pids(running.pod.namespace) and time.monotonic() - started < grace:
            time.sleep(0.2)
        took = time.monotonic() - started
        self.killed_after_grace = [command_line(pid) for pid in netns_pids(running.pod.namespace)]
        self._remove(name, running)
        return took

    def kill_pod(self, name: str) -> None:
        """Every process of the pod killed at once (SIGKILL), as when it crashes or the kernel's OOM killer
        strikes: its address stays (connections to it are refused) until the pod is deleted; the kubelet reports
        it NotReady at its next relist."""
        kill_namespace(self.pods[name].pod.namespace)
        if self.balancer:
            self.balancer.container_exited(name)

    def remove_pod(self, name: str) -> None:
        """Delete a pod whose processes are gone."""
        self._remove(name, self.pods.pop(name))

    def restart_container(self, name: str) -> None:
        """Kill the pod's container and start it again in the same pod (same address), as the kubelet restarts a
        crashed container."""
        running = self.pods[name]
        kill_namespace(running.pod.namespace)
        with suppress(subprocess.TimeoutExpired):
            running.proc.wait(10)
        self._count += 1
        line = self.ray_start_line(running.group, running.pod.address)
        argv = self.network.command(running.pod, ["/bin/bash", "-c", "--", line], self.mounts(running.group))
        with open(running.log_path, "ab") as out:
            running.proc = subprocess.Popen(
                argv,
                env=self.pod_env(running.group),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
                start_new_session=True,
            )

    def _remove(self, name: str, running: RunningPod) -> None:
        kill_namespace(running.pod.namespace)
        with suppress(subprocess.TimeoutExpired):
            running.proc.wait(10)
        self.network.remove_pod(running.pod.name)
        if self.balancer:
            self.balancer.remove(name)

    # ------------------------------------------------------------------------------- RayJob submitter

    def submitter_line(self, job_id: str, entrypoint: str) -> str:
        """The K8sJobMode submitter's command line as KubeRay v1.7.0 builds it for this RayJob
        (KR:controllers/ray/common/job.go:89-212, BuildJobSubmitCommand; run as ``/bin/bash -ce -- <line>``,
        utils/util.go:1005-1013): wait for the dashboard's GCS health, submit unless ``ray job status`` knows
        the id, then follow the logs. ``runtimeEnvYAML`` goes as JSON (sigs.k8s.io/yaml YAMLToJSON: compact,
        keys sorted), quoted with Go's strconv.Quote; no metadata or entrypoint resources in the manifest."""
        spec = self.doc["spec"]
        address = self.dashboard  # status.dashboardURL: <rayjob>-head-svc:8265
        health = (
            'python -c "import urllib.request; '
            f"r=urllib.request.urlopen('{address}/api/gcs_healthz', timeout=10); "
            "exit(0 if b'success' in r.read() else 1)\""
        )
        runtime_env = json.dumps(
            yaml.safe_load(spec["runtimeEnvYAML"]), separators=(",", ":"), sort_keys=True
        )
        waiting = json.dumps(f"Waiting for Ray Dashboard GCS to become healthy at {address} ...")
        return " ".join(
            [
                *("until", health, ">/dev/null", "2>&1", ";", "do", "echo", waiting, ";", "sleep", "2", ";"),
                *("done", ";", "if", "!", "ray", "job", "status", "--address", address, job_id),
                *(
                    ">/dev/null",
                    "2>&1",
                    ";",
                    "then",
                    "ray",
                    "job",
                    "submit",
                    "--address",
                    address,
                    "--no-wait",
                ),
                *("--runtime-env-json", json.dumps(runtime_env), "--submission-id", job_id),
                *("--", entrypoint.strip(), ";", "fi", ";"),
                *("ray", "job", "logs", "--address", address, "--follow", job_id),
            ]
        )

    def start_submitter(self, job_id: str, entrypoint: str) -> RunningPod:
        """The submitter Job's pod: its own namespace running :meth:`submitter_line` with the env the operator
        adds (RAY_DASHBOARD_ADDRESS, RAY_JOB_SUBMISSION_ID, the auth token; KR:common/pod.go:387-425)."""
        name = f"{self.name}submitter"
        pod = self.network.add_pod(name)
        env = {
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), "/usr/sbin:/usr/bin:/sbin:/bin"]),
            "HOME": os.environ.get("HOME", "/root"),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_DASHBOARD_ADDRESS": f"{self.head_address}:{DASHBOARD_PORT}",
            "RAY_JOB_SUBMISSION_ID": job_id,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
        }
        line = self.submitter_line(job_id, entrypoint)
        log_path = self.root / f"{name}.log"
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                self.network.command(pod, ["/bin/bash", "-ce", "--", line], []),
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
                start_new_session=True,
            )
        running = self.pods[name] = RunningPod("submitter", pod, proc, log_path)
        log.info("submitter pod at %s: %s", pod.address, line)
        return running

    def job_status(self, job_id: str) -> str:
        """The operator's job poll: ``GET /api/jobs/<id>`` (KR:utils/dashboardclient/dashboard_httpclient.go:26,
        152-184, GetJobInfo); "" while the dashboard does not know it or does not answer."""
        with suppress(httpx.HTTPError, ValueError, KeyError):
            response = httpx.get(f"{self.dashboard}/api/jobs/{job_id}", headers=self.headers, timeout=10)
            return response.json()["status"] if response.status_code == 200 else ""
        return ""

    def delete(self) -> None:
        """Delete every pod of the cluster and its namespace (a RayJob's cluster after the job)."""
        for name in list(self.pods):
            self._remove(name, self.pods.pop(name))

    def stop(self) -> None:
        """Kill every pod (the network's close() removes the namespaces)."""
        for name in list(self.pods):
            running = self.pods.pop(name)
            kill_namespace(running.pod.namespace)
            with suppress(subprocess.TimeoutExpired):
                running.proc.wait(10)


def rayservice_doc() -> dict[str, Any]:
    """kuberay/serving/ray-service.mnist.yaml."""
    return load_yaml(ROOT / "kuberay" / "serving" / "ray-service.mnist.yaml")


def serve_readiness(doc: dict[str, Any], group: str = "serve") -> tuple[float, int]:
    """(periodSeconds, failureThreshold) of a RayService worker group's readiness probe: the manifest's own if
    it sets one, else the one KubeRay injects (period 5 s, failureThreshold 1: KR:common/pod.go:816-826,
    utils/constant.go DefaultReadinessProbePeriodSeconds, ServeReadinessProbeFailureThreshold). The manifest's
    probe must check what KubeRay's does (the raylet, then Serve's /-/healthz): that is what the balancer runs."""
    container = dict(groups(doc))[group]["template"]["spec"]["containers"][0]
    probe = container.get("readinessProbe")
    if not probe:
        return 5.0, 1
    command = " ".join(probe["exec"]["command"])
    assert "52365/api/local_raylet_healthz" in command and "8000/-/healthz" in command, command
    return float(probe.get("periodSeconds", 10)), int(probe.get("failureThreshold", 3))


def rayjob_doc() -> dict[str, Any]:
    """kuberay/training/ray-job.mnist-train.yaml."""
    return load_yaml(ROOT / "kuberay" / "training" / "ray-job.mnist-train.yaml")


class Autoscaler:
    """The in-tree autoscaler's scale-up for the serve group, in a thread: each Serve replica needs 1 Ray CPU and
    each serve worker pod advertises 1, so while the deployment's target replica count exceeds the serve pods a
    pod is added (up to the group's ``maxReplicas``), as the Ray autoscaler does for the pending replica actor.
    Scale-down of idle pods (``idleTimeoutSeconds``) is left to the caller."""

    def __init__(self, cluster: PodCluster, app: str, deployment: str, period_s: float = 1.0) -> None:
        self.cluster = cluster
        self.app, self.deployment = app, deployment
        self.period_s = period_s
        self.added: list[str] = []
        self.error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="autoscaler", daemon=True)

    def target(self) -> int:
        """The deployment's target replica count (0 while the dashboard does not answer)."""
        with suppress(httpx.HTTPError, ValueError, KeyError):
            details = httpx.get(
                f"{self.cluster.dashboard}/api/serve/applications/", headers=self.cluster.headers, timeout=10
            ).json()
            return int(
                details["applications"][self.app]["deployments"][self.deployment]["target_num_replicas"]
            )
        return 0

    def _run(self) -> None:
        group = self.cluster.groups["serve"]
        while not self._stop.wait(self.period_s):
            try:
                wanted = min(int(group["maxReplicas"]), self.target())
                if len(self.cluster.serve_pods()) < wanted:
                    self.added.append(self.cluster.start_pod("serve").pod.name)
            except Exception as exc:  # noqa: BLE001 - reported by stop()
                self.error = repr(exc)
                return

    def __enter__(self) -> Autoscaler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self.error, f"the emulated autoscaler failed: {self.error}"
