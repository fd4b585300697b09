"""Pods as separate hosts: network namespaces on a test-made bridge, an L4 load balancer and a steady load.

Each pod is a network namespace ``<prefix>-<pod>`` with one veth link to the bridge ``<prefix>`` and its own
address on a private /24; the host holds the bridge's .1, so the test reaches the pods and nothing else is
routed (no default route inside a pod). A pod's processes run under ``ip netns exec`` + ``unshare -m`` with the
manifest's volume mounts bound into their private mount namespace (read-only where the manifest says so), so
nothing is mounted on the host. Every name starts with :data:`PREFIX`; :func:`remove_leftovers` finds and
removes what an earlier, crashed run left behind.

:class:`LoadBalancer` stands in for a cloud L4 LoadBalancer in front of the serve Service: round-robin over the
Ready endpoints (the serving pods' address on :8000, readiness checked like KubeRay's probe), no retry of a
failed connection. :class:`Load` sends a steady stream of requests through it and counts what clients see.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import re
import secrets
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Coroutine
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

PREFIX = "krpod"  # every namespace and link this module creates; link names stay under 15 characters
SERVE_PORT = 8000
RAYLET_HEALTH = "/api/local_raylet_healthz"  # the dashboard agent's raylet check
KUBELET_RELIST_S = 1.0  # the kubelet notices a container's exit at its next relist (PLEG, each second)


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``ip <args>``."""
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def namespaces_supported() -> str:
    """Why this machine cannot create network namespaces ("" if it can): needs root and iproute2."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    name = f"{PREFIX}probe{secrets.token_hex(2)}"
    try:
        done = ip("netns", "add", name, check=False)
        if done.returncode:
            return f"ip netns add failed: {done.stderr.strip()}"
        return ""
    except FileNotFoundError:
        return "iproute2 (ip) is not installed"
    finally:
        with suppress(FileNotFoundError):
            ip("netns", "del", name, check=False)


def netns_pids(namespace: str) -> list[int]:
    """Every process inside network namespace ``namespace``."""
    done = ip("netns", "pids", namespace, check=False)
    return [int(pid) for pid in done.stdout.split()]


def kill_namespace(namespace: str, sig: int = signal.SIGKILL, timeout_s: float = 10) -> None:
    """Send ``sig`` to every process of ``namespace``; with SIGKILL, repeat until none is left."""
    deadline = time.monotonic() + timeout_s
    while pids := netns_pids(namespace):
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, sig)
        if sig != signal.SIGKILL or time.monotonic() > deadline:
            return
        time.sleep(0.1)


def remove_leftovers(prefix: str = PREFIX) -> list[str]:
    """Kill the processes of, and delete, every namespace and link named ``prefix*`` (a crashed run's)."""
    removed = []
    for line in ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(prefix):
            kill_namespace(name)
            ip("netns", "del", name, check=False)
            removed.append(name)
    for line in ip("-o", "link", "show", check=False).stdout.splitlines():
        match = re.match(r"\d+: ([^:@]+)", line)
        if match and match.group(1).startswith(prefix):
            ip("link", "del", match.group(1), check=False)
            removed.append(match.group(1))
    return removed


def free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.200.0.0/13 that no interface of this host uses."""
    used = ip("-o", "-4", "addr", "show", check=False).stdout
    for _ in range(100):
        net = ipaddress.ip_network(f"10.{200 + secrets.randbelow(8)}.{secrets.randbelow(256)}.0/24")
        if f" {str(net.network_address).rsplit('.', 1)[0]}." not in used:
            return net
    raise RuntimeError("no free 10.200.0.0/13 subnet")


@dataclass
class Pod:
    """One pod: its network namespace and address."""

    name: str
    namespace: str
    address: str
    link: str


class PodNetwork:
    """A bridge and a namespace per pod. ``close()`` removes every pod, link and process it made."""

    def __init__(self) -> None:
        self.prefix = f"{PREFIX}{secrets.token_hex(2)}"
        self.subnet = free_subnet()
        hosts = list(self.subnet.hosts())
        self.gateway = str(hosts[0])
        self._free = [str(h) for h in hosts[9:200]]
        self.pods: dict[str, Pod] = {}
        self._links = 0
        ip("link", "add", self.prefix, "type", "bridge")
        ip("addr", "add", f"{self.gateway}/24", "dev", self.prefix)
        ip("link", "set", self.prefix, "up")

    def add_pod(self, name: str, address: str = "") -> Pod:
        """A new namespace ``<prefix>-<name>`` on the bridge, at ``address`` (a fresh one if empty)."""
        address = address or self._free.pop(0)
        with suppress(ValueError):
            self._free.remove(address)
        namespace = f"{self.prefix}-{name}"
        self._links += 1
        link = f"{self.prefix}v{self._links}"  # the host side; the pod side is renamed eth0
        ip("netns", "add", namespace)
        ip("link", "add", link, "type", "veth", "peer", "name", f"{link}p")
        ip("link", "set", f"{link}p", "netns", namespace)
        ip("link", "set", link, "master", self.prefix, "up")
        inside = ["netns", "exec", namespace, "ip"]
        ip(*inside, "link", "set", f"{link}p", "name", "eth0")
        ip(*inside, "addr", "add", f"{address}/24", "dev", "eth0")
        ip(*inside, "link", "set", "eth0", "up")
        ip(*inside, "link", "set", "lo", "up")
        pod = self.pods[name] = Pod(name, namespace, address, link)
        return pod

    def remove_pod(self, name: str) -> None:
        """Kill every process of the pod and delete its namespace (its veth link goes with it)."""
        pod = self.pods.pop(name)
        kill_namespace(pod.namespace)
        ip("netns", "del", pod.namespace, check=False)
        ip("link", "del", pod.link, check=False)
        self._free.append(pod.address)

    def command(self, pod: Pod, argv: list[str], mounts: list[tuple[Path, str, bool]]) -> list[str]:
        """``argv`` run inside ``pod``: its network namespace and a private mount namespace holding ``mounts``
        (host folder, mount path, read-only) over a tmpfs on each mount path's parent folder."""
        steps = []
        for source, target, read_only in mounts:
            parent = str(Path(target).parent)
            steps += [
                f"mount -t tmpfs {PREFIX} {shlex.quote(parent)}",
                f"mkdir -p {shlex.quote(target)}",
                f"mount --bind {'-o ro ' if read_only else ''}{shlex.quote(str(source))} {shlex.quote(target)}",
            ]
        script = " && ".join([*steps, 'exec "$@"'])
        return ["ip", "netns", "exec", pod.namespace, "unshare", "-m", "--propagation", "private",
                "sh", "-c", script, "sh", *argv]  # fmt: skip

    def close(self) -> list[str]:
        """Remove every pod and the bridge; returns what was still there afterwards (nothing is expected)."""
        for name in list(self.pods):
            self.remove_pod(name)
        ip("link", "del", self.prefix, check=False)
        return remove_leftovers(self.prefix)


# ------------------------------------------------------------------------------------------- event loop


class LoopThread:
    """An asyncio event loop in a daemon thread (the load balancer and the load run there)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="pods-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        """Stop the loop and its thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


# ----------------------------------------------------------------------------------------- load balancer


async def http_get(host: str, port: int, path: str, timeout_s: float) -> tuple[int, bytes]:
    """One ``GET`` on a fresh connection: (status, body); (0, b"") if the connection failed."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except (TimeoutError, OSError):
        return 0, b""
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(-1), timeout_s)
        head, _, body = raw.partition(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), body
    except (TimeoutError, OSError, ValueError, IndexError):
        return 0, b""
    finally:
        writer.close()


@dataclass
class Backend:
    """An endpoint of the serve Service: a pod's address on :8000."""

    pod: str
    address: str
    ready: bool = False
    terminating: bool = False
    active: int = 0  # client connections piped to it right now
    refused: int = 0  # client connections it refused (closed by the balancer, not retried)
    unanswered: int = 0  # client connections it accepted and closed without sending a byte back
    probe: str = ""  # the last readiness answer
    failures: int = 0  # readiness probes failed in a row
    exited_at: float | None = None  # when the kubelet reports the pod's exited container NotReady


class LoadBalancer:
    """A cloud L4 LoadBalancer over the serve Service's endpoints, on ``127.0.0.1:<port>`` of the host.

    Endpoints are the pods given with :meth:`add`; one is in rotation while Ready and not terminating (a
    terminating pod leaves the Service's endpoints at once). Ready is KubeRay's readiness probe of a RayService
    worker, run from the host every ``probe_period_s`` (KubeRay's periodSeconds 5, utils/constant.go
    DefaultReadinessProbePeriodSeconds); NotReady after ``failure_threshold`` failures in a row (KubeRay's 1,
    ServeReadinessProbeFailureThreshold, unless the manifest sets its own probe), Ready after one success; a pod
    whose container exited is NotReady at the kubelet's next relist, without waiting for the probe. With
    ``raylet_port`` the raylet
    check ``wget -T 2 -q -O- http://localhost:52365/api/local_raylet_healthz | grep success``, then Serve's
    ``wget ... localhost:8000/-/healthz | grep success`` (KubeRay v1.7.0 ray-operator/controllers/ray/common/
    pod.go:816-826, initLivenessAndReadinessProbe; utils/constant.go BaseWgetHealthCommand,
    RayAgentRayletHealthPath, RayServeProxyHealthPath). Each client connection goes to the next
    endpoint in rotation and is piped byte for byte; if that endpoint refuses, the client's connection is
    closed: an L4 balancer never retries a request.
    """

    def __init__(
        self, probe_period_s: float = 5.0, failure_threshold: int = 1, raylet_port: int | None = None
    ) -> None:
        self.backends: dict[str, Backend] = {}
        self.probe_period_s = probe_period_s
        self.failure_threshold = failure_threshold
        self.raylet_port = raylet_port
        self.port = 0
        self._next = 0
        self._server: asyncio.AbstractServer | None = None
        self._prober: asyncio.Task | None = None

    async def start(self) -> None:
        """Listen on a free port of 127.0.0.1 and start probing."""
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self._prober = asyncio.create_task(self._probe_forever())

    async def stop(self) -> None:
        """Stop listening and probing."""
        if self._prober:
            self._prober.cancel()
        if self._server:
            self._server.close()

    def add(self, pod: str, address: str) -> None:
        """A new endpoint (a serving pod); it joins the rotation once its probe succeeds."""
        self.backends[pod] = Backend(pod, address)

    def terminating(self, pod: str) -> None:
        """The pod is being deleted: out of the endpoints at once."""
        if pod in self.backends:
            self.backends[pod].terminating = True

    def remove(self, pod: str) -> None:
        """The pod is gone."""
        self.backends.pop(pod, None)

    def container_exited(self, pod: str) -> None:
        """The pod's container died (the kubelet marks the pod NotReady at its next relist)."""
        if pod in self.backends:
            self.backends[pod].exited_at = time.monotonic() + KUBELET_RELIST_S

    def in_rotation(self) -> list[Backend]:
        """The endpoints new connections go to."""
        now = time.monotonic()
        return [
            b
            for b in self.backends.values()
            if b.ready and not b.terminating and (b.exited_at is None or now < b.exited_at)
        ]

    async def _probe(self, backend: Backend) -> tuple[bool, str]:
        """One readiness probe: (passed, what it answered)."""
        if self.raylet_port:
            status, body = await http_get(backend.address, self.raylet_port, RAYLET_HEALTH, 2.0)
            if not (status == 200 and b"success" in body):
                return False, f"raylet {status} {body[:80]!r}"
        status, body = await http_get(backend.address, SERVE_PORT, "/-/healthz", 2.0)
        return status == 200 and b"success" in body, f"{status} {body[:80]!r}"

    async def _probe_forever(self) -> None:
        while True:
            for backend in list(self.backends.values()):
                passed, backend.probe = await self._probe(backend)
                backend.failures = 0 if passed else backend.failures + 1
                if passed:
                    backend.ready = True
                elif backend.failures >= self.failure_threshold:
                    backend.ready = False
            await asyncio.sleep(self.probe_period_s)

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        backends = self.in_rotation()
        if not backends:
            client_writer.close()
            return
        backend = backends[self._next % len(backends)]
        self._next += 1
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(backend.address, SERVE_PORT), 3)
        except (TimeoutError, OSError):
            backend.refused += 1
            client_writer.close()  # no retry on another endpoint
            return
        backend.active += 1
        answered = False

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, from_backend: bool) -> None:
            nonlocal answered
            with suppress(OSError, ConnectionError):
                while data := await src.read(65536):
                    answered = answered or from_backend
                    dst.write(data)
                    await dst.drain()
            with suppress(OSError, RuntimeError):
                if dst.can_write_eof():
                    dst.write_eof()

        try:
            await asyncio.gather(pipe(client_reader, writer, False), pipe(reader, client_writer, True))
        finally:
            backend.active -= 1
            backend.unanswered += not answered
        writer.close()
        client_writer.close()


