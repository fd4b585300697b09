"""Serving: the routes, multipart parsing, settings and hot reload without Ray (unit), then a real
``serve run ray_app/serve_config.yaml`` answering over HTTP on port 8000 (integration).

Run: pytest tests/test_serve.py -m "not integration"     (seconds, no Ray)
     pytest tests/test_serve.py -m integration           (starts Ray Serve on port 8000; a few minutes)
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import re
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from contextlib import suppress
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw
from starlette.exceptions import HTTPException
from starlette.requests import Request
from torch import nn

from ray_app.decode import Decoder
from ray_app.model import METADATA, WEIGHTS, ModelConfig, Net, load_artifact, save_artifact
from ray_app.multipart import Form, FormLimits, Part, read_form
from ray_app.preprocess import Limits, preprocess, to_mnist
from ray_app.serve import (
    LoadedModel,
    ModelSlot,
    Prediction,
    ServeMetrics,
    Settings,
    _for_inference,
    app,
    build_api,
    infer,
    rejection_reason,
)
from tests.serving import PORT, ROOT, SERVE_CONFIG, Served, publish_copy

SAMPLES = ROOT / "samples"
NORMALIZATION = {"mean": 0.1307, "std": 0.3081}
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


# ---- images
def encode(img: Image.Image, fmt: str = "PNG", **params: Any) -> bytes:
    """Image file bytes."""
    buffer = io.BytesIO()
    img.save(buffer, fmt, **params)
    return buffer.getvalue()


def stroke_image(kind: str, size: int = 200, mode: str = "L") -> Image.Image:
    """Black strokes on white at ``size``: a vertical bar ("bar"), a ring ("ring") or a cross ("cross")."""
    img = Image.new(mode, (size, size), "white")
    draw = ImageDraw.Draw(img)
    width, lo, hi = size // 12, size // 5, size * 4 // 5
    if kind == "bar":
        draw.line([(size // 2, lo), (size // 2, hi)], fill="black", width=width)
    elif kind == "ring":
        draw.ellipse([lo + size // 10, lo, hi - size // 10, hi], outline="black", width=width)
    else:
        draw.line([(lo, lo), (hi, hi)], fill="black", width=width)
        draw.line([(lo, hi), (hi, lo)], fill="black", width=width)
    return img


def png_declaring(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose header declares ``width`` x ``height`` (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
        + chunk(b"IEND", b"")
    )


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "b0undary") -> tuple[bytes, str]:
    """A multipart/form-data body and its Content-Type, built by hand (name, filename, data)."""
    body = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


BAR, RING, CROSS = (encode(stroke_image(kind)) for kind in ("bar", "ring", "cross"))
BLANK = encode(Image.new("L", (100, 100), 255))
NOISE = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300), dtype=np.uint8)))

# (id, request kwargs for httpx, expected status, text the detail must contain)
BAD_REQUESTS: list[tuple[str, dict[str, Any], int, str]] = [
    ("wrong-field", {"files": {"image": ("a.png", BAR)}}, 422, "missing multipart field 'file'"),
    (
        "empty-body",
        {"content": b"", "headers": {"content-type": "multipart/form-data; boundary=x"}},
        400,
        "empty",
    ),
    ("json-body", {"json": {"file": "x"}}, 415, "expected multipart/form-data"),
    ("form-urlencoded", {"data": {"file": "x"}}, 415, "expected multipart/form-data"),
    ("no-boundary", {"content": b"abc", "headers": {"content-type": "multipart/form-data"}}, 400, "boundary"),
    (
        "truncated-multipart",
        {
            "content": multipart([("file", "a.png", BAR)])[0][:-20],
            "headers": {"content-type": multipart([])[1]},
        },
        400,
        "closing boundary",
    ),
    (
        "two-file-fields",
        {"files": [("file", ("a.png", BAR)), ("file", ("b.png", BAR))]},
        422,
        "/predict/batch",
    ),
    ("empty-file", {"files": {"file": ("a.png", b"")}}, 422, "empty upload"),
    ("not-an-image", {"files": {"file": ("a.png", b"hello, world" * 10)}}, 415, "not an image"),
    ("text-field", {"data": {"x": "1"}, "files": {"file": ("a.txt", b"just text")}}, 415, "not an image"),
    ("truncated-png", {"files": {"file": ("a.png", NOISE[: len(NOISE) // 2])}}, 422, "truncated"),
    ("decompression-bomb", {"files": {"file": ("bomb.png", png_declaring(30000, 30000))}}, 413, "pixels"),
    ("too-many-pixels", {"files": {"file": ("big.png", png_declaring(6000, 6000))}}, 413, "pixels"),
    ("absurd-aspect", {"files": {"file": ("a.png", encode(Image.new("L", (2000, 20), 255)))}}, 422, "aspect"),
    ("blank", {"files": {"file": ("a.png", encode(Image.new("L", (100, 100), 255)))}}, 422, "no digit found"),
    ("float-mode", {"files": {"file": ("a.tif", encode(Image.new("F", (50, 50)), "TIFF"))}}, 415, ""),
]


# ---- unit: the API without Ray
def publish(model_dir: Path, seed: int = 0) -> str:
    """Publish a randomly initialised model (enough to exercise the wiring) and return its version."""
    torch.manual_seed(seed)
    meta = {"config": asdict(ModelConfig()), "normalization": NORMALIZATION}
    return save_artifact(model_dir, Net().state_dict(), meta)


def publish_broken(model_dir: Path) -> None:
    """Swap in a consistent but unusable pair: weights of a narrower network than ``model.json`` declares."""
    buffer = io.BytesIO()
    torch.save(Net(conv1=8).state_dict(), buffer)
    weights = buffer.getvalue()
    meta = {
        "version": "broken",
        "architecture": "Net",
        "config": asdict(ModelConfig()),
        "normalization": NORMALIZATION,
        "sha256": hashlib.sha256(weights).hexdigest(),
    }
    for name, data in ((WEIGHTS, weights), (METADATA, json.dumps(meta).encode())):
        (model_dir / f".{name}.tmp").write_bytes(data)
        os.replace(model_dir / f".{name}.tmp", model_dir / name)


class RecordingMetrics(ServeMetrics):
    """The real Ray Serve metrics, plus a list of what was recorded (to assert on)."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[int]] = []
        self.rejections: list[str | None] = []

    def batch(self, digits: list[int], seconds: float) -> None:
        super().batch(digits, seconds)
        self.batches.append(digits)

    def reject(self, status_code: int, detail: str, from_image: bool = False) -> None:
        super().reject(status_code, detail, from_image)
        self.rejections.append(rejection_reason(status_code, detail, from_image))


