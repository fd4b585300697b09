"""A local stand-in for the KubeRay operator: a RayJob's or RayService's RayCluster as `ray start` processes.

Each pod of the manifest becomes a `ray start --block` process, as in KubeRay's containers: the head with its
``rayStartParams``, each worker replica joining the head's GCS, every node with the Ray container's ``env``,
the operator's token authentication (``RAY_AUTH_MODE``/``RAY_AUTH_TOKEN``) and the persistent volume's mount
path mapped to a local folder. The CPUs are scaled down by one factor so that the cluster fits this machine.
The operator's calls are the same: ``ray job submit`` as the RayJob submitter runs it, and the Serve config
PUT to the dashboard as the RayService controller does.

Every process carries an environment marker; ``stop()`` ends them all and reports any that survive.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.kuberay_manifests import ROOT, cluster_spec, cpus, groups

MARKER = "KUBERAY_EMULATION_ID"
TERMINAL_JOB_STATES = {"SUCCEEDED", "FAILED", "STOPPED"}
OBJECT_STORE_BYTES = 200 * 1024 * 1024  # per node; the model and checkpoints are small


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_in_use(port: int) -> bool:
    """Whether something accepts connections on ``port`` of this machine."""
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_port_free(port: int, timeout_s: float = 60) -> bool:
    """Wait until ``port`` is free (another server on this machine may hold it for a while)."""
    deadline = time.monotonic() + timeout_s
    while port_in_use(port):
        if time.monotonic() > deadline:
            return False
        time.sleep(2)
    return True


def submission_id(name: str) -> str:
    """A Ray submission id like KubeRay's: ``<rayjob name>-<5 random characters>``."""
    return f"{name}-{secrets.token_hex(3)[:5]}"


@dataclass(frozen=True)
class NodeSpec:
    """One pod: its group, the ``ray start`` parameters and the container environment."""

    group: str
    params: dict[str, str]
    env: dict[str, str]


def map_path(value: str, volumes: dict[str, Path]) -> str:
    """``value`` with a volume's mount path replaced by the local folder that stands in for it."""
    for mount, local in volumes.items():
        if value == mount or value.startswith(mount.rstrip("/") + "/"):
            return str(local) + value[len(mount.rstrip("/")) :]
    return value


