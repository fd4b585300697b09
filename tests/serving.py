"""Launching and stopping servers for tests and benchmarks: a real ``serve run`` of the Serve config, ports, the
port-8000 lock.

``serve run ray_app/serve_config.yaml`` on a Ray of its own (private ``RAY_TMPDIR``), with the HAProxy ingress on
Linux as ``make serve`` runs it, answering on the config's port 8000. Runs hold a file lock on the port, so test
sessions and benchmarks on one machine take turns instead of colliding. Every server is started in a session of its
own and stopped with everything it spawned. ``bench/`` imports this module; nothing here imports ``bench/``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import httpx
from filelock import FileLock

from ray_app.model import load_artifact, save_artifact

ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIG = ROOT / "ray_app" / "serve_config.yaml"
PORT = 8000
URL = f"http://127.0.0.1:{PORT}"


def progress(message: str) -> None:
    """Progress on stderr with a timestamp."""
    print(f"{datetime.now():%H:%M:%S} {message}", file=sys.stderr, flush=True)


# ---- ports and processes
def port_free(port: int) -> bool:
    """True when nothing accepts connections on 127.0.0.1:``port``."""
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def free_port() -> int:
    """A port the OS says is unused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listener_pids(port: int) -> list[int]:
    """PIDs of the processes listening on TCP ``port``."""
    out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True).stdout
    return [int(pid) for pid in re.findall(r"pid=(\d+)", out)]


def port_lock_path(port: int) -> Path:
    """The lock file with which Serve runs on this machine (benchmarks and tests) take turns on ``port``."""
    return Path(tempfile.gettempdir()) / f"ray-mnist-serve-port-{port}.lock"


PORT_LOCK = port_lock_path(PORT)


def session_pids(session: int) -> list[int]:
    """Every process in a session (a server started with ``start_new_session`` and all it spawned)."""
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True, check=True).stdout
    return [int(pid) for pid, sid in (line.split() for line in out.splitlines()) if int(sid) == session]


class PortTaken(RuntimeError):
    """Another program listens on the port a server needs (other Serve apps on this machine)."""