class DirectBackend:
    """The routes' backend without Serve: each image is classified alone (in a replica Serve batches them)."""

    def __init__(self, model_dir: Path, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.metrics = RecordingMetrics()
        self.decoder = Decoder(self.settings.decode)  # worker processes start on first use
        self.slot = ModelSlot(model_dir)
        self.slot.poll()

    async def classify(self, image: np.ndarray) -> Prediction:
        (result,) = infer(self.slot, self.metrics, [image])
        return result


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
    assert set(body) == {"prediction", "probs", "model_version"}
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


def test_metrics_record_outside_a_replica() -> None:
    metrics = ServeMetrics()  # without Serve's replica context: no deployment tags, still recorded
    metrics.batch([3, 3, 7, 0], 0.002)
    metrics.batch([], 0.0)
    metrics.preprocess_s.observe(0.001)
    metrics.reject(422, "no digit found: the image is blank", from_image=True)
    assert rejection_reason(401, "missing or wrong bearer token", from_image=False) == "unauthorized"
    assert rejection_reason(429, "", from_image=False) == "http_429"


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


def test_slow_body_is_408() -> None:
    async def receive() -> dict[str, Any]:
        await asyncio.sleep(1)
        return {"type": "http.request", "body": b"x", "more_body": False}

    request = Request(
        {
            "type": "http",
            "method": "POST",
            "headers": [(b"content-type", b"multipart/form-data; boundary=x")],
        },
        receive,
    )
    with pytest.raises(HTTPException) as raised:
        asyncio.run(read_form(request, "file", form_limits(timeout_s=0.05)))
    assert raised.value.status_code == 408 and "not received within 0.05 s" in raised.value.detail


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
    for asset in re.findall(r'(?:src|href)="(static/[^"]+)"', page.text):
        assert client.get("/" + asset).status_code == 200
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert schema["multipart/form-data"]["schema"]["required"] == ["file"]


def test_static_files_load_nothing_from_the_internet() -> None:
    for path in (ROOT / "ray_app" / "static").iterdir():
        assert not re.search(r"(?:src|href|url|import)\W+(?:https?:)?//", path.read_text()), path


# ---- unit: multipart reading (python-multipart, streamed, bounded)
def form_limits(**overrides: Any) -> FormLimits:
    """The default multipart limits with some replaced."""
    return replace(Settings().form_limits(), **overrides)


def read(
    body: bytes,
    content_type: str = "multipart/form-data; boundary=b0undary",
    field: str = "file",
    limits: FormLimits | None = None,
    chunk: int = 65536,
    content_length: bytes | None = None,
) -> Form:
    """``read_form`` over a body delivered in ``chunk``-byte ASGI messages."""
    messages = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]

    async def receive() -> dict[str, Any]:
        data = messages.pop(0)
        return {"type": "http.request", "body": data, "more_body": bool(messages)}

    headers = [(b"content-type", content_type.encode("latin-1"))]
    if content_length is not None:
        headers.append((b"content-length", content_length))
    request = Request({"type": "http", "method": "POST", "headers": headers}, receive)
    return asyncio.run(read_form(request, field, limits or form_limits()))


