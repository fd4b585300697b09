"""The HTTP API without Ray: routes, limits, errors, metrics and settings, through a fake backend (``build_api``).

Run: pytest tests/test_serve.py     (seconds, no Ray; the real `serve run` is in test_serve_integration.py)
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from ray_app.model import load_artifact
from ray_app.preprocess import Limits, to_mnist
from ray_app.serve import (
    Settings,
    app,
    build_api,
    rejection_reason,
)
from tests.helpers import (
    BAD_REQUESTS,
    BAR,
    BLANK,
    CROSS,
    RING,
    DirectBackend,
    hostile_parts,
    multipart,
    publish,
)
from tests.serving import PORT, ROOT, SERVE_CONFIG


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    publish(tmp_path)
    return tmp_path


@pytest.fixture
def client(model_dir: Path) -> TestClient:
    return TestClient(build_api(DirectBackend(model_dir)))


def test_predict_returns_digit_probabilities_and_version(client: TestClient, model_dir: Path) -> None:
    response = client.post("/predict", files={"file": ("bar.png", BAR, "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"prediction", "probs", "model_version", "confident"}
    assert body["model_version"] == load_artifact(model_dir).meta["version"]
    assert len(body["probs"]) == 10 and abs(sum(body["probs"]) - 1) < 1e-4
    assert body["prediction"] == int(np.argmax(body["probs"]))


def test_batch_gives_one_result_per_image_in_order(client: TestClient) -> None:
    images = [BAR, RING, CROSS, RING, BAR]
    singles = [client.post("/predict", files={"file": ("x.png", data)}).json()["probs"] for data in images]
    response = client.post(
        "/predict/batch", files=[("files", (f"{i}.png", data)) for i, data in enumerate(images)]
    )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    np.testing.assert_allclose([r["probs"] for r in results], singles, atol=1e-5)
    assert len({tuple(p) for p in singles}) == 3  # the three shapes differ, so order is really checked


def test_batch_error_names_the_bad_file(client: TestClient) -> None:
    files = [("files", ("good.png", BAR)), ("files", ("bad.png", b"not an image"))]
    response = client.post("/predict/batch", files=files)
    assert response.status_code == 415
    assert response.json()["detail"].startswith("files[1] (bad.png): not an image")


def test_batch_without_files_field_names_it(client: TestClient) -> None:
    response = client.post("/predict/batch", files={"file": ("a.png", BAR)})
    assert response.status_code == 422
    assert "missing multipart field 'files'" in response.json()["detail"]


@pytest.mark.parametrize(
    ("kwargs", "status", "detail"), [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_requests_get_a_clear_4xx(
    client: TestClient, kwargs: dict[str, Any], status: int, detail: str
) -> None:
    response = client.post("/predict", **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert detail in response.json()["detail"]


REJECTION_REASONS = {  # BAD_REQUESTS id -> the reason label counted in mnist_rejected_inputs
    "wrong-field": "wrong_fields",
    "empty-body": "malformed_request",
    "json-body": "not_multipart",
    "form-urlencoded": "not_multipart",
    "no-boundary": "malformed_request",
    "truncated-multipart": "malformed_request",
    "two-file-fields": "wrong_fields",
    "empty-file": "unusable_image",
    "not-an-image": "not_an_image",
    "text-field": "not_an_image",
    "truncated-png": "unusable_image",
    "decompression-bomb": "image_too_large",
    "too-many-pixels": "image_too_large",
    "absurd-aspect": "unusable_image",
    "blank": "no_digit",
    "float-mode": "not_an_image",
}


def test_metrics_count_batches_and_rejections_by_reason(model_dir: Path) -> None:
    backend = DirectBackend(model_dir)
    client = TestClient(build_api(backend))
    assert client.post("/predict", files={"file": ("bar.png", BAR)}).status_code == 200
    digit = client.post("/predict", files={"file": ("bar.png", BAR)}).json()["prediction"]
    assert backend.metrics.batches == [[digit], [digit]]
    assert [case[0] for case in BAD_REQUESTS] == list(REJECTION_REASONS)
    for _, kwargs, _, _ in BAD_REQUESTS:
        client.post("/predict", **kwargs)
    client.get("/predict")  # a wrong method and route are not rejected inputs
    client.get("/nope")
    assert backend.metrics.rejections == list(REJECTION_REASONS.values())
    batch = client.post("/predict/batch", files=[("files", ("a.png", BAR)), ("files", ("b.png", BLANK))])
    assert batch.status_code == 422 and backend.metrics.rejections[-1] == "no_digit"


def test_rejection_reasons_are_bounded_labels() -> None:
    assert rejection_reason(401, "missing or wrong bearer token", from_image=False) == "unauthorized"
    assert rejection_reason(429, "", from_image=False) == "http_429"
    assert rejection_reason(422, "no digit found: the image is blank", from_image=True) == "no_digit"
    assert rejection_reason(413, "image of 9 pixels", from_image=True) == "image_too_large"
    assert rejection_reason(404, "no route /x", from_image=False) is None


def test_include_input_returns_the_image_the_model_saw(client: TestClient) -> None:
    plain = client.post("/predict", files={"file": ("bar.png", BAR)}).json()
    off = client.post("/predict?include_input=0", files={"file": ("bar.png", BAR)}).json()
    assert plain == off and "input_png" not in plain
    body = client.post("/predict?include_input=1", files={"file": ("bar.png", BAR)}).json()
    assert {k: v for k, v in body.items() if k != "input_png"} == plain
    seen = Image.open(io.BytesIO(base64.b64decode(body["input_png"])))
    assert seen.format == "PNG" and seen.size == (28, 28) and len(body["input_png"]) < 2000
    np.testing.assert_array_equal(np.asarray(seen), to_mnist(BAR))


def test_model_card_comes_from_model_json(client: TestClient, model_dir: Path, tmp_path: Path) -> None:
    meta = load_artifact(model_dir).meta
    card = client.get("/model").json()
    assert card["version"] == meta["version"] and card["architecture"] == "Net"
    assert set(card) <= set(meta) and "config" not in card  # only the card's fields
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = TestClient(build_api(DirectBackend(empty))).get("/model")
    assert missing.status_code == 503 and missing.json()["detail"].startswith("model not loaded")


def test_wrong_method_and_unknown_route(client: TestClient) -> None:
    response = client.get("/predict")
    assert response.status_code == 405
    assert response.json() == {"detail": "method GET not allowed on /predict; use POST"}
    assert client.post("/nope").json() == {"detail": "no route /nope; see /docs"}


def test_body_over_the_limit_is_413_from_header_and_while_reading(model_dir: Path) -> None:
    settings = Settings(max_body_bytes=1000)
    client = TestClient(build_api(DirectBackend(model_dir, settings)))
    body, content_type = multipart([("file", "a.png", b"x" * 2000)])
    declared = client.post("/predict", content=body, headers={"content-type": content_type})
    assert declared.status_code == 413 and "exceeds the limit of 1000" in declared.json()["detail"]
    streamed = client.post(
        "/predict", content=iter([body[:600], body[600:]]), headers={"content-type": content_type}
    )
    assert "content-length" not in streamed.request.headers
    assert streamed.status_code == 413 and "exceeds the limit of 1000" in streamed.json()["detail"]


def test_part_over_the_image_limit_is_413_while_streaming(model_dir: Path) -> None:
    client = TestClient(build_api(DirectBackend(model_dir, Settings(limits=Limits(max_bytes=1000)))))
    body, content_type = multipart([("file", "a.png", b"x" * 2000)])
    response = client.post("/predict", content=iter([body]), headers={"content-type": content_type})
    assert response.status_code == 413
    assert response.json()["detail"] == "multipart part 'file' exceeds the limit of 1000 bytes"


def test_too_many_parts_is_413(model_dir: Path) -> None:
    client = TestClient(build_api(DirectBackend(model_dir, Settings(max_files=3))))
    response = client.post("/predict/batch", files=[("files", (f"{i}.png", BAR)) for i in range(4)])
    assert response.status_code == 413 and "limit 3" in response.json()["detail"]
    exactly = client.post("/predict/batch", files=[("files", (f"{i}.png", BAR)) for i in range(3)])
    assert exactly.status_code == 200, exactly.text


def test_without_model_predict_and_healthz_are_503_with_the_reason(tmp_path: Path) -> None:
    client = TestClient(build_api(DirectBackend(tmp_path)))
    health = client.get("/healthz")
    assert health.status_code == 503
    assert health.json()["status"] == "unavailable" and "no model yet" in health.json()["detail"]
    response = client.post("/predict", files={"file": ("a.png", BAR)})
    assert response.status_code == 503 and response.headers["retry-after"]
    assert response.json()["detail"].startswith("model not loaded: no model yet")


def test_healthz_reports_the_loaded_version(client: TestClient, model_dir: Path) -> None:
    version = load_artifact(model_dir).meta["version"]
    assert client.get("/healthz").json() == {"status": "ok", "model_version": version}


def test_page_docs_and_openapi(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assets = re.findall(r'(?:src|href)="(static/[^"]+)"', page.text)
    assert {"static/app.js", "static/style.css"} <= set(assets)
    for asset in assets:
        assert client.get("/" + asset).status_code == 200
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert schema["multipart/form-data"]["schema"]["required"] == ["file"]


def test_static_files_load_nothing_from_the_internet() -> None:
    for path in (ROOT / "ray_app" / "static").iterdir():
        assert not re.search(r"(?:src|href|url|import)\W+(?:https?:)?//", path.read_text()), path


def asgi_post(api: FastAPI, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[int, dict]:
    """POST through the ASGI interface with raw header bytes (httpx would refuse some of them)."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "server": ("test", 80),
        "client": ("test", 1),
    }
    asyncio.run(api(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


def test_bad_content_length_is_400_through_the_app(model_dir: Path) -> None:
    body, content_type = multipart([("file", "bar.png", BAR)])
    api = build_api(DirectBackend(model_dir))
    for value in (b"\xb2", b"1" * 5000):
        headers = [(b"content-type", content_type.encode()), (b"content-length", value)]
        status, answer = asgi_post(api, "/predict", headers, body)
        assert status == 400 and "invalid Content-Length" in answer["detail"]
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    assert asgi_post(api, "/predict", headers, body)[0] == 200


@pytest.mark.parametrize("name", list(hostile_parts()))
def test_hostile_multipart_is_refused_fast_with_bounded_memory(model_dir: Path, name: str) -> None:
    body, content_type = hostile_parts()[name]
    client = TestClient(build_api(DirectBackend(model_dir)))
    tracemalloc.start()
    started = time.perf_counter()
    response = client.post("/predict/batch", content=body, headers={"content-type": content_type})
    elapsed = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert response.status_code == 413, response.text
    assert elapsed < 2, f"{name}: {elapsed:.1f} s"  # a generous DoS bound, not a speed figure
    assert peak < 4 * len(body) + 16 * 2**20, f"{name}: {peak / 2**20:.0f} MB"  # the old parser: +850 MB


def test_serve_config_is_valid_and_consistent() -> None:
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(SERVE_CONFIG.read_text())
    ServeDeploySchema.model_validate(config)  # Ray's own schema for `serve deploy`
    assert config["http_options"] | {"host": "0.0.0.0", "port": PORT} == config["http_options"]
    (application,) = config["applications"]
    assert application["import_path"] == "ray_app.serve:app" and application["route_prefix"] == "/"
    assert "runtime_env" not in application
    (deployment,) = application["deployments"]
    assert deployment["name"] == app._bound_deployment.name
    settings = Settings.from_user_config(deployment["user_config"])
    assert deployment["max_ongoing_requests"] >= settings.max_batch_size
    assert deployment["max_queued_requests"] >= 200  # well above the concurrency tests and benchmarks use
    assert settings.limits == Limits()  # the file states the defaults explicitly
    body_keys = ("max_files", "max_body_bytes", "max_part_header_bytes", "max_part_headers", "body_timeout_s")
    assert {k: getattr(settings, k) for k in body_keys} == {k: getattr(Settings(), k) for k in body_keys}
    assert set(body_keys) <= set(deployment["user_config"])


@pytest.mark.parametrize(
    "user_config",
    [{"max_batchsize": 8}, {"limits": {"max_byte": 1}}, {"max_batch_size": 0}, {"body_timeout_s": 0}],
)
def test_bad_user_config_is_refused(user_config: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="user_config"):
        Settings.from_user_config(user_config)
