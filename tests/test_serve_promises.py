"""README promises about serving, checked through the real deployment (the session's ``serve run``).

Concurrent uploads are classified in batches larger than one and a changed ``max_batch_size`` bounds them; a
``user_config`` change reaches the running replicas without restarting them; a body that stops arriving gets 408
over real HTTP (``body_timeout_s`` from the app, ``request_timeout_s`` end to end through the ingress); a rollback
reaches every live replica; an upload over the inline decode budget is decoded by a decode worker process.
"""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil
import pytest
import yaml
from PIL import Image

from ray_app.model import VERSIONS, rollback
from tests.helpers import SAMPLES, ZERO, metric_total, prometheus_scrape, replica_pids, replica_url, serve_cli
from tests.serving import SERVE_CONFIG, Served, publish_copy

ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENT = yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]["deployments"][0]
USER_CONFIG = DEPLOYMENT["user_config"]
REQUEST_TIMEOUT_S = yaml.safe_load(SERVE_CONFIG.read_text())["http_options"]["request_timeout_s"]
JUNK_FILES = [("files", (f"{i}.png", b"junk")) for i in range(4)]  # refused before any inference


# ---- helpers: the cluster behind the session's app
def replica_urls(served: Served) -> dict[int, str]:
    """Each replica's PID and own address (the config asks for ``num_replicas`` of them)."""
    pids = replica_pids(str(served.ray_tmp))
    assert len(pids) == DEPLOYMENT["num_replicas"], pids
    return {pid: replica_url(pid) for pid in pids}


def batch_histogram(scrape: str) -> dict[str, float]:
    """Forward passes of batch size <= 1, <= 2 and in all (summed over replicas), and images classified."""
    return {
        "le1": metric_total(scrape, "ray_mnist_batch_size_bucket", le="1.0"),
        "le2": metric_total(scrape, "ray_mnist_batch_size_bucket", le="2.0"),
        "all": metric_total(scrape, "ray_mnist_batch_size_count"),
        "images": metric_total(scrape, "ray_mnist_predictions_total"),
    }


def settled_histogram(served: Served) -> dict[str, float]:
    """The batch histogram once two scrapes a few seconds apart agree (earlier traffic fully reported)."""
    deadline = time.monotonic() + 60
    previous = batch_histogram(prometheus_scrape(served.ray_tmp))
    while True:
        time.sleep(3)
        current = batch_histogram(prometheus_scrape(served.ray_tmp))
        if current == previous or time.monotonic() > deadline:
            return current
        previous = current


def all_answered(responses: list[httpx.Response]) -> None:
    """Every response is a 200 classifying the zero; otherwise say which other answers came back."""
    others = {(r.status_code, r.text[:200]) for r in responses if r.status_code != 200}
    assert not others, f"{sum(r.status_code != 200 for r in responses)} of {len(responses)} failed: {others}"
    assert {r.json()["prediction"] for r in responses} == {0}


def histogram_after(served: Served, before: dict[str, float], images: int) -> dict[str, float]:
    """The batch histogram's growth since ``before`` once ``images`` more images were reported."""
    deadline = time.monotonic() + 90  # Ray exports metrics every few seconds
    while (after := batch_histogram(prometheus_scrape(served.ray_tmp)))["images"] < before["images"] + images:
        assert time.monotonic() < deadline, (before, after)
        time.sleep(2)
    return {key: after[key] - before[key] for key in after}


def concurrent_predictions(url: str, count: int, concurrency: int) -> list[httpx.Response]:
    """``count`` uploads of ``samples/zero.png`` to ``/predict``, ``concurrency`` at a time."""

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
            gate = asyncio.Semaphore(concurrency)

            async def one() -> httpx.Response:
                async with gate:
                    return await client.post("/predict", files={"file": ("0.png", ZERO)})

            return await asyncio.gather(*(one() for _ in range(count)))

    return asyncio.run(run())


