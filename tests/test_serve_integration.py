"""A real ``serve run ray_app/serve_config.yaml`` answering over HTTP on port 8000 (the session's shared app,
``served`` in conftest.py): predictions, errors, hot reload, the serve CLI, metrics.

Run: pytest tests/test_serve_integration.py     (starts Ray Serve on port 8000; a few minutes)
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import yaml
from PIL import Image

from ray_app.model import load_artifact
from ray_app.preprocess import to_mnist
from tests.helpers import (
    BAD_REQUESTS,
    BAR,
    BLANK,
    SAMPLES,
    encode,
    hostile_parts,
    metric_total,
    prometheus_scrape,
    publish_broken,
    replica_pids,
    replica_url,
    sample_files,
    serve_cli,
    stroke_image,
)
from tests.serving import ROOT, SERVE_CONFIG, Served, publish_copy


@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_healthz_is_503_until_the_model_appears(served: Served) -> None:
    assert served.first_health.status_code == 503
    assert served.first_health.json()["status"] == "unavailable"
    assert "no model yet" in served.first_health.json()["detail"]
    health = httpx.get(f"{served.url}/healthz", timeout=5)
    assert health.status_code == 200 and health.json()["status"] == "ok"


@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_samples_are_predicted_correctly(served: Served) -> None:
    samples = sample_files()
    assert {digit for _, digit in samples} == set(range(10)), f"expected all ten digits in {SAMPLES}"
    with httpx.Client(base_url=served.url, timeout=10) as http:
        for path, digit in samples:
            response = http.post("/predict", files={"file": (path.name, path.read_bytes(), "image/png")})
            assert response.status_code == 200, response.text
            assert response.json()["prediction"] == digit, path.name
        files = [("files", (path.name, path.read_bytes())) for path, _ in samples]
        results = http.post("/predict/batch", files=files).json()["results"]
        assert [r["prediction"] for r in results] == [digit for _, digit in samples]


@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_the_seed_curl_call_works_unchanged(served: Served) -> None:
    command = ["curl", "-s", "-X", "POST", "-F", "file=@samples/zero.png", f"{served.url}/predict"]
    body = json.loads(subprocess.run(command, cwd=ROOT, capture_output=True, check=True, timeout=30).stdout)
    assert body["prediction"] == 0 and len(body["probs"]) == 10 and body["model_version"]


@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_bad_requests_over_http(served: Served) -> None:
    with httpx.Client(base_url=served.url, timeout=10) as http:
        for name, kwargs, status, detail in BAD_REQUESTS:
            response = http.post("/predict", **kwargs)
            assert response.status_code == status, (name, response.text)
            assert detail in response.json()["detail"], name
        for method in ("GET", "PUT", "DELETE"):
            response = http.request(method, "/predict")
            assert response.status_code == 405 and "use POST" in response.json()["detail"]
        huge = http.post("/predict", files={"file": ("big.png", b"\0" * (6 * 1024 * 1024))})
        assert huge.status_code == 413 and "exceeds the limit" in huge.json()["detail"]
        head = b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        chunked = http.post(
            "/predict",
            content=iter([head] + [b"x" * 1024 * 1024] * 6),
            headers={"content-type": "multipart/form-data; boundary=x"},
        )
        assert chunked.status_code == 413 and "exceeds the limit" in chunked.json()["detail"]
        garbage = http.post(
            "/predict",
            content=iter([b"x" * 1024 * 1024] * 6),
            headers={"content-type": "multipart/form-data; boundary=x"},
        )
        assert garbage.status_code == 400 and "malformed multipart body" in garbage.json()["detail"]


@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_hostile_multipart_over_http_is_a_fast_4xx(served: Served) -> None:
    replicas = [psutil.Process(pid) for pid in replica_pids(str(served.ray_tmp))]
    assert len(replicas) == 2, replicas  # serve_config.yaml: num_replicas 2
    rss_before = [p.memory_info().rss for p in replicas]
    with httpx.Client(base_url=served.url, timeout=30) as http:
        for name, (body, content_type) in hostile_parts().items():
            for _ in range(2):  # one request per replica, if the proxy alternates
                started = time.monotonic()
                response = http.post("/predict/batch", content=body, headers={"content-type": content_type})
                elapsed = time.monotonic() - started
                assert response.status_code == 413, (name, response.text)
                assert elapsed < 2, f"{name}: {elapsed:.1f} s"  # a generous DoS bound, not a speed figure
        assert http.post("/predict", files={"file": ("bar.png", BAR)}).status_code == 200
    growth = [(p.memory_info().rss - before) / 2**20 for p, before in zip(replicas, rss_before, strict=True)]
    assert max(growth) < 150, growth  # MB; the hand-written parser grew a replica by ~850 MB per request


@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_unusual_image_modes_are_handled(served: Served) -> None:
    ring = stroke_image("ring", 120)
    palette_alpha = ring.convert("RGBA").convert("P")
    palette_alpha.info["transparency"] = 0
    cases = {
        "cmyk.jpg": encode(ring.convert("CMYK"), "JPEG"),
        "16bit.png": encode(Image.fromarray(np.asarray(ring, dtype=np.uint16) * 257), "PNG"),
        "palette-alpha.png": encode(palette_alpha, "PNG"),
        "rgba.webp": encode(ring.convert("RGBA"), "WEBP"),
        "frames.gif": encode(ring, "GIF", save_all=True, append_images=[stroke_image("bar", 120)]),
        "bitmap.bmp": encode(ring, "BMP"),
    }
    with httpx.Client(base_url=served.url, timeout=10) as http:
        for name, data in cases.items():
            response = http.post("/predict", files={"file": (name, data)})
            assert response.status_code == 200, (name, response.text)
            assert response.json()["prediction"] == 0, name


@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_200_concurrent_requests_all_succeed(served: Served) -> None:
    data = (SAMPLES / "zero.png").read_bytes()

    async def fire() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=served.url, timeout=60, limits=limits) as http:
            return await asyncio.gather(
                *(http.post("/predict", files={"file": ("0.png", data)}) for _ in range(200))
            )

    responses = asyncio.run(fire())
    assert [r.status_code for r in responses] == [200] * 200
    assert {r.json()["prediction"] for r in responses} == {0}


@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_new_model_version_is_picked_up_without_a_failed_request(
    served: Served, trained_model_dir: Path
) -> None:
    data = (SAMPLES / "zero.png").read_bytes()
    old = httpx.get(f"{served.url}/healthz", timeout=5).json()["model_version"]

    async def load(new_version: asyncio.Future[str]) -> list[tuple[int, str]]:
        seen: list[tuple[int, str]] = []
        async with httpx.AsyncClient(base_url=served.url, timeout=30) as http:

            async def worker() -> None:
                deadline = None
                while deadline is None or time.monotonic() < deadline:
                    response = await http.post("/predict", files={"file": ("0.png", data)})
                    version = response.json().get("model_version", "") if response.status_code == 200 else ""
                    seen.append((response.status_code, version))
                    if deadline is None and new_version.done() and version == new_version.result():
                        deadline = time.monotonic() + 2  # keep going a little after the switch

            await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(8))), 60)
        return seen

    async def scenario() -> tuple[list[tuple[int, str]], str]:
        new_version: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        traffic = asyncio.create_task(load(new_version))
        await asyncio.sleep(2)
        new_version.set_result(await asyncio.to_thread(publish_copy, trained_model_dir, served.model_dir))
        return await traffic, new_version.result()

    seen, new = asyncio.run(scenario())
    assert new != old
    assert {status for status, _ in seen} == {200}, f"{len(seen)} requests"
    assert {version for _, version in seen} == {old, new}
    assert httpx.get(f"{served.url}/healthz", timeout=5).json() == {"status": "ok", "model_version": new}


@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_a_bad_model_file_keeps_the_last_good_model(served: Served, trained_model_dir: Path) -> None:
    good = httpx.get(f"{served.url}/healthz", timeout=5).json()["model_version"]
    publish_broken(served.model_dir)
    deadline = time.monotonic() + 30
    while (health := httpx.get(f"{served.url}/healthz", timeout=5).json())["status"] != "degraded":
        assert time.monotonic() < deadline, health
        time.sleep(0.5)
    assert health["model_version"] == good and "does not fit" in health["detail"]
    response = httpx.post(
        f"{served.url}/predict", files={"file": ("0.png", (SAMPLES / "zero.png").read_bytes())}
    )
    assert response.status_code == 200 and response.json()["model_version"] == good

    fixed = publish_copy(trained_model_dir, served.model_dir)
    deadline = time.monotonic() + 30
    while httpx.get(f"{served.url}/healthz", timeout=5).json() != {"status": "ok", "model_version": fixed}:
        assert time.monotonic() < deadline
        time.sleep(0.5)


@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_page_and_docs_through_serve(served: Served) -> None:
    with httpx.Client(base_url=served.url, timeout=10) as http:
        page = http.get("/")
        assert page.status_code == 200 and "<title>MNIST digit classifier</title>" in page.text
        assert http.get("/static/app.js").status_code == 200
        assert http.get("/docs").status_code == 200
        assert "/predict/batch" in http.get("/openapi.json").json()["paths"]


@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_serve_status_and_an_in_place_user_config_update(served: Served, tmp_path: Path) -> None:
    status = serve_cli("status", dashboard=served.dashboard)
    assert status.returncode == 0, status.stderr
    assert yaml.safe_load(status.stdout)["applications"]["mnist"]["status"] == "RUNNING"
    data = (SAMPLES / "zero.png").read_bytes()
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    config["applications"][0]["deployments"][0]["user_config"]["limits"]["max_bytes"] = len(data) // 2
    smaller = tmp_path / "serve_config.yaml"
    smaller.write_text(yaml.safe_dump(config))
    try:
        assert serve_cli("deploy", str(smaller), dashboard=served.dashboard).returncode == 0
        deadline = time.monotonic() + 60
        while (
            response := httpx.post(f"{served.url}/predict", files={"file": ("0.png", data)})
        ).status_code != 413:
            assert response.status_code == 200 and time.monotonic() < deadline  # never unavailable meanwhile
            time.sleep(0.5)
    finally:
        assert serve_cli("deploy", str(SERVE_CONFIG), dashboard=served.dashboard).returncode == 0
    deadline = time.monotonic() + 60  # every replica has the restored config, not just the one that answered
    replicas = [replica_url(pid) for pid in sorted(replica_pids(served.ray_tmp))]
    while any(
        httpx.post(f"{u}/predict", files={"file": ("0.png", data)}).status_code != 200 for u in replicas
    ):
        assert time.monotonic() < deadline
        time.sleep(0.5)


@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_model_card_and_input_image_through_serve(served: Served, trained_model_dir: Path) -> None:
    meta = load_artifact(trained_model_dir).meta
    with httpx.Client(base_url=served.url, timeout=10) as http:
        card = http.get("/model").json()
        assert card["version"] == http.get("/healthz").json()["model_version"]
        assert card["test_accuracy"] == meta["test_accuracy"] and len(card["per_digit_accuracy"]) == 10
        assert card["created_at"] and card["epochs"] == meta["epochs"] and "history" not in card
        data = (SAMPLES / "zero.png").read_bytes()
        body = http.post("/predict?include_input=1", files={"file": ("0.png", data)}).json()
    seen = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["input_png"]))))
    np.testing.assert_array_equal(seen, to_mnist(data))


@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_custom_metrics_reach_prometheus(served: Served) -> None:
    before = prometheus_scrape(served.ray_tmp)
    zeros = metric_total(before, "ray_mnist_predictions_total", digit="0")
    blanks = metric_total(before, "ray_mnist_rejected_inputs_total", reason="no_digit")
    with httpx.Client(base_url=served.url, timeout=10) as http:
        for _ in range(5):
            response = http.post("/predict", files={"file": ("0.png", (SAMPLES / "zero.png").read_bytes())})
            assert response.status_code == 200
        assert http.post("/predict", files={"file": ("blank.png", BLANK)}).status_code == 422
    deadline = time.monotonic() + 90  # Ray reports metrics every few seconds
    while True:
        scrape = prometheus_scrape(served.ray_tmp)
        if (
            metric_total(scrape, "ray_mnist_predictions_total", digit="0") >= zeros + 5
            and metric_total(scrape, "ray_mnist_rejected_inputs_total", reason="no_digit") >= blanks + 1
        ):
            break
        assert time.monotonic() < deadline, [line for line in scrape.splitlines() if "mnist_" in line]
        time.sleep(2)
    for histogram in ("ray_mnist_preprocess_seconds", "ray_mnist_model_seconds", "ray_mnist_batch_size"):
        assert metric_total(scrape, f"{histogram}_count") > 0, histogram
        assert metric_total(scrape, f"{histogram}_bucket", le="+Inf") > 0, histogram
    assert re.search(r'^ray_mnist_predictions_total\{[^}]*deployment="MNISTClassifier"', scrape, re.MULTILINE)
    assert metric_total(scrape, "ray_serve_num_http_requests_total") > 0  # Serve's own metrics, same place
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    (artifacts / "metrics.txt").write_text(
        "\n".join(line for line in scrape.splitlines() if line.startswith("ray_mnist_")) + "\n"
    )