def refusal(*args: Any, **kwargs: Any) -> tuple[int, str]:
    """Status and detail of the 4xx ``read`` raises."""
    with pytest.raises(HTTPException) as raised:
        read(*args, **kwargs)
    return raised.value.status_code, raised.value.detail


def part_with_headers(headers: bytes, data: bytes = b"DATA") -> bytes:
    """A one-part body with the given header block."""
    return b"--b0undary\r\n" + headers + b"\r\n\r\n" + data + b"\r\n--b0undary--\r\n"


@pytest.mark.parametrize("chunk", [1, 7, 64, 65536])
def test_multipart_keeps_binary_data_exactly_across_chunks(chunk: int) -> None:
    data = b"\r\n--b0undar\r\n--\x00\xff" * 50  # looks like a boundary but is not one
    body, content_type = multipart([("file", "x.png", data), ("note", None, b"hi"), ("file", None, b"")])
    form = read(body + b"epilogue", content_type, chunk=chunk)
    assert form.parts == [Part("file", "x.png", data), Part("file", None, b"")]
    assert form.names == ["file", "note", "file"]  # other parts are named but not kept


def test_multipart_quoted_boundary_and_escaped_filename() -> None:
    body = (
        b"--a:b c\r\nContent-Type: image/png\r\n"
        b'content-disposition: form-data; filename="q\\"x.png"; name=file\r\n'
        b"\r\nDATA\r\n--a:b c--"
    )
    (part,) = read(body, 'multipart/form-data; boundary="a:b c"').parts
    assert part == ("file", 'q"x.png', b"DATA")


@pytest.mark.parametrize(
    ("body", "content_type", "status", "detail"),
    [
        (part_with_headers(b"Content-Type: image/png"), None, 400, "no Content-Disposition name"),
        (b"--b0undary\r\nContent-Disposition: form-data; name=file\r\n\r\nDATA", None, 400, "truncated"),
        (b"DATA", None, 400, "malformed multipart body"),
        (b"preamble\r\n" + part_with_headers(b"Content-Disposition: form-data; name=file"), None, 400, ""),
        (part_with_headers(b"Bad Header: x"), None, 400, "malformed multipart body"),
        (b"DATA", "image/png", 415, "expected multipart/form-data with a 'file' field, got image/png"),
        (b"DATA", "multipart/form-data", 400, "no boundary"),
        (b"DATA", "multipart/form-data; boundary=" + "x" * 71, 400, "no boundary"),
        (b"DATA", "multipart/form-data; boundary=x; " + "a" * 2000, 400, "Content-Type longer than"),
        (b"", None, 400, "empty request body"),
    ],
)
def test_malformed_multipart(body: bytes, content_type: str | None, status: int, detail: str) -> None:
    got = refusal(body, content_type or "multipart/form-data; boundary=b0undary")
    assert got[0] == status and detail in got[1]


def test_part_header_bytes_are_limited_per_line_and_per_part() -> None:
    disposition = b"Content-Disposition: form-data; name=file"
    limits = form_limits(max_header_bytes=200)
    assert read(part_with_headers(disposition + b"; x=" + b"y" * 100), limits=limits).parts
    long_line = part_with_headers(disposition + b"; x=" + b"y" * 300)
    assert refusal(long_line, limits=limits) == (413, "a part's header line exceeds 200 bytes")
    assert refusal(long_line, limits=limits, chunk=16) == (413, "a part's header line exceeds 200 bytes")
    several = part_with_headers(disposition + b"".join(b"\r\nX-%d: %s" % (i, b"v" * 60) for i in range(4)))
    assert refusal(several, limits=limits) == (413, "a part's headers exceed 200 bytes")


