"""Reliability and security: malformed input, fuzzing, a replica killed under load, bad model files, overload,
bearer-token auth and a soak smoke run.

Unit tests run the FastAPI app without Ray; integration tests share one ``serve run`` of the real Serve config on
port 8000 started with ``PREDICT_TOKEN`` set (the module fixture ``guarded``).

Run: pytest tests/test_reliability.py -m "not integration"     (seconds, no Ray)
     pytest tests/test_reliability.py -m integration           (starts Ray Serve on port 8000; about 3 min)
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
from typing import Any, NamedTuple

import httpx
import numpy as np
import psutil
import pytest
import yaml
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ray_app.model import METADATA, WEIGHTS
from ray_app.preprocess import InputError, Limits, preprocess, to_mnist
from ray_app.serve import TOKEN_ENV, build_api, configured_token
from tests.serving import SERVE_CONFIG, publish_copy, running_serve_app
from tests.test_serve import (
    SAMPLES,
    DirectBackend,
    encode,
    multipart,
    png_declaring,
    publish,
    publish_broken,
    serve_cli,
    stroke_image,
)

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-reliability-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REPLICA = "ServeReplica:mnist:MNISTClassifier"
ZERO = (SAMPLES / "zero.png").read_bytes()
LIMITS = Limits()
MAX_FILES = yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]["deployments"][0]["user_config"][
    "max_files"
]


# ---- malformed requests: (method, path, httpx request kwargs), built on demand (some bodies are iterators)
def _noise(mode: str = "L", size: tuple[int, int] = (200, 200), seed: int = 0) -> Image.Image:
    """A random-pixel image (compresses badly, so truncating its file cuts into pixel data)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _quarter(data: bytes) -> bytes:
    return data[: len(data) // 4]


def _file(name: str, data: bytes, path: str = "/predict") -> tuple[str, str, dict[str, Any]]:
    return "POST", path, {"files": {"file": (name, data)}}


def _raw(data: bytes, content_type: str) -> tuple[str, str, dict[str, Any]]:
    return "POST", "/predict", {"content": data, "headers": {"content-type": content_type}}


def _animated(frames: list[Image.Image]) -> bytes:
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:])


def _palette_transparent() -> bytes:
    """A palette image whose every pixel is the transparent index (nothing visible)."""
    img = stroke_image("ring", 120).convert("P")
    img.putdata([0] * (120 * 120))
    return encode(img, "PNG", transparency=0)


def _palette_alpha() -> bytes:
    img = _noise("RGBA").convert("P")
    return encode(img, "PNG", transparency=5)


def _sixteen_bit(value: int | None, size: int = 100) -> bytes:
    pixels = (
        np.full((size, size), value, np.uint16)
        if value is not None
        else np.random.default_rng(1).integers(0, 65535, (size, size), dtype=np.uint16)
    )
    return encode(Image.fromarray(pixels), "PNG")


