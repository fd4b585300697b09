"""A real ``serve run`` of the Serve config for integration tests, started as the serving benchmark starts it.

``serve run ray_app/serve_config.yaml`` on a Ray of its own (private ``RAY_TMPDIR``), with the HAProxy ingress on
Linux as ``make serve`` runs it, answering on the config's port 8000. Runs hold a file lock on the port, so test
sessions and benchmarks on one machine take turns instead of colliding.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import httpx
from filelock import FileLock

from bench.serve_bench import dashboard_address, launched, port_free, port_lock_path, serve_env
from ray_app.model import load_artifact, save_artifact

ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIG = ROOT / "ray_app" / "serve_config.yaml"
PORT = 8000
URL = f"http://127.0.0.1:{PORT}"
PORT_LOCK = port_lock_path(PORT)


class ServeRun(NamedTuple):
    """A running ``serve run``: HTTP address, Ray dashboard address (for the ``serve`` CLI), its log."""

    url: str
    dashboard: str
    log: Path


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


def _app_answers() -> bool:
    """The app itself answers ``/healthz`` (200, or 503 while it has no model)."""
    try:
        return "status" in httpx.get(f"{URL}/healthz", timeout=2).json()
    except (httpx.HTTPError, ValueError):
        return False


@contextmanager
def running_serve_app(
    model_dir: Path, timeout_s: float = 240, env: dict[str, str] | None = None, lock_timeout_s: float = 1800
) -> Iterator[ServeRun]:
    """``serve run`` the Serve config with ``MODEL_DIR=model_dir``; yield its addresses once the app answers.

    On exit: SIGINT (Serve shuts down and the Ray it started stops), then SIGTERM/SIGKILL if needed, and any
    process left in its session is killed, so nothing keeps running after the tests.
    """
    with FileLock(PORT_LOCK, timeout=lock_timeout_s):
        deadline = time.monotonic() + 300  # a server outside the lock may still be stopping
        while not port_free(PORT):
            assert time.monotonic() < deadline, f"port {PORT} is busy; stop whatever serves there first"
            time.sleep(2)
        ray_tmp = tempfile.mkdtemp(
            prefix="rs-", dir="/tmp"
        )  # short: Ray's socket paths must fit in 107 bytes
        run_env = {
            **serve_env(ray_tmp, "haproxy" if sys.platform == "linux" else "proxy"),
            # A starved machine (parallel test runs) can miss Serve's 5 s proxy ready check; give it time.
            "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
            "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
            **(env or {}),
            "MODEL_DIR": str(model_dir),
        }
        log_path = Path(ray_tmp) / "serve_run.log"
        cmd = [sys.executable, "-m", "ray.serve.scripts", "run", str(SERVE_CONFIG)]
        try:
            with launched("serve run", cmd, run_env, log_path, PORT, _app_answers, timeout_s):
                yield ServeRun(URL, dashboard_address(log_path), log_path)
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)
