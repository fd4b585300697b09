"""Reliability and security without Ray: the malformed-request battery, bearer-token auth, and property tests of
preprocessing and the handlers (hypothesis). The same over a real ``serve run``: test_reliability_integration.py.

Run: pytest tests/test_reliability.py     (seconds, no Ray)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ray_app.preprocess import InputError, to_mnist
from ray_app.serve import (
    TOKEN_ENV,
    build_api,
    configured_token,
)
from tests.battery_expected import check_expected
from tests.helpers import (
    AUTH,
    BATTERY,
    LIMITS,
    TOKEN,
    ZERO,
    DirectBackend,
    check_4xx_json,
    encode,
    multipart,
    publish,
)


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


@pytest.mark.parametrize("name", list(BATTERY))
def test_malformed_request_is_a_4xx_json_error(guarded_client: TestClient, name: str) -> None:
    method, path, kwargs = BATTERY[name]()
    headers = {**kwargs.pop("headers", {}), **AUTH}
    # its exact status and detail (tests/battery_expected.py)
    check_expected(guarded_client.request(method, path, headers=headers, **kwargs), name)


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
    """``to_mnist`` returns a 28x28 image or raises ``InputError`` with a 4xx status; nothing else."""
    try:
        image = to_mnist(data, LIMITS)
    except InputError as exc:
        assert exc.status_code in (413, 415, 422) and exc.detail
        return
    assert image.shape == (28, 28) and image.dtype == np.uint8


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
