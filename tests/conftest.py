"""Shared fixtures: the MNIST folder, one small model trained per session with a real Ray Train run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Held while a test serves on the Serve config's fixed port 8000, so test runs that share a machine take turns.
SERVE_PORT_LOCK = Path(tempfile.gettempdir()) / "ray-mnist-serve-port-8000.lock"


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
    """Run ``python -m ray_app.train`` in a subprocess (its own embedded Ray, stopped when it exits).

    The Ray it starts lives in a private temporary folder, so it never joins or disturbs another local Ray.
    """
    ray_tmp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    try:
        return subprocess.run(
            [sys.executable, "-m", "ray_app.train", *args],
            env={**os.environ, "RAY_TMPDIR": ray_tmp, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )
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