def stalled_upload(url: str, declared: int, sent: bytes, timeout_s: float) -> tuple[int, str, str, float]:
    """POST ``/predict`` over a plain socket declaring ``declared`` body bytes, send only ``sent``, then wait:
    (status, content type, body, seconds until the answer)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout_s) as sock:
        head = (
            f"POST /predict HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: {declared}\r\n\r\n"
        )
        started = time.monotonic()
        sock.sendall(head.encode() + sent)
        response = http.client.HTTPResponse(sock)
        response.begin()
        body = response.read().decode(errors="replace")
        return response.status, response.getheader("content-type", ""), body, time.monotonic() - started


def wait_until(check: Any, timeout_s: float, what: str) -> None:
    """Poll ``check()`` every half second until it is true."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what} not within {timeout_s:g} s"
        time.sleep(0.5)


def applied(url: str, status: int, served: Served) -> bool:
    """Whether the replica at ``url`` answers four files in one request with ``status`` (413 under
    ``max_files`` 3, 415 for the junk under the config's 64); fails saying what runs when it does not answer."""
    try:
        return max_files_of(url) == status
    except httpx.HTTPError as exc:
        status_now = serve_cli("status", dashboard=served.dashboard).stdout
        raise AssertionError(
            f"{url}: {exc}; replicas now {replica_pids(str(served.ray_tmp))}\n{status_now}"
        ) from exc


def max_files_of(url: str) -> int:
    """413 when the replica at ``url`` refuses four files in one request (``max_files`` < 4), else its status."""
    return httpx.post(f"{url}/predict/batch", files=JUNK_FILES, timeout=10).status_code


# ---- integration: the session's serve run
@pytest.mark.integration
@pytest.mark.timeout(600)
def test_concurrent_uploads_are_classified_in_batches_larger_than_one(served: Served) -> None:
    before = settled_histogram(served)
    all_answered(concurrent_predictions(served.url, 512, 64))
    grown = histogram_after(served, before, 512)
    print(
        f"\n512 uploads at concurrency 64: {grown['all']:.0f} forward passes, {grown['le1']:.0f} of one image"
    )
    assert 0 < grown["all"] < 512  # fewer forward passes than images
    assert grown["le1"] < grown["all"]  # some batches held more than one image


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_user_config_applies_in_place_and_request_timeout_is_408_end_to_end(
    served: Served, tmp_path: Path
) -> None:
    """One ``serve deploy`` of a changed ``user_config``: ``max_batch_size`` 2 with ``batch_wait_timeout_s``
    0.05 (batches never exceed 2, and mostly fill), ``max_files`` 3 (a marker of the new config on each replica)
    and ``body_timeout_s`` above ``request_timeout_s`` (so a stalled body meets the end-to-end timeout first)."""
    replicas = replica_urls(served)
    changed = yaml.safe_load(SERVE_CONFIG.read_text())
    changed["applications"][0]["deployments"][0]["user_config"] |= {
        "max_batch_size": 2,
        "batch_wait_timeout_s": 0.05,
        "max_files": 3,
        "body_timeout_s": REQUEST_TIMEOUT_S + 30,
    }
    (tmp_path / "serve_config.yaml").write_text(yaml.safe_dump(changed))
    assert max_files_of(served.url) == 415  # the junk files are decoded (and refused) under max_files 64
    deployed = serve_cli("deploy", str(tmp_path / "serve_config.yaml"), dashboard=served.dashboard)
    assert deployed.returncode == 0, deployed.stderr
    try:
        for pid, url in replicas.items():
            wait_until(lambda url=url: applied(url, 413, served), 90, f"new user_config on replica {pid}")
        assert replica_pids(str(served.ray_tmp)) == set(replicas)  # the same processes: nothing restarted

        stalled: dict[str, Any] = {}
        stall = threading.Thread(
            target=lambda: stalled.update(
                answer=stalled_upload(served.url, 1000, b"--x\r\n", REQUEST_TIMEOUT_S + 60)
            )
        )
        stall.start()
        before = settled_histogram(served)
        all_answered(concurrent_predictions(served.url, 128, 32))
        grown = histogram_after(served, before, 128)
        print(
            f"\nmax_batch_size 2: {grown['all']:.0f} forward passes for 128 uploads, {grown['le1']:.0f} of one"
        )
        assert grown["le2"] == grown["all"]  # no batch above the new max_batch_size
        assert grown["le1"] < grown["all"] / 2  # waiting up to 50 ms, most batches filled to two
        stall.join()
        status, content_type, body, seconds = stalled["answer"]
        print(f"stalled body through the ingress: {status} {content_type} {body!r} after {seconds:.1f} s")
        assert status == 408 and f"timed out after {float(REQUEST_TIMEOUT_S)}s" in body
        assert REQUEST_TIMEOUT_S - 1 < seconds < REQUEST_TIMEOUT_S + 30
        assert replica_pids(str(served.ray_tmp)) == set(replicas)
    finally:
        restored = serve_cli("deploy", str(SERVE_CONFIG), dashboard=served.dashboard)
        assert restored.returncode == 0, restored.stderr
    for pid, url in replicas.items():
        wait_until(lambda url=url: applied(url, 415, served), 90, f"original user_config on replica {pid}")
    assert replica_pids(str(served.ray_tmp)) == set(replicas)


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_a_body_that_stops_arriving_is_408_json_over_http(served: Served) -> None:
    status, content_type, body, seconds = stalled_upload(served.url, 1000, b"--x\r\n", 60)
    timeout_s = USER_CONFIG["body_timeout_s"]
    assert status == 408 and content_type == "application/json"
    assert json.loads(body) == {"detail": f"request body not received within {timeout_s:g} s"}
    assert timeout_s - 1 < seconds < timeout_s + 20


