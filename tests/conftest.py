"""Shared fixtures: the MNIST folder, one small model trained per session with a real Ray Train run, and one
real `serve run` of the Serve config per session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.serving import Served, publish_copy, running_serve_app

ROOT = Path(__file__).resolve().parent.parent


def require(condition: bool, reason: str) -> None:
    """Skip when a prerequisite is missing; fail instead when ``REQUIRE_PREREQUISITES=1`` (as in CI)."""
    if condition:
        return
    if os.environ.get("REQUIRE_PREREQUISITES") == "1":
        pytest.fail(f"missing prerequisite: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The MNIST folder from ``MNIST_DATA_DIR`` (holding ``MNIST/raw``)."""
    value = os.environ.get("MNIST_DATA_DIR", "")
    require(
        bool(value) and (Path(value) / "MNIST" / "raw").is_dir(), "MNIST_DATA_DIR does not point at MNIST"
    )
    return Path(value)


def run_train(
    *args: str, env: dict[str, str] | None = None, timeout: float = 900
) -> subprocess.CompletedProcess:
    """Run ``python -m ray_app.train`` in a subprocess (its own embedded Ray, stopped when it exits)."""
    with private_ray_env() as ray_env:
        return subprocess.run(
            [sys.executable, "-m", "ray_app.train", *args],
            env={**ray_env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )


@contextmanager
def private_ray_env() -> Iterator[dict[str, str]]:
    """This environment with ``RAY_TMPDIR`` set to a fresh folder (removed afterwards): a Ray started with it
    never joins or disturbs another local Ray."""
    ray_tmp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    try:
        yield {**os.environ, "RAY_TMPDIR": ray_tmp}
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> Iterator[Path]:
    """A model directory with a small model (12,000 images, 2 epochs, 2 workers) from a real training run."""
    model_dir = tmp_path_factory.mktemp("model")
    args = ["--model-dir", str(model_dir), "--data-dir", str(mnist_dir), "--train-limit", "12000"]
    done = run_train(*args, "--epochs", "2", "--min-accuracy", "0.9")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    yield model_dir


@pytest.fixture(scope="session")
def served(trained_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The session's one ``serve run`` of the Serve config (port 8000), shared by the serving and browser tests.

    Started on an empty model folder; the trained model is published once the app is up, so the first
    ``/healthz`` answer (503) and the time to pick the model up are recorded too.
    """
    model_dir = tmp_path_factory.mktemp("served-model")
    with running_serve_app(model_dir) as run:
        first_health = httpx.get(f"{run.url}/healthz", timeout=5)
        published = time.monotonic()
        version = publish_copy(trained_model_dir, model_dir)
        while httpx.get(f"{run.url}/healthz", timeout=5).json().get("model_version") != version:
            assert time.monotonic() - published < 30, "model not picked up in 30 s"
            time.sleep(0.2)
        yield Served(
            run.url, run.dashboard, model_dir, first_health, time.monotonic() - published, run.log.parent
        )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests on the shared app run last: the app then starts once, after the tests that need port 8000 for an
    app of their own (reliability, the emulated RayService) are done with it."""
    items.sort(key=lambda item: "served" in getattr(item, "fixturenames", ()))