def test_part_header_count_is_limited() -> None:
    headers = b"Content-Disposition: form-data; name=file" + b"\r\nX-A: 1" * 3
    assert read(part_with_headers(headers), limits=form_limits(max_headers=4)).parts
    assert refusal(part_with_headers(headers), limits=form_limits(max_headers=3)) == (
        413,
        "a part has more than 3 headers",
    )


def test_part_bytes_parts_and_body_bytes_are_limited() -> None:
    body, content_type = multipart([("note", None, b"x" * 101), ("file", "a.png", b"y")])
    assert refusal(body, content_type, limits=form_limits(max_part_bytes=100), chunk=50) == (
        413,
        "multipart part 'note' exceeds the limit of 100 bytes",
    )
    body, content_type = multipart([("file", None, b"x")] * 4)
    assert len(read(body, content_type, limits=form_limits(max_parts=4)).parts) == 4
    assert refusal(body, content_type, limits=form_limits(max_parts=3)) == (
        413,
        "too many parts in one request (limit 3)",
    )
    assert refusal(body, content_type, limits=form_limits(max_body_bytes=len(body) - 1), chunk=10)[0] == 413


@pytest.mark.parametrize(
    ("value", "status"),
    [
        (b"\xb2", 400),  # '\u00b2' (superscript two): str.isdigit() accepts it, int() does not
        (b"9" * 5000, 400),
        (b"9" * 20, 400),
        (b"-1", 400),
        (b"+12", 400),
        (b"1_000", 400),
        (b"", 400),
        (b"9" * 19, 413),  # well-formed, over the limit
    ],
)
def test_content_length_must_be_1_to_19_ascii_digits(value: bytes, status: int) -> None:
    code, detail = refusal(multipart([("file", None, b"x")])[0], content_length=value)
    assert code == status
    assert ("1 to 19 ASCII digits" in detail) == (status == 400) and len(detail) < 200


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


def hostile_parts() -> dict[str, tuple[bytes, str]]:
    """Multipart bodies that attacked the hand-written parser (each under the 5 MiB body limit)."""
    disposition = b'Content-Disposition: form-data; name="file"; filename="a.png"'
    return {
        "quoted-parameter-5MB": (
            part_with_headers(b'Content-Disposition: form-data; name="file"; x="' + b"a" * 5_000_000 + b'"'),
            "multipart/form-data; boundary=b0undary",
        ),
        "semicolon-a-equals-1.7M": (
            part_with_headers(b"Content-Disposition: form-data; name=file" + b";a=" * 1_700_000),
            "multipart/form-data; boundary=b0undary",
        ),
        "many-headers": (
            part_with_headers(disposition + b"".join(b"\r\nX-%d: 1" % i for i in range(100_000))),
            "multipart/form-data; boundary=b0undary",
        ),
        "many-parts": (
            b"--b0undary\r\nContent-Disposition: form-data; name=files\r\n\r\nx\r\n" * 50_000
            + b"--b0undary--",
            "multipart/form-data; boundary=b0undary",
        ),
    }


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


# ---- unit: settings, model slot, batched inference
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


@pytest.mark.parametrize(
    "user_config",
    [{"max_batchsize": 8}, {"limits": {"max_byte": 1}}, {"max_batch_size": 0}, {"body_timeout_s": 0}],
)
def test_bad_user_config_is_refused(user_config: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="user_config"):
        Settings.from_user_config(user_config)


def test_model_slot_hot_reload(tmp_path: Path) -> None:
    slot = ModelSlot(tmp_path)
    assert not slot.poll() and slot.current is None and "no model yet" in slot.health()[1]["detail"]
    first = publish(tmp_path, seed=1)
    assert slot.poll() and slot.current.version == first
    assert not slot.poll()  # unchanged files: nothing loaded

    publish_broken(tmp_path)  # a bad new pair: keep serving the last good model
    assert not slot.poll()
    status, body = slot.health()
    assert status == 200 and body["status"] == "degraded" and body["model_version"] == first
    assert "does not fit" in body["detail"]

    time.sleep(1.1)  # versions are timestamped to the second
    second = publish(tmp_path, seed=2)
    assert (
        slot.poll()
        and slot.current.version == second
        and slot.health() == (200, {"status": "ok", "model_version": second})
    )