def decode_workers_cpu_s(served: Served) -> tuple[int, float]:
    """The replicas' decode worker processes: how many, and the CPU seconds they have used."""
    workers = [
        child
        for pid in replica_pids(str(served.ray_tmp))
        for child in psutil.Process(pid).children()
        if "ray_app.decode" in " ".join(child.cmdline())
    ]
    return len(workers), sum(w.cpu_times().user + w.cpu_times().system for w in workers)


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_an_upload_over_the_inline_budget_is_decoded_by_a_worker_process(served: Served) -> None:
    small = (SAMPLES / "ink" / "seven.png").read_bytes()
    buffer = io.BytesIO()
    Image.open(io.BytesIO(small)).convert("L").resize((1200, 1200)).save(buffer, "PNG", compress_level=0)
    big = buffer.getvalue()
    inline = USER_CONFIG["decode"]["inline_max_bytes"]
    assert len(small) <= inline < len(big) <= USER_CONFIG["limits"]["max_bytes"]
    with httpx.Client(base_url=served.url, timeout=30) as client:
        expected = client.post("/predict", files={"file": ("7.png", small)}).json()["prediction"]
        workers, cpu_before = decode_workers_cpu_s(served)
        assert workers == DEPLOYMENT["num_replicas"] * USER_CONFIG["decode"]["workers"]
        # one decode may take less than the clock tick CPU time is counted in: repeat until the workers' time moves
        for _ in range(20):
            response = client.post("/predict", files={"file": ("7-big.png", big)})
            assert response.status_code == 200 and response.json()["prediction"] == expected
            workers_after, cpu_after = decode_workers_cpu_s(served)
            assert workers_after == workers  # none was replaced
            if cpu_after > cpu_before:
                break
    assert cpu_after > cpu_before  # a worker did the decoding


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_rollback_reaches_every_live_replica(served: Served, trained_model_dir: Path) -> None:
    health = httpx.get(f"{served.url}/healthz", timeout=5).json()
    assert health["status"] == "ok", health
    good = health["model_version"]
    newer = publish_copy(trained_model_dir, served.model_dir)
    replicas = replica_urls(served)
    for version in (newer, good):
        if version == good:
            rollback(served.model_dir, good)
        for pid, url in replicas.items():
            wait_until(
                lambda url=url, version=version: (
                    httpx.get(f"{url}/healthz", timeout=5).json()
                    == {"status": "ok", "model_version": version}
                ),
                30,
                f"version {version} on replica {pid}",
            )
    assert (served.model_dir / VERSIONS / newer).is_dir()  # rolling back keeps the newer version
    response = httpx.post(f"{served.url}/predict", files={"file": ("0.png", ZERO)}, timeout=30)
    assert response.status_code == 200 and response.json()["model_version"] == good
    assert replica_pids(str(served.ray_tmp)) == set(replicas)