# ------------------------------------------------------------------------------------------------- load


@dataclass
class LoadReport:
    """What the clients saw during one scenario."""

    sent: int = 0
    ok: int = 0
    non_2xx: dict[int, int] = field(default_factory=dict)
    connection_errors: int = 0
    timeouts: int = 0  # requests without an answer within the client's timeout (counted in connection_errors)
    longest_gap_s: float = 0.0
    versions: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    examples: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the scenario measured besides the clients

    @property
    def failed(self) -> int:
        """Requests that got no 2xx answer."""
        return self.sent - self.ok

    def line(self) -> str:
        """One line for logs and the bench table."""
        return (
            f"sent {self.sent}, ok {self.ok}, non-2xx {sum(self.non_2xx.values())} {self.non_2xx or ''}, "
            f"connection errors {self.connection_errors}, longest gap without a success "
            f"{self.longest_gap_s:.2f} s over {self.seconds:.0f} s"
        )

    def as_dict(self) -> dict[str, Any]:
        """The report as plain data."""
        return {**self.__dict__, "failed": self.failed}


def multipart_body(name: str, data: bytes, boundary: str = "krpodload") -> tuple[bytes, str]:
    """A ``file`` part as a browser sends it."""
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


class Load:
    """``clients`` concurrent clients POSTing one image to ``/predict`` through the load balancer, each on a
    fresh connection (``Connection: close``) with ``timeout_s`` per request and ``pause_s`` between two
    requests (0: as fast as answers come), until :meth:`stop`."""

    VERSION = re.compile(rb'"model_version"\s*:\s*"([^"]+)"')

    def __init__(
        self, port: int, image: bytes, clients: int = 8, timeout_s: float = 30, pause_s: float = 0.0
    ) -> None:
        body, content_type = multipart_body("zero.png", image)
        self.request = (
            f"POST /predict HTTP/1.1\r\nHost: lb\r\nConnection: close\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        self.port = port
        self.clients = clients
        self.timeout_s = timeout_s
        self.pause_s = pause_s
        self.report = LoadReport()
        self.successes: list[float] = []
        self._running = False
        self._tasks: list[asyncio.Task] = []
        self._started = 0.0

    async def start(self) -> None:
        """Start the clients."""
        self._running = True
        self._started = time.monotonic()
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self.clients)]

    async def stop(self) -> LoadReport:
        """Stop the clients (each finishes its request) and return the report."""
        self._running = False
        await asyncio.gather(*self._tasks)
        end = time.monotonic()
        marks = [self._started, *sorted(self.successes), end]
        self.report.longest_gap_s = max(b - a for a, b in zip(marks, marks[1:], strict=False))
        self.report.seconds = end - self._started
        return self.report

    async def _client(self) -> None:
        while self._running:
            self.report.sent += 1
            status, body, error = await self._one()
            if 200 <= status < 300:
                self.report.ok += 1
                self.successes.append(time.monotonic())
                match = self.VERSION.search(body)
                version = match.group(1).decode() if match else "?"
                self.report.versions[version] = self.report.versions.get(version, 0) + 1
                await asyncio.sleep(self.pause_s)
                continue
            if status:
                self.report.non_2xx[status] = self.report.non_2xx.get(status, 0) + 1
                error = f"{status} {body[:200]!r}"
            else:
                self.report.connection_errors += 1
                self.report.timeouts += error == "timeout"
            if len(self.report.examples) < 10:
                self.report.examples.append(f"{time.monotonic() - self._started:.1f}s {error}")
            await asyncio.sleep(0.05)  # a failed client backs off a little, as a real one would

    async def _one(self) -> tuple[int, bytes, str]:
        try:
            return await asyncio.wait_for(self._exchange(), self.timeout_s)
        except TimeoutError:
            return 0, b"", "timeout"
        except (OSError, ValueError, IndexError) as exc:
            return 0, b"", f"{type(exc).__name__}: {exc}"

    async def _exchange(self) -> tuple[int, bytes, str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(self.request)
            await writer.drain()
            raw = await reader.read(-1)
        finally:
            writer.close()
        if not raw:
            return 0, b"", "connection closed without an answer"
        head, _, body = raw.partition(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), body, ""


def report_json(reports: dict[str, LoadReport]) -> str:
    """The reports of several scenarios as JSON."""
    return json.dumps({name: r.as_dict() for name, r in reports.items()}, indent=2)
