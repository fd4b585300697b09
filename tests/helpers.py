"""Shared test helpers: image and multipart builders, the malformed-request battery, a fake backend for the HTTP
API without Serve, model publishing, and lookups in a running app. No test file imports another; they import this.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from contextlib import suppress
from dataclasses import asdict
from itertools import permutations
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import torch
import yaml
from PIL import Image, ImageDraw

from ray_app.decode import Decoder
from ray_app.inference import LoadedModel, ModelSlot, Prediction
from ray_app.model import METADATA, WEIGHTS, ModelConfig, Net, load_artifact, save_artifact
from ray_app.preprocess import Limits, to_mnist
from ray_app.serve import (
    ServeMetrics,
    Settings,
    infer,
    rejection_reason,
)
from tests.serving import ROOT, SERVE_CONFIG

SAMPLES = ROOT / "samples"
NORMALIZATION = {"mean": 0.1307, "std": 0.3081}
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


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
        (result,) = infer(self.slot, self.metrics, [image], self.settings.confidence_threshold)
        return result


def part_with_headers(headers: bytes, data: bytes = b"DATA") -> bytes:
    """A one-part body with the given header block."""
    return b"--b0undary\r\n" + headers + b"\r\n\r\n" + data + b"\r\n--b0undary--\r\n"


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


def side_by_side(*names: str) -> bytes:
    """A PNG of committed samples pasted next to each other (``side_by_side("six", "nine")``): not one digit."""
    images = [Image.open(SAMPLES / f"{name}.png").convert("L") for name in names]
    canvas = Image.new("L", (sum(i.width for i in images), max(i.height for i in images)))
    x = 0
    for image in images:
        canvas.paste(image, (x, 0))
        x += image.width
    return encode(canvas)


def unsure_pairs(model_dir: Path) -> list[tuple[str, str]]:
    """The ordered pairs of committed samples that the model in ``model_dir`` is not sure of, side by side."""
    pairs = list(permutations(WORDS, 2))
    results = LoadedModel.from_artifact(load_artifact(model_dir)).predict(
        [to_mnist(side_by_side(*names)) for names in pairs]
    )
    return [names for names, result in zip(pairs, results, strict=True) if not result.confident]


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


def serve_cli(*args: str, dashboard: str) -> subprocess.CompletedProcess:
    """Run the ``serve`` CLI against a cluster's dashboard (token auth: the CLI reads ~/.ray/auth_token)."""
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    command = [sys.executable, "-m", "ray.serve.scripts", *args, "--address", dashboard]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


TOKEN = "s3cret-reliability-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REPLICA = "ServeReplica:mnist:MNISTClassifier"
ZERO = (SAMPLES / "zero.png").read_bytes()
LIMITS = Limits()
MAX_FILES = yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]["deployments"][0]["user_config"][
    "max_files"
]


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
    """A well-formed part streamed without Content-Length, past the body limit."""
    head = b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
    chunks = iter([head] + [b"x" * 2**20] * (Settings().max_body_bytes // 2**20 + 2))
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


def replica_pids(ray_tmp: str | Path) -> set[int]:
    """PIDs of the app's Serve replicas in the Ray that uses ``ray_tmp``."""
    ray_tmp = str(ray_tmp)
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


def replica_url(pid: int, wait_s: float = 30.0) -> str:
    """The address of a replica's own HTTP server (its direct ingress, behind the shared ingress), waiting up to
    ``wait_s`` for a replica that is still starting to listen and answer."""
    deadline = time.monotonic() + wait_s
    while True:
        listening = [c.laddr.port for c in psutil.Process(pid).net_connections("tcp") if c.status == "LISTEN"]
        for port in listening:
            with suppress(httpx.HTTPError, ValueError):
                if "status" in httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).json():
                    return f"http://127.0.0.1:{port}"
        if time.monotonic() > deadline:
            raise AssertionError(
                f"replica {pid} answers /healthz on none of its ports {listening} in {wait_s} s"
            )
        time.sleep(0.5)


def ray_processes(ray_tmp: str) -> set[int]:
    """PIDs of every process whose environment says it belongs to the Ray under ``ray_tmp`` (its ``RAY_TMPDIR``)."""
    pids = set()
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("RAY_TMPDIR") == ray_tmp:
                pids.add(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids


def prometheus_scrape(ray_tmp: Path) -> str:
    """Everything the Ray cluster under ``ray_tmp`` exports, from the targets its dashboard writes for
    Prometheus file-based service discovery."""
    (discovery,) = ray_tmp.glob("ray/session_latest/prom_metrics_service_discovery.json")
    targets = [t for group in json.loads(discovery.read_text()) for t in group["targets"]]
    texts = []
    for target in targets:
        try:
            texts.append(httpx.get(f"http://{target}/metrics", timeout=10).text)
        except httpx.HTTPError:
            continue
    return "\n".join(texts)


def metric_total(scrape: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (over replicas)."""
    total = 0.0
    for match in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", scrape, re.MULTILINE):
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def recorded_epoch(model_dir: Path) -> int | None:
    """The epoch of the latest checkpoint Ray Train recorded for the run under ``model_dir`` (``None`` while
    there is none or its snapshot is being written)."""
    try:
        (snapshot,) = model_dir.glob("ray_results/*/checkpoint_manager_snapshot.json")
        return json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["epoch"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