def _low_contrast() -> bytes:
    img = stroke_image("ring", 120)
    return encode(Image.fromarray((np.asarray(img) // 16 + 230).astype(np.uint8)), "PNG")


def _boundary_mismatch() -> tuple[str, str, dict[str, Any]]:
    body, _ = multipart([("file", "a.png", ZERO)], boundary="aaaa")
    return _raw(body, "multipart/form-data; boundary=bbbb")


def _nameless_part() -> tuple[str, str, dict[str, Any]]:
    body = b"--x\r\nContent-Disposition: form-data\r\n\r\n" + ZERO + b"\r\n--x--\r\n"
    return _raw(body, "multipart/form-data; boundary=x")


def _truncated_multipart() -> tuple[str, str, dict[str, Any]]:
    body, content_type = multipart([("file", "a.png", ZERO)])
    return _raw(body[:-20], content_type)


def _chunked_huge() -> tuple[str, str, dict[str, Any]]:
    chunks = iter([b"x" * 2**20] * (LIMITS.max_bytes // 2**20 + 2))
    return (
        "POST",
        "/predict",
        {"content": chunks, "headers": {"content-type": "multipart/form-data; boundary=x"}},
    )


BATTERY: dict[str, Callable[[], tuple[str, str, dict[str, Any]]]] = {
    # empty and random
    "empty-body-no-content-type": lambda: ("POST", "/predict", {"content": b""}),
    "empty-body-multipart": lambda: _raw(b"", "multipart/form-data; boundary=x"),
    "empty-file": lambda: _file("a.png", b""),
    "random-16-bytes": lambda: _file("a.png", np.random.default_rng(2).bytes(16)),
    "random-4-kb": lambda: _file("a.png", np.random.default_rng(3).bytes(4096)),
    "random-1-mb": lambda: _file("a.bin", np.random.default_rng(4).bytes(2**20)),
    "plain-text": lambda: _file("a.txt", b"hello, world\n" * 100),
    "svg": lambda: _file("a.svg", b'<svg xmlns="http://www.w3.org/2000/svg"><text>7</text></svg>'),
    "pdf": lambda: _file("a.pdf", b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF"),
    # truncated or damaged files
    "png-signature-only": lambda: _file("a.png", b"\x89PNG\r\n\x1a\n"),
    "png-header-only": lambda: _file("a.png", encode(_noise())[:33]),
    "png-truncated-half": lambda: _file("a.png", _half(encode(_noise()))),
    "jpeg-truncated-half": lambda: _file("a.jpg", _half(encode(_noise("RGB"), "JPEG"))),
    "jpeg-magic-then-garbage": lambda: _file("a.jpg", b"\xff\xd8\xff" + np.random.default_rng(5).bytes(500)),
    "gif-truncated-half": lambda: _file("a.gif", _half(encode(_noise(), "GIF"))),
    "webp-truncated-half": lambda: _file("a.webp", _half(encode(_noise("RGB"), "WEBP"))),
    "bmp-header-only": lambda: _file("a.bmp", encode(_noise(), "BMP")[:54]),
    # formats that are not served
    "tiff": lambda: _file("a.tif", encode(stroke_image("ring"), "TIFF")),
    "ico": lambda: _file("a.ico", encode(stroke_image("ring", 64), "ICO")),
    "tga": lambda: _file("a.tga", encode(stroke_image("ring", 64), "TGA")),
    # decompression bombs
    "bomb-png-declares-30000x30000": lambda: _file("bomb.png", png_declaring(30000, 30000)),
    "bomb-png-declares-6000x6000": lambda: _file("bomb.png", png_declaring(6000, 6000)),
    "bomb-png-real-10000x3000-1bit": lambda: _file("bomb.png", encode(Image.new("1", (10000, 3000)), "PNG")),
    # animated, 16-bit, CMYK, palette+alpha: each made unusable
    "animated-gif-blank-frames": lambda: _file("a.gif", _animated([Image.new("L", (100, 100), 255)] * 3)),
    "animated-gif-4x4": lambda: _file(
        "a.gif", _animated([Image.new("L", (4, 4), 0), Image.new("L", (4, 4), 255)])
    ),
    "animated-gif-truncated-in-first-frame": lambda: _file(
        "a.gif", _quarter(_animated([_noise(seed=1), _noise(seed=2)]))
    ),
    "png-16bit-blank": lambda: _file("a.png", _sixteen_bit(30000)),
    "png-16bit-5x5": lambda: _file("a.png", _sixteen_bit(None, 5)),
    "png-16bit-truncated": lambda: _file("a.png", _half(_sixteen_bit(None))),
    "jpeg-cmyk-blank": lambda: _file("a.jpg", encode(Image.new("CMYK", (100, 100), (0, 0, 0, 0)), "JPEG")),
    "jpeg-cmyk-truncated": lambda: _file("a.jpg", _half(encode(_noise("CMYK"), "JPEG"))),
    "png-palette-all-transparent": lambda: _file("a.png", _palette_transparent()),
    "png-palette-alpha-truncated": lambda: _file("a.png", _half(_palette_alpha())),
    # absurd sizes and unusable pictures
    "size-1x5000": lambda: _file("a.png", encode(Image.new("L", (1, 5000), 0))),
    "size-5000x1": lambda: _file("a.png", encode(Image.new("L", (5000, 1), 0))),
    "size-20x5000": lambda: _file("a.png", encode(Image.new("L", (20, 5000), 0))),
    "size-1x1": lambda: _file("a.png", encode(Image.new("L", (1, 1), 0))),
    "size-7x7": lambda: _file("a.png", encode(Image.new("L", (7, 7), 0))),
    "blank-white": lambda: _file("a.png", encode(Image.new("L", (100, 100), 255))),
    "blank-black": lambda: _file("a.png", encode(Image.new("L", (100, 100), 0))),
    "low-contrast": lambda: _file("a.png", _low_contrast()),
    # wrong fields, content types, bodies
    "wrong-field-name": lambda: ("POST", "/predict", {"files": {"image": ("a.png", ZERO)}}),
    "files-field-on-predict": lambda: ("POST", "/predict", {"files": {"files": ("a.png", ZERO)}}),
    "two-file-fields": lambda: (
        "POST",
        "/predict",
        {"files": [("file", ("a", ZERO)), ("file", ("b", ZERO))]},
    ),
    "json-body": lambda: ("POST", "/predict", {"json": {"file": ZERO.hex()}}),
    "form-urlencoded": lambda: ("POST", "/predict", {"data": {"file": "x"}}),
    "raw-png-as-image-png": lambda: _raw(ZERO, "image/png"),
    "raw-png-as-octet-stream": lambda: _raw(ZERO, "application/octet-stream"),
    "raw-png-as-text-plain": lambda: _raw(ZERO, "text/plain"),
    "multipart-without-boundary": lambda: _raw(ZERO, "multipart/form-data"),
    "multipart-boundary-mismatch": _boundary_mismatch,
    "multipart-truncated": _truncated_multipart,
    "multipart-part-without-name": _nameless_part,
    # over the body limit
    "huge-body-content-length": lambda: _file("big.png", b"\0" * (LIMITS.max_bytes + 2**20)),
    "huge-body-chunked": _chunked_huge,
    # wrong method or route
    "get-predict": lambda: ("GET", "/predict", {}),
    "put-predict": lambda: ("PUT", "/predict", {"files": {"file": ("a.png", ZERO)}}),
    "delete-predict": lambda: ("DELETE", "/predict", {}),
    "get-predict-batch": lambda: ("GET", "/predict/batch", {}),
    "patch-predict-batch": lambda: ("PATCH", "/predict/batch", {}),
    "post-unknown-route": lambda: _file("a.png", ZERO, "/predictions"),
    # /predict/batch
    "batch-too-many-files": lambda: (
        "POST",
        "/predict/batch",
        {"files": [("files", (f"{i}.png", ZERO)) for i in range(MAX_FILES + 1)]},
    ),
    "batch-one-bad-file": lambda: (
        "POST",
        "/predict/batch",
        {"files": [("files", ("a.png", ZERO)), ("files", ("b.png", b"junk"))]},
    ),
    "batch-wrong-field": lambda: ("POST", "/predict/batch", {"files": {"file": ("a.png", ZERO)}}),
    "batch-empty-body": lambda: ("POST", "/predict/batch", {"content": b""}),
}


def check_4xx_json(response: httpx.Response, name: str) -> None:
    """A client error with a JSON body ``{"detail": str}``."""
    assert 400 <= response.status_code < 500, (name, response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json"), (name, response.headers)
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("detail"), str) and body["detail"], (name, body)


# ---- unit: the API without Ray (a randomly initialised model is enough for the wiring)
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model")
    publish(path)
    return path


@pytest.fixture(scope="module")
def open_client(model_dir: Path) -> TestClient:
    return TestClient(build_api(DirectBackend(model_dir)))


@pytest.fixture(scope="module")
def guarded_client(model_dir: Path) -> TestClient:
    return TestClient(build_api(DirectBackend(model_dir), token=TOKEN))


def test_battery_is_big_enough() -> None:
    assert len(BATTERY) >= 40


@pytest.mark.parametrize("name", list(BATTERY))
def test_malformed_request_is_a_4xx_json_error(guarded_client: TestClient, name: str) -> None:
    method, path, kwargs = BATTERY[name]()
    headers = {**kwargs.pop("headers", {}), **AUTH}
    check_4xx_json(guarded_client.request(method, path, headers=headers, **kwargs), name)


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}],
    ids=["missing", "wrong", "no-scheme", "basic"],
)
@pytest.mark.parametrize("path", ["/predict", "/predict/batch", "/model"])
def test_predict_without_the_right_token_is_401(guarded_client: TestClient, headers: dict, path: str) -> None:
    if path == "/model":
        response = guarded_client.get(path, headers=headers)
    else:
        field = "file" if path == "/predict" else "files"
        response = guarded_client.post(path, files={field: ("0.png", ZERO)}, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert "bearer token" in response.json()["detail"]


def test_right_token_is_served_and_healthz_stays_open(guarded_client: TestClient) -> None:
    response = guarded_client.post("/predict", files={"file": ("0.png", ZERO)}, headers=AUTH)
    assert response.status_code == 200, response.text
    batch = guarded_client.post("/predict/batch", files={"files": ("0.png", ZERO)}, headers=AUTH)
    assert batch.status_code == 200, batch.text
    assert guarded_client.get("/model", headers=AUTH).json()["version"]
    assert guarded_client.get("/healthz").status_code == 200
    assert guarded_client.get("/").status_code == 200


def test_without_a_token_configured_predict_is_open(open_client: TestClient) -> None:
    assert open_client.post("/predict", files={"file": ("0.png", ZERO)}).status_code == 200
    assert open_client.get("/model").status_code == 200


def test_configured_token_is_stripped_like_the_header(model_dir: Path) -> None:
    client = TestClient(build_api(DirectBackend(model_dir), token=f"  {TOKEN}\n"))  # a Secret --from-file
    assert configured_token(f"{TOKEN}\r\n") == TOKEN and configured_token(None) is None
    response = client.post("/predict", files={"file": ("0.png", ZERO)}, headers=AUTH)
    assert response.status_code == 200, response.text
    padded = {"Authorization": f"Bearer {TOKEN} "}
    assert client.post("/predict", files={"file": ("0.png", ZERO)}, headers=padded).status_code == 200


@pytest.mark.parametrize("value", ["", " ", "\n"])
def test_empty_token_refuses_to_start(model_dir: Path, value: str) -> None:
    with pytest.raises(ValueError, match=f"{TOKEN_ENV} is set but empty"):
        configured_token(value)
    with pytest.raises(ValueError, match=f"{TOKEN_ENV} is set but empty"):
        build_api(DirectBackend(model_dir), token=value)


# ---- property tests: preprocessing and the handler never fail with anything but a documented error
FORMAT_MODES = {
    "PNG": ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"],
    "JPEG": ["L", "RGB", "CMYK"],
    "GIF": ["L", "P"],
    "BMP": ["1", "L", "P", "RGB"],
    "WEBP": ["RGB", "RGBA"],
}


@st.composite
def images(draw: st.DrawFn) -> bytes:
    """A small image file of a random format, mode, size and content, sometimes truncated."""
    fmt = draw(st.sampled_from(sorted(FORMAT_MODES)))
    mode = draw(st.sampled_from(FORMAT_MODES[fmt]))
    width, height = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    content = draw(st.sampled_from(["noise", "constant", "blob", "stripes"]))
    if content == "noise":
        pixels = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    elif content == "constant":
        pixels = np.full((height, width, 4), rng.integers(0, 256), np.uint8)
    elif content == "blob":
        pixels = np.full((height, width, 4), 255, np.uint8)
        pixels[height // 4 : 3 * height // 4 + 1, width // 3 : 2 * width // 3 + 1] = rng.integers(0, 256, 4)
    else:
        pixels = np.zeros((height, width, 4), np.uint8)
        pixels[:, :: max(1, width // 5)] = 255
    rgba = Image.fromarray(pixels, "RGBA")
    if mode == "I;16":
        img = Image.fromarray(pixels[..., 0].astype(np.uint16) * int(rng.integers(1, 258)))
    else:
        img = rgba.convert(mode)
    transparent = mode == "P" and fmt in ("PNG", "GIF") and draw(st.booleans())  # palette + alpha
    data = encode(img, fmt, **({"transparency": int(rng.integers(0, 256))} if transparent else {}))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return data


def check_to_mnist(data: bytes) -> None:
    """``to_mnist``/``preprocess`` return a 28x28 image or raise ``InputError`` with a 4xx status; nothing else."""
    try:
        image = to_mnist(data, LIMITS)
    except InputError as exc:
        assert exc.status_code in (413, 415, 422) and exc.detail
        return
    assert image.shape == (28, 28) and image.dtype == np.uint8
    x = preprocess(data, 0.1307, 0.3081, LIMITS)
    assert x.shape == (28, 28) and x.dtype == np.float32 and np.isfinite(x).all()


PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(st.binary(max_size=4096))
def test_preprocess_random_bytes(data: bytes) -> None:
    check_to_mnist(data)


@PROPERTY
@given(
    st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"RIFF\0\0\0\0WEBP"]),
    st.binary(),
)
def test_preprocess_magic_bytes_then_garbage(magic: bytes, rest: bytes) -> None:
    check_to_mnist(magic + rest)


@PROPERTY
@given(images())
def test_preprocess_random_images(data: bytes) -> None:
    check_to_mnist(data)


@PROPERTY
@given(images())
def test_predict_handler_random_images(open_client: TestClient, data: bytes) -> None:
    response = open_client.post("/predict", files={"file": ("x", data)})
    if response.status_code != 200:
        check_4xx_json(response, "random image")
    else:
        assert response.json()["prediction"] in range(10)


@PROPERTY
@given(
    st.binary(max_size=2048),
    st.sampled_from(
        ["multipart/form-data; boundary=x", "multipart/form-data", "image/png", "", "text/plain"]
    ),
    st.sampled_from(["/predict", "/predict/batch"]),
)
def test_predict_handler_random_bodies(
    open_client: TestClient, body: bytes, content_type: str, path: str
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    check_4xx_json(open_client.post(path, content=body, headers=headers), "random body")


@PROPERTY
@given(st.lists(st.tuples(st.sampled_from(["file", "files", "x", ""]), st.binary(max_size=512)), max_size=5))
def test_predict_handler_random_multipart(open_client: TestClient, parts: list[tuple[str, bytes]]) -> None:
    body, content_type = multipart([(name, "a.png", data) for name, data in parts])
    response = open_client.post("/predict", content=body, headers={"content-type": content_type})
    check_4xx_json(response, "random multipart")


# ---- integration: one `serve run` of the real config, PREDICT_TOKEN set
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


def replica_pids(ray_tmp: str) -> set[int]:
    """PIDs of the app's Serve replicas in the Ray that uses ``ray_tmp``."""
    pids = set()
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if (
                REPLICA in " ".join(proc.info["cmdline"] or [])
                and proc.environ().get("RAY_TMPDIR") == ray_tmp
            ):
                pids.add(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids


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
            check_4xx_json(http.request(method, path, headers=headers, **kwargs), name)
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
    assert len(records) > 100
    assert first_failed <= 16  # at most the requests in flight on the killed replica
    assert len(failed) / len(records) < 0.01, sorted({r[2] for r in failed})
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

    async def burst(count: int) -> list[tuple[int, float]]:
        limits = httpx.Limits(max_connections=count)
        async with httpx.AsyncClient(base_url=guarded.url, timeout=60, limits=limits, headers=AUTH) as http:

            async def one() -> tuple[int, float]:
                began = time.monotonic()
                response = await http.post("/predict", files={"file": ("0.png", ZERO)})
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
    finally:
        restored = serve_cli("deploy", str(SERVE_CONFIG), dashboard=guarded.dashboard)
        assert restored.returncode == 0, restored.stderr
    deadline = time.monotonic() + 90
    while {status for status, _ in asyncio.run(burst(32))} != {200}:
        assert time.monotonic() < deadline, "the original queue limits were not restored"
        time.sleep(1)