def test_batched_inference_matches_single_images_and_the_training_normalisation(model_dir: Path) -> None:
    artifact = load_artifact(model_dir)
    loaded = LoadedModel.from_artifact(artifact)
    images = [BAR, RING, CROSS]
    batch = loaded.predict([to_mnist(data) for data in images])
    for data, result in zip(images, batch, strict=True):
        (single,) = loaded.predict([to_mnist(data)])
        assert result.probs == pytest.approx(single.probs, abs=1e-5)
        x = torch.from_numpy(preprocess(data, **NORMALIZATION))[None, None]
        with torch.inference_mode():
            expected = torch.softmax(artifact.model(x), dim=1)[0].tolist()
        assert result.probs == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("negative_scale", [False, True])
def test_inference_copy_folds_batchnorm_without_changing_outputs(negative_scale: bool) -> None:
    torch.manual_seed(0)
    model = Net().eval()
    for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
        norm.weight.data.uniform_(0.5, 2)
        norm.bias.data.uniform_(-1, 1)
    if negative_scale:  # max-pool does not commute with a flipped sign: that BatchNorm must stay
        model.features[2].weight.data[0] = -1.0
    fast = _for_inference(model)
    kept = sum(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert kept == (1 if negative_scale else 0)
    x = torch.randn(32, 1, 28, 28)
    with torch.inference_mode():
        assert torch.allclose(fast(x.contiguous(memory_format=torch.channels_last)), model(x), atol=1e-4)


# ---- integration: a real `serve run` over HTTP (the session's shared app: `served` in conftest.py)
def sample_files() -> list[tuple[Path, int]]:
    """Committed samples of every style with their digit, from the file name (``zero.png``, ``ink/7.png``)."""
    found = []
    for path in sorted(SAMPLES.rglob("*.png")):
        words = [w for w in re.split(r"[^a-z0-9]+", path.stem.lower()) if w]
        digits = [
            WORDS.index(w) if w in WORDS else int(w)
            for w in words
            if w in WORDS or (w.isdigit() and len(w) == 1)
        ]
        if digits:
            found.append((path, digits[0]))
    return found


@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_healthz_is_503_until_the_model_appears(served: Served) -> None:
    assert served.first_health.status_code == 503
    assert served.first_health.json()["status"] == "unavailable"
    assert "no model yet" in served.first_health.json()["detail"]
    assert served.pickup_s < 10  # picked up by polling, no restart
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
        chunked = http.post(
            "/predict",
            content=iter([b"x" * 1024 * 1024] * 6),
            headers={"content-type": "multipart/form-data; boundary=x"},
        )
        assert chunked.status_code == 413


@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_hostile_multipart_over_http_is_a_fast_4xx(served: Served) -> None:
    with httpx.Client(base_url=served.url, timeout=30) as http:
        for name, (body, content_type) in hostile_parts().items():
            started = time.monotonic()
            response = http.post("/predict/batch", content=body, headers={"content-type": content_type})
            elapsed = time.monotonic() - started
            assert response.status_code == 413, (name, response.text)
            assert elapsed < 2, f"{name}: {elapsed:.1f} s"  # a generous DoS bound, not a speed figure
        assert http.post("/predict", files={"file": ("bar.png", BAR)}).status_code == 200


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


def serve_cli(*args: str, dashboard: str) -> subprocess.CompletedProcess:
    """Run the ``serve`` CLI against a cluster's dashboard (token auth: the CLI reads ~/.ray/auth_token)."""
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    command = [sys.executable, "-m", "ray.serve.scripts", *args, "--address", dashboard]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


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
    deadline = time.monotonic() + 60
    while httpx.post(f"{served.url}/predict", files={"file": ("0.png", data)}).status_code != 200:
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


def prometheus_scrape(ray_tmp: Path) -> str:
    """Everything the Ray cluster under ``ray_tmp`` exports, from the targets its dashboard writes for
    Prometheus file-based service discovery."""
    (discovery,) = ray_tmp.glob("ray/session_latest/prom_metrics_service_discovery.json")
    targets = [t for group in json.loads(discovery.read_text()) for t in group["targets"]]
    texts = []
    for target in targets:
        with suppress(httpx.HTTPError):
            texts.append(httpx.get(f"http://{target}/metrics", timeout=10).text)
    return "\n".join(texts)


def metric_total(scrape: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (over replicas)."""
    total = 0.0
    for match in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", scrape, re.MULTILINE):
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


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
