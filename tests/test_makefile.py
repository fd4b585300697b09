"""The Make targets the README tells users to run, run as a user runs them.

``make run`` in the background with ``MODEL_DIR`` holding a trained model (so it only serves), a real
``/predict``, then ``make stop`` from another process: the serve run and its Ray end, an unrelated Ray cluster on
the machine stays up. ``make sync-serve-config`` on a copy of the files it edits.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from filelock import FileLock

from ray_app.model import load_artifact
from tests.conftest import require
from tests.helpers import ray_processes
from tests.serving import PORT, PORT_LOCK, URL, port_free, serve_env, stop_session

ROOT = Path(__file__).resolve().parents[1]
SYNC_SCRIPT = Path("kuberay") / "sync_serve_config.py"
SIGINT_THEN_KILL = ((signal.SIGINT, 30), (signal.SIGKILL, 10))  # as Ctrl-C, then what is left


@contextmanager
def unrelated_ray() -> Iterator[tuple[subprocess.Popen, set[int]]]:
    """A local Ray cluster of its own (private ``RAY_TMPDIR``), as another user's on the same machine would be:
    its driver and the PIDs of its processes (GCS, raylet, workers)."""
    ray_tmp = tempfile.mkdtemp(prefix="ru-", dir="/tmp")
    code = "import ray, time; ray.init(num_cpus=1, include_dashboard=False); print('up', flush=True); time.sleep(900)"
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    driver = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert driver.stdout is not None and driver.stdout.readline().strip() == "up"
        yield driver, ray_processes(ray_tmp)
    finally:
        stop_session(driver, SIGINT_THEN_KILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_make_run_serves_and_make_stop_leaves_other_ray_clusters_alone(
    trained_model_dir: Path, tmp_path: Path
) -> None:
    require(shutil.which("make") is not None, "make is not installed")
    require((ROOT / ".venv" / "bin" / "serve").exists(), "no .venv with Ray Serve (make install)")
    model_dir = tmp_path / "model"
    shutil.copytree(trained_model_dir, model_dir, ignore=shutil.ignore_patterns("ray_results", "data"))
    version = load_artifact(model_dir).meta["version"]
    ray_tmp = tempfile.mkdtemp(prefix="rm-", dir="/tmp")  # the Ray `make run` starts, kept apart from others
    env = {
        **serve_env(ray_tmp, "haproxy" if sys.platform == "linux" else "proxy"),
        "MODEL_DIR": str(model_dir),
        "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",  # starved machines (parallel test runs)
        "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
    }
    make = ["make", "--no-print-directory", "-o", ".venv/.installed"]  # the test already runs in that .venv
    log = tmp_path / "make_run.log"
    with FileLock(PORT_LOCK, timeout=1800), unrelated_ray() as (other, other_pids), open(log, "wb") as out:
        deadline = time.monotonic() + 300
        while not port_free(PORT):
            assert time.monotonic() < deadline, f"port {PORT} is busy"
            time.sleep(2)
        run = subprocess.Popen(
            [*make, "run"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 300
            while True:
                with suppress(httpx.HTTPError, ValueError):
                    if httpx.get(f"{URL}/healthz", timeout=2).json() == {
                        "status": "ok",
                        "model_version": version,
                    }:
                        break
                assert run.poll() is None, log.read_text(errors="replace")[-3000:]
                assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
                time.sleep(1)
            response = httpx.post(
                f"{URL}/predict", files={"file": ("zero.png", (ROOT / "samples" / "zero.png").read_bytes())}
            )
            assert response.status_code == 200, response.text
            assert response.json()["prediction"] == 0 and response.json()["model_version"] == version
            text = log.read_text(errors="replace")
            assert "page http://localhost:8000/" in text, text[-3000:]
            assert not (model_dir / "ray_results").exists() and "epoch 1/" not in text  # served, not trained
            assert ray_processes(ray_tmp) and (ROOT / ".serve.pid").exists()

            stop = subprocess.run([*make, "stop"], cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert stop.returncode == 0 and "stopped" in stop.stdout, stop.stdout + stop.stderr
            assert run.wait(30) is not None  # `make run` returned once its serve run ended
            wait_s = time.monotonic() + 30
            while ray_processes(ray_tmp) or not port_free(PORT):
                assert time.monotonic() < wait_s, f"left running: {ray_processes(ray_tmp)}"
                time.sleep(1)
            assert not (ROOT / ".serve.pid").exists()
            assert other.poll() is None and all(psutil.pid_exists(pid) for pid in other_pids), other_pids
            assert len(other_pids) >= 3  # the driver, the GCS and the raylet at least
        finally:
            stop_session(run, SIGINT_THEN_KILL)
            shutil.rmtree(ray_tmp, ignore_errors=True)


def test_make_sync_serve_config_copies_the_config_into_the_rayservice(tmp_path: Path) -> None:
    require(shutil.which("make") is not None, "make is not installed")
    require((ROOT / ".venv" / "bin" / "python").exists(), "no .venv (make install)")
    (tmp_path / SYNC_SCRIPT).parent.mkdir(parents=True)
    shutil.copy(ROOT / SYNC_SCRIPT, tmp_path / SYNC_SCRIPT)
    spec = importlib.util.spec_from_file_location("sync_serve_config", tmp_path / SYNC_SCRIPT)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # the files it edits, seen from a copy of the project in tmp_path
    manifest, config = Path(script.MANIFEST), Path(script.CONFIG)
    for path in (manifest, config, tmp_path / "Makefile"):
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / path.relative_to(tmp_path), path)
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    original = manifest.read_text()

    def sync() -> None:
        done = subprocess.run(
            ["make", "sync-serve-config"], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr

    def rest(text: str) -> dict:
        """The RayService without its serveConfigV2."""
        doc = yaml.safe_load(text)
        return {**doc, "spec": {k: v for k, v in doc["spec"].items() if k != "serveConfigV2"}}

    sync()
    assert yaml.safe_load(manifest.read_text())["spec"]["serveConfigV2"] == config.read_text()
    assert rest(manifest.read_text()) == rest(original)

    edited = config.read_text().replace("num_replicas: 2", "num_replicas: 3")
    edited = edited.replace("proxy_location:", "# a comment added by hand\nproxy_location:")
    assert edited != config.read_text()
    config.write_text(edited)
    sync()
    after = manifest.read_text()
    assert yaml.safe_load(after)["spec"]["serveConfigV2"] == edited  # the config text, byte for byte
    assert rest(after) == rest(original)  # nothing else in the RayService changed
    sync()
    assert manifest.read_text() == after  # idempotent
