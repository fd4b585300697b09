"""Reliability over HTTP: one ``serve run`` of the real Serve config on port 8000 started with ``PREDICT_TOKEN``
set (the module fixture ``guarded``): malformed requests, auth, a soak smoke run, a replica killed under load, bad
model files, overload.

Run: pytest tests/test_reliability_integration.py     (starts Ray Serve on port 8000; about 3 min)
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import NamedTuple

import httpx
import psutil
import pytest
import yaml

from ray_app.model import METADATA, WEIGHTS
from ray_app.serve import (
    TOKEN_ENV,
)
from tests.battery_expected import check_expected
from tests.helpers import (
    AUTH,
    BATTERY,
    TOKEN,
    ZERO,
    _half,
    publish_broken,
    replica_pids,
    serve_cli,
)
from tests.serving import ROOT, SERVE_CONFIG, publish_copy, running_serve_app

BACKPRESSURE = "Request dropped due to backpressure"  # Serve's own 503 (plain text) when the queue is full


class Guarded(NamedTuple):
    """The running app, its model folder and the RAY_TMPDIR of its Ray (to find its processes)."""

    url: str
    dashboard: str
    model_dir: Path
    ray_tmp: str


@pytest.fixture(scope="module")
def guarded(trained_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guarded]:
    """``serve run`` with ``PREDICT_TOKEN`` on a copy of the trained model (the tests damage that copy)."""
    model_dir = tmp_path_factory.mktemp("guarded-model")
    version = publish_copy(trained_model_dir, model_dir)
    # the trailing newline a Kubernetes Secret made with --from-file carries
    with running_serve_app(model_dir, env={TOKEN_ENV: TOKEN + "\n"}) as run:
        deadline = time.monotonic() + 60
        while True:
            with suppress(httpx.HTTPError, ValueError):
                if httpx.get(f"{run.url}/healthz", timeout=5).json().get("model_version") == version:
                    break
            assert time.monotonic() < deadline, f"model {version} not served in 60 s"
            time.sleep(0.5)
        yield Guarded(run.url, run.dashboard, model_dir, str(run.log.parent))


def wait_for_health(url: str, expected: Callable[[dict], bool], timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while not expected(health := httpx.get(f"{url}/healthz", timeout=5).json()):
        assert time.monotonic() < deadline, health
        time.sleep(0.5)
    return health


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_malformed_requests_over_http_are_4xx_json(guarded: Guarded) -> None:
    with httpx.Client(base_url=guarded.url, timeout=30) as http:
        for name, build in BATTERY.items():
            method, path, kwargs = build()
            headers = {**kwargs.pop("headers", {}), **AUTH}
            # its exact status and detail (tests/battery_expected.py)
            check_expected(http.request(method, path, headers=headers, **kwargs), name)
        assert http.post("/predict", files={"file": ("0.png", ZERO)}, headers=AUTH).status_code == 200


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_auth_over_http(guarded: Guarded) -> None:
    with httpx.Client(base_url=guarded.url, timeout=30) as http:
        for headers in ({}, {"Authorization": "Bearer nope"}):
            response = http.post("/predict", files={"file": ("0.png", ZERO)}, headers=headers)
            assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
            assert "bearer token" in response.json()["detail"]
        response = http.post("/predict", files={"file": ("0.png", ZERO)}, headers=AUTH)
        assert response.status_code == 200 and response.json()["prediction"] == 0  # the env value ends in \n
        assert http.get("/model").status_code == 401
        assert http.get("/model", headers=AUTH).json()["version"]
        assert http.get("/healthz").status_code == 200 and http.get("/").status_code == 200


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_soak_smoke_every_request_succeeds(guarded: Guarded, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "bench.soak", "--smoke", "--url", guarded.url]
    command += ["--token", TOKEN, "--ray-tmpdir", guarded.ray_tmp, "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    print(done.stdout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "soak.json").read_text())["summary"]
    assert summary["requests"] > 0 and summary["errors"] == 0, summary["windows"]
    assert len(summary["memory"][0]["rss_mb"]) == 2  # both replicas found and measured


async def _load(url: str, seconds: float, concurrency: int) -> list[tuple[float, float, str, int]]:
    """``/predict`` at ``concurrency`` for ``seconds``, each request retried up to twice on a connection error
    or 5xx (it is idempotent): (start, end, final status or error, attempts that failed) per request."""
    records: list[tuple[float, float, str, int]] = []
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits, headers=AUTH) as http:

        async def worker() -> None:
            while time.monotonic() < deadline:
                began, failures = time.monotonic(), 0
                for _ in range(3):
                    try:
                        response = await http.post("/predict", files={"file": ("0.png", ZERO)})
                        outcome = str(response.status_code)
                    except httpx.HTTPError as exc:
                        outcome = type(exc).__name__
                    if outcome.isdigit() and int(outcome) < 500:
                        break
                    failures += 1
                    await asyncio.sleep(0.1)
                records.append((began, time.monotonic(), outcome, failures))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records


def _replica_answers(pid: int) -> bool:
    """Whether a replica answers ``/healthz`` 200 on one of its own listening ports (its direct ingress)."""
    try:
        ports = [
            c.laddr.port for c in psutil.Process(pid).net_connections("tcp") if c.status == psutil.CONN_LISTEN
        ]
    except psutil.Error:
        return False
    for port in ports:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            continue
    return False


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_killing_a_replica_under_load_loses_almost_nothing(guarded: Guarded) -> None:
    before = replica_pids(guarded.ray_tmp)
    assert len(before) == 2, before  # serve_config.yaml: num_replicas 2
    victim = min(before)
    kill_after_s, load_s = 4.0, 15.0
    replaced: dict[str, float] = {}

    def watch(killed_at: float) -> None:
        deadline = killed_at + 120
        while time.monotonic() < deadline:
            new = replica_pids(guarded.ray_tmp) - before
            if new and "process_s" not in replaced:
                replaced["process_s"] = time.monotonic() - killed_at
            if new and _replica_answers(next(iter(new))):
                replaced["ready_s"] = time.monotonic() - killed_at
                return
            time.sleep(0.2)

    async def scenario() -> tuple[list[tuple[float, float, str, int]], float]:
        traffic = asyncio.create_task(_load(guarded.url, load_s, 16))
        await asyncio.sleep(kill_after_s)
        psutil.Process(victim).kill()
        killed_at = time.monotonic()
        watcher = asyncio.create_task(asyncio.to_thread(watch, killed_at))
        records = await traffic
        await watcher
        return records, killed_at

    records, killed_at = asyncio.run(scenario())
    failed = [r for r in records if r[2] != "200"]
    first_failed = sum(1 for r in records if r[3])  # what a client without retries would have seen
    first = min(r[0] for r in records)
    rate = {}  # completed requests per second of the run
    for _, end, outcome, _ in records:
        if outcome == "200":
            rate[int(end - first)] = rate.get(int(end - first), 0) + 1
    print(
        f"\nreplica {victim} killed at t={killed_at - first:.1f} s under 16 concurrent /predict: "
        f"{first_failed} of {len(records)} requests failed at the first attempt "
        f"({100 * first_failed / len(records):.2f}%), {len(failed)} after up to two retries "
        f"{sorted({r[2] for r in failed})}; replacement process after {replaced.get('process_s')} s, "
        f"answering after {replaced.get('ready_s')} s; successful requests per second: "
        f"{[rate.get(s, 0) for s in range(int(load_s) + 1)]}; load average {os.getloadavg()[0]:.1f}"
    )
    assert any(end > killed_at for _, end, _, _ in records)  # traffic continued past the kill
    assert first_failed <= 16  # at most the requests in flight on the killed replica
    assert not failed, sorted({r[2] for r in failed})  # none after up to two retries
    # Begun after the kill and answered before any replacement process existed: only the other replica was there.
    alone_until = killed_at + replaced.get("process_s", float("inf"))
    alone = [r for r in records if r[2] == "200" and r[0] > killed_at and r[1] < alone_until]
    print(f"{len(alone)} requests served by the surviving replica alone")
    assert alone, "nothing was served between the kill and the replacement"
    assert "ready_s" in replaced, f"no replacement replica answering within 120 s: {replaced}"
    assert len(replica_pids(guarded.ray_tmp)) == 2


def replace_file(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data`` (as a writer publishing a file would)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_damaged_model_files_keep_the_last_good_model(guarded: Guarded, trained_model_dir: Path) -> None:
    good = httpx.get(f"{guarded.url}/healthz", timeout=5).json()["model_version"]
    weights, metadata = guarded.model_dir / WEIGHTS, guarded.model_dir / METADATA
    data, meta = weights.read_bytes(), json.loads(metadata.read_text())

    # model.pth alone truncated: replicas keep the model (the intact copy under versions/<version>/) and say so
    replace_file(weights, _half(data))
    health = wait_for_health(guarded.url, lambda h: h["status"] == "degraded")
    print(f"\ntruncated model.pth of the model in use -> /healthz {health}")
    assert health["model_version"] == good and "does not match" in health["detail"]
    assert f"versions/{good}" in health["detail"]
    response = httpx.post(f"{guarded.url}/predict", files={"file": ("0.png", ZERO)}, headers=AUTH, timeout=30)
    assert response.status_code == 200 and response.json()["model_version"] == good

    # a new pair copied by hand whose model.pth arrived truncated (no versions/ copy to fall back to)
    replace_file(weights, _half(data))
    replace_file(metadata, json.dumps(meta | {"version": "hand-copied"}).encode())
    health = wait_for_health(guarded.url, lambda h: "newer files rejected" in h.get("detail", ""))
    print(f"truncated model.pth of a new pair -> /healthz {health}")
    assert health["model_version"] == good and "newer files rejected" in health["detail"]
    response = httpx.post(f"{guarded.url}/predict", files={"file": ("0.png", ZERO)}, headers=AUTH, timeout=30)
    assert response.status_code == 200 and response.json()["model_version"] == good

    publish_broken(guarded.model_dir)  # a consistent pair whose weights do not fit the declared network
    health = wait_for_health(guarded.url, lambda h: "does not fit" in h.get("detail", ""))
    print(f"wrong-shaped model.pth -> /healthz {health}")
    assert health["model_version"] == good
    response = httpx.post(f"{guarded.url}/predict", files={"file": ("0.png", ZERO)}, headers=AUTH, timeout=30)
    assert response.status_code == 200 and response.json()["model_version"] == good

    fixed = publish_copy(trained_model_dir, guarded.model_dir)
    wait_for_health(guarded.url, lambda h: h == {"status": "ok", "model_version": fixed})


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_overload_is_refused_quickly(guarded: Guarded, tmp_path: Path) -> None:
    """With a tiny queue (max_ongoing_requests 2, max_queued_requests 2 per deployment, applied in place with
    ``serve deploy``), a burst far beyond capacity gets fast 503s instead of waiting in an unbounded queue."""
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    deployment = config["applications"][0]["deployments"][0]
    deployment |= {"max_ongoing_requests": 2, "max_queued_requests": 2}
    tiny = tmp_path / "serve_config.yaml"
    tiny.write_text(yaml.safe_dump(config))
    refusals: set[tuple[str, str]] = set()  # (content type, body) of every 503

    async def burst(count: int) -> list[tuple[int, float]]:
        limits = httpx.Limits(max_connections=count)
        async with httpx.AsyncClient(base_url=guarded.url, timeout=60, limits=limits, headers=AUTH) as http:

            async def one() -> tuple[int, float]:
                began = time.monotonic()
                response = await http.post("/predict", files={"file": ("0.png", ZERO)})
                if response.status_code == 503:
                    refusals.add((response.headers.get("content-type", ""), response.text))
                return response.status_code, time.monotonic() - began

            return await asyncio.gather(*(one() for _ in range(count)))

    deployed = serve_cli("deploy", str(tiny), dashboard=guarded.dashboard)
    assert deployed.returncode == 0, deployed.stderr
    try:
        deadline = time.monotonic() + 90
        while True:
            results = asyncio.run(burst(64))
            if any(status == 503 for status, _ in results):
                break
            assert {status for status, _ in results} == {200}
            assert time.monotonic() < deadline, "no 503 within 90 s of deploying a tiny queue"
            time.sleep(1)
        rejected = [seconds for status, seconds in results if status == 503]
        served = [seconds for status, seconds in results if status == 200]
        print(
            f"\nburst of 64 with a queue of 2+2 per replica: {len(served)} served, {len(rejected)} refused "
            f"(503) after at most {max(rejected):.2f} s; slowest served {max(served, default=0):.2f} s"
        )
        assert {status for status, _ in results} <= {200, 503}
        assert max(rejected) < 5
        print(f"503 bodies: {refusals}")
        # the documented refusal, nothing else
        assert all(BACKPRESSURE in body for _, body in refusals), refusals
    finally:
        restored = serve_cli("deploy", str(SERVE_CONFIG), dashboard=guarded.dashboard)
        assert restored.returncode == 0, restored.stderr
    deadline = time.monotonic() + 90
    while {status for status, _ in asyncio.run(burst(32))} != {200}:
        assert time.monotonic() < deadline, "the original queue limits were not restored"
        time.sleep(1)