def _default_sigint() -> None:
    """In the child before exec: take SIGINT back even when this process was started with it ignored (in the
    background), so the SIGINT that stops a server is not lost."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextmanager
def launched(
    name: str,
    cmd: list[str],
    env: dict[str, str],
    log_path: Path,
    port: int,
    ready: Callable[[], bool],
    timeout_s: float,
) -> Iterator[subprocess.Popen]:
    """Start ``cmd`` in its own session, wait until it listens on ``port`` and ``ready()``; on exit stop it and
    everything it spawned (SIGINT, then SIGTERM, then SIGKILL). Raises :class:`PortTaken` when another program
    took ``port`` first."""
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_default_sigint,
        )
    try:
        deadline = time.monotonic() + timeout_s
        while not (set(listener_pids(port)) & set(session_pids(proc.pid)) and ready()):
            text = log_path.read_text(errors="replace")
            clash = any("already in use" in line and f":{port}" in line for line in text.splitlines())
            if clash or (proc.poll() is not None and not port_free(port)):
                raise PortTaken(f"{name}: port {port} was taken by another program")
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited {proc.returncode}:\n{text[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready in {timeout_s:g} s:\n{text[-3000:]}")
            time.sleep(1)
        progress(f"{name} ready (pid {proc.pid})")
        yield proc
    finally:
        stop_session(proc)
        progress(f"{name} stopped")


def stop_session(
    leader: subprocess.Popen,
    steps: tuple[tuple[int, float], ...] = ((signal.SIGINT, 60), (signal.SIGTERM, 20), (signal.SIGKILL, 10)),
) -> None:
    """Stop a process group we started: each signal of ``steps`` in turn, waiting up to its seconds, until the
    leader exits; then SIGKILL whatever of its session is left."""
    for sig, wait_s in steps:
        if leader.poll() is not None:
            break
        with suppress(ProcessLookupError):
            os.killpg(leader.pid, sig)
        with suppress(subprocess.TimeoutExpired):
            leader.wait(wait_s)
    for pid in session_pids(leader.pid):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# ---- serve run
def serve_env(ray_tmp: str, ingress: str) -> dict[str, str]:
    """Environment of ``serve run``: a fresh Ray (never someone else's), the chosen ingress (``haproxy`` or
    ``proxy``) with private files."""
    env = {
        **os.environ,
        "RAY_TMPDIR": ray_tmp,
        "RAY_SERVE_ENABLE_HA_PROXY": "1" if ingress == "haproxy" else "0",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{ray_tmp}/haproxy/haproxy.cfg",
        "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{ray_tmp}/haproxy/admin.sock",
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": f"{ray_tmp}/haproxy",
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{ray_tmp}/haproxy/server-state",
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": f"{ray_tmp}/haproxy/metrics.sock",
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
    }
    env.pop("RAY_ADDRESS", None)
    return env


def dashboard_address(log_path: Path) -> str:
    """The Ray dashboard address that ``serve run`` logged ("" until it has)."""
    found = re.search(r"dashboard at \S*?(http://[\d.]+:\d+)", log_path.read_text(errors="replace"))
    return found.group(1) if found else ""


def app_answers(url: str = URL) -> bool:
    """The app itself answers ``/healthz`` (200, or 503 while it has no model)."""
    try:
        return "status" in httpx.get(f"{url}/healthz", timeout=2).json()
    except (httpx.HTTPError, ValueError):
        return False


class ServeRun(NamedTuple):
    """A running ``serve run``: HTTP address, Ray dashboard address (for the ``serve`` CLI), its log, its
    environment."""

    url: str
    dashboard: str
    log: Path
    env: dict[str, str]


DEFAULT_INGRESS = "haproxy" if sys.platform == "linux" else "proxy"


@contextmanager
def running_serve_app(
    model_dir: Path,
    timeout_s: float = 240,
    env: dict[str, str] | None = None,
    lock_timeout_s: float = 1800,
    ingress: str = DEFAULT_INGRESS,
    ready: Callable[[Path, dict[str, str]], bool] | None = None,
    port_wait_s: float = 300,
) -> Iterator[ServeRun]:
    """``serve run`` the Serve config with ``MODEL_DIR=model_dir``; yield once it listens on port 8000 and
    ``ready(log_path, env)`` (default: the app answers ``/healthz``).

    Takes the port lock first, then waits up to ``port_wait_s`` for the port (a server outside the lock may
    still be stopping) and starts again if another program takes it meanwhile. On exit: SIGINT (Serve shuts
    down and the Ray it started stops), then SIGTERM/SIGKILL if needed, and any process left in its session is
    killed, so nothing keeps running.
    """
    check = ready or (lambda _log, _env: app_answers())
    with FileLock(PORT_LOCK, timeout=lock_timeout_s):
        deadline = time.monotonic() + port_wait_s
        while True:
            while not port_free(PORT):
                assert time.monotonic() < deadline, f"port {PORT} is busy; stop whatever serves there first"
                time.sleep(2)
            ray_tmp = tempfile.mkdtemp(prefix="rs-", dir="/tmp")  # short: socket paths must fit in 107 bytes
            run_env = {
                **serve_env(ray_tmp, ingress),
                # A starved machine (parallel test runs) can miss Serve's 5 s proxy ready check; give it time.
                "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
                "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
                **(env or {}),
                "MODEL_DIR": str(model_dir),
            }
            log_path = Path(ray_tmp) / "serve_run.log"
            cmd = [sys.executable, "-m", "ray.serve.scripts", "run", str(SERVE_CONFIG)]
            try:
                answers = lambda log_path=log_path, run_env=run_env: check(log_path, run_env)  # noqa: E731
                with launched("serve run", cmd, run_env, log_path, PORT, answers, timeout_s):
                    yield ServeRun(URL, dashboard_address(log_path), log_path, run_env)
                return
            except PortTaken as exc:
                if time.monotonic() > deadline:
                    raise
                progress(f"{exc}; trying again")
            finally:
                shutil.rmtree(ray_tmp, ignore_errors=True)


# ---- the session's app (tests)
class Served(NamedTuple):
    """The running app, its model folder, what ``/healthz`` said before the model appeared, Ray's temp dir."""

    url: str
    dashboard: str
    model_dir: Path
    first_health: httpx.Response
    pickup_s: float
    ray_tmp: Path


def publish_copy(source: Path, model_dir: Path) -> str:
    """Publish the model in ``source`` to ``model_dir`` again: same weights, a new version id."""
    artifact = load_artifact(source)
    meta = {k: v for k, v in artifact.meta.items() if k not in ("version", "sha256", "architecture")}
    return save_artifact(model_dir, artifact.model.state_dict(), meta)