class EmulatedCluster:
    """The RayCluster of a RayJob (``rayClusterSpec``) or RayService (``rayClusterConfig``), run locally.

    ``volumes`` maps each mount path of the manifest (e.g. ``/mnt/model``) to a local folder; ``cpu_budget``
    is how many CPUs the whole cluster may advertise. Use as a context manager or call start()/stop().
    """

    def __init__(self, doc: dict[str, Any], volumes: dict[str, Path], cpu_budget: int = 2) -> None:
        self.doc = doc
        self.spec = cluster_spec(doc)
        self.volumes = volumes
        self.token = secrets.token_urlsafe(32)  # the operator's per-cluster Secret
        self.token_auth = self.spec.get("authOptions", {}).get("mode") == "token"
        total = sum(self._replicas(name, group) * self._declared_cpus(group) for name, group in groups(doc))
        self.cpu_factor = min(1.0, cpu_budget / total) if total else 1.0
        self.root: Path | None = None  # the nodes' folders and logs, made by start()
        self.marker = secrets.token_hex(8)
        self.keep_logs = False  # set when a node died: its logs explain why
        self.procs: list[tuple[NodeSpec, subprocess.Popen, Path]] = []  # by node index
        self.dashboard_url = ""
        self.gcs_address = ""

    # ------------------------------------------------------------------------------------------ shape

    @staticmethod
    def _declared_cpus(group: dict[str, Any]) -> int:
        """CPUs the pod advertises to Ray: ``num-cpus`` if given, else the container's CPU limit."""
        params = group.get("rayStartParams", {})
        return (
            int(params["num-cpus"])
            if "num-cpus" in params
            else cpus(group["template"]["spec"]["containers"][0])
        )

    @staticmethod
    def _replicas(name: str, group: dict[str, Any]) -> int:
        """Pods of a group: one head, ``replicas`` workers (fixed here: no autoscaler runs)."""
        return 1 if name == "head" else int(group["replicas"])

    def scale_cpus(self, value: float) -> float:
        """A CPU quantity of the manifest (pod, Ray Train worker, Serve replica) scaled like the nodes."""
        return value * self.cpu_factor

    def nodes(self) -> list[NodeSpec]:
        """The head, then one node per worker replica, with scaled CPUs."""
        specs = []
        for name, group in groups(self.doc):
            params = {**group.get("rayStartParams", {})}
            declared = self._declared_cpus(group)
            params["num-cpus"] = str(max(1, int(self.scale_cpus(declared))) if declared else 0)
            container = group["template"]["spec"]["containers"][0]
            env = {
                e["name"]: map_path(e["value"], self.volumes)
                for e in container.get("env", [])
                if "value" in e
            }
            specs += [NodeSpec(name, params, env)] * self._replicas(name, group)
        return specs

    def cluster_cpus(self) -> float:
        """CPUs of the emulated cluster (what Ray can schedule work on)."""
        return sum(float(node.params["num-cpus"]) for node in self.nodes())

    # ------------------------------------------------------------------------------------- lifecycle

    def base_env(self) -> dict[str, str]:
        """A container's environment: the image's PATH and packages, the operator's auth variables."""
        env = {
            "PATH": os.pathsep.join(
                [str(Path(sys.executable).parent), os.environ.get("PATH", "/usr/bin:/bin")]
            ),
            "HOME": os.environ.get("HOME", "/root"),
            "PYTHONPATH": str(ROOT),  # the image has the package installed
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token" if self.token_auth else "disabled",
            MARKER: self.marker,
        }
        if self.token_auth:
            env["RAY_AUTH_TOKEN"] = self.token
        return env

    @property
    def headers(self) -> dict[str, str]:
        """What the operator sends to the dashboard (KubeRay v1.7.0
        ray-operator/controllers/ray/utils/dashboardclient/dashboard_httpclient.go:55-59)."""
        return {"x-ray-authorization": f"Bearer {self.token}"} if self.token_auth else {}

    def _launch(self, node: NodeSpec, index: int, root: Path) -> None:
        """Start (or restart) node ``index`` with ``ray start --block``."""
        temp_dir = root / f"{index}-{node.group}"  # a pod's own filesystem: sockets and logs
        args = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats"]
        args += [f"--{key}={value}" for key, value in node.params.items()]
        args += [
            f"--temp-dir={temp_dir}",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            # Side ports explicit: defaults like 52365 clash between nodes on one machine, and for the ones
            # given the raylet does not wait for its agents to report them (15 s at most, then it aborts).
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
        ]
        if node.group == "head":
            gcs_port, dashboard_port = free_port(), free_port()
            args += [
                "--head",
                f"--port={gcs_port}",
                f"--dashboard-port={dashboard_port}",
                f"--ray-client-server-port={free_port()}",
            ]
            self.gcs_address = f"127.0.0.1:{gcs_port}"
            self.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        else:
            args.append(f"--address={self.gcs_address}")
        log_path = root / f"{index}-{node.group}.log"
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(
                args,
                env={**self.base_env(), **node.env},
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=root,
            )
        if index < len(self.procs):
            self.procs[index] = (node, proc, log_path)
        else:
            self.procs.append((node, proc, log_path))

    def check_alive(self) -> None:
        """Fail with the node's log if a `ray start` process has exited."""
        for node, proc, log_path in self.procs:
            if proc.poll() is not None:
                self.keep_logs = True
                pytest.fail(
                    f"ray start ({node.group}) exited {proc.returncode} (logs in {log_path.parent}):\n"
                    + log_path.read_text()[-3000:]
                )

    def start(self, timeout_s: float = 600) -> None:
        """Start the head, then the workers, each once the previous node is alive."""
        head, *workers = self.nodes()
        root = self.root = self.root or Path(tempfile.mkdtemp(prefix="kr-", dir="/tmp"))  # short socket paths
        deadline = time.monotonic() + timeout_s
        # One node at a time: workers look the head's node up in the GCS when they join, and nodes starting
        # together slow each other down (see _wait_alive).
        for index, node in enumerate([head, *workers]):
            self._launch(node, index, root)
            self._wait_alive(index + 1, deadline, root)

    def _wait_alive(self, count: int, deadline: float, root: Path) -> None:
        """Wait until ``count`` nodes are alive, restarting any node whose ``ray start`` failed meanwhile, as
        the kubelet restarts a failed container: on a busy machine a node's Ray agents can miss the raylet's
        fixed start-up window (15 s), and the raylet aborts."""
        while (alive := self.alive_nodes()) < count:
            for index, (node, proc, _) in enumerate(self.procs):
                if proc.poll() is not None:
                    with suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)  # what the failed `ray start` left behind
                    self._launch(node, index, root)
            if time.monotonic() > deadline:
                self.keep_logs = True
                pytest.fail(f"{alive} of {count} nodes up in time; logs in {root}")
            time.sleep(1)

    def alive_nodes(self) -> int:
        """Nodes the GCS reports ALIVE."""
        with suppress(httpx.HTTPError, ValueError, KeyError):
            response = httpx.get(f"{self.dashboard_url}/api/v0/nodes", headers=self.headers, timeout=10)
            return sum(n["state"] == "ALIVE" for n in response.json()["data"]["result"]["result"])
        return 0

    def own_processes(self) -> list[psutil.Process]:
        """Every live process of this cluster (found by the marker in its environment)."""
        found = []
        for proc in psutil.process_iter():
            with suppress(psutil.Error):
                if proc.environ().get(MARKER) == self.marker and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
        return found

    def stop(self, timeout_s: float = 15) -> list[str]:
        """Stop every process of the cluster: SIGTERM, then SIGKILL after a grace period, as for a pod.

        Returns the processes still alive after that (none is expected)."""
        for _, proc, _ in self.procs:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for _, proc, _ in self.procs:
            with suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
        for _, proc, _ in self.procs:
            with suppress(ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        left = self.own_processes()
        for proc in left:
            with suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(left, timeout=10)
        self.procs = []
        return [f"{p.pid} {' '.join(p.cmdline())[:200]}" for p in self.own_processes()]

    def __enter__(self) -> EmulatedCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        survivors = self.stop()
        assert not survivors, f"processes left after stopping the cluster: {survivors}"
        failed = exc_type is not None and not issubclass(exc_type, pytest.skip.Exception)
        if self.root and not (failed or self.keep_logs):  # after a failure the logs stay for a look
            shutil.rmtree(self.root, ignore_errors=True)

    # ---------------------------------------------------------------------------- operator's calls

    def submit_job(self, job_id: str, entrypoint: str, runtime_env: dict[str, Any]) -> None:
        """Submit as KubeRay's K8sJobMode submitter does: ``ray job submit --no-wait ... -- <entrypoint>``."""
        command = [
            *(sys.executable, "-m", "ray.scripts.scripts", "job", "submit"),
            f"--address={self.dashboard_url}",
            "--no-wait",
            f"--submission-id={job_id}",
            f"--runtime-env-json={json.dumps(runtime_env)}",
            "--",
            *shlex.split(entrypoint),
        ]
        done = subprocess.run(command, env=self.base_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"ray job submit failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"

    def wait_job(self, job_id: str, timeout_s: float) -> tuple[str, str]:
        """Poll the Jobs API until the job is terminal; returns (status, driver logs)."""
        deadline = time.monotonic() + timeout_s
        status = ""
        with httpx.Client(base_url=self.dashboard_url, headers=self.headers, timeout=30) as http:
            while time.monotonic() < deadline:
                with suppress(httpx.HTTPError):
                    status = http.get(f"/api/jobs/{job_id}").json()["status"]
                if status in TERMINAL_JOB_STATES:
                    break
                self.check_alive()
                time.sleep(2)
            logs = http.get(f"/api/jobs/{job_id}/logs")
        return status or "UNKNOWN", logs.json()["logs"] if logs.status_code == 200 else logs.text

    def deploy_serve(self, config: dict[str, Any]) -> httpx.Response:
        """PUT the Serve config to the dashboard, as the RayService controller does with serveConfigV2."""
        return httpx.put(
            f"{self.dashboard_url}/api/serve/applications/", json=config, headers=self.headers, timeout=120
        )

    def wait_serve_running(self, names: list[str], timeout_s: float) -> None:
        """Poll ``GET /api/serve/applications/`` until every application is RUNNING."""
        deadline = time.monotonic() + timeout_s
        details: dict[str, Any] = {}
        while time.monotonic() < deadline:
            with suppress(httpx.HTTPError, ValueError):
                details = httpx.get(
                    f"{self.dashboard_url}/api/serve/applications/", headers=self.headers, timeout=30
                ).json()
            apps = details.get("applications", {})
            failed = {n: a["message"] for n, a in apps.items() if a["status"] == "DEPLOY_FAILED"}
            assert not failed, f"Serve applications failed: {failed}"
            if all(apps.get(name, {}).get("status") == "RUNNING" for name in names):
                return
            self.check_alive()
            time.sleep(2)
        pytest.fail(f"Serve applications {names} not RUNNING in {timeout_s} s: {json.dumps(details)[-3000:]}")
