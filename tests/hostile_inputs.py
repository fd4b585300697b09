"""Hostile uploads, generated in memory: files built to stall, bloat or crash an image decoder.

Each case stands for a row of the threat table (``row``), with the bytes to send and the acceptable answers.
``kind`` says how it is sent: ``"file"`` is an image in the multipart field ``file``, ``"part-headers"`` is a whole
multipart body whose part header is the attack (``Case.body``), ``"raw"`` is a raw HTTP request over a socket. ``send`` delivers a case to one replica's
own HTTP port, ``Probe`` times ``/healthz`` on it meanwhile and ``family_rss`` sums the replica's and its decode
workers' memory. Used by ``tests/test_hostile.py`` and ``bench/hostile.py``.

Usage:
    for case in cases():
        print(case.name, len(case.data))
"""

from __future__ import annotations

import io
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import NamedTuple
from urllib.parse import urlsplit

import httpx
import numpy as np
import psutil
from PIL import Image

BOUNDARY = b"hostile0boundary"


class Case(NamedTuple):
    """One hostile input: its name, the threat it stands for, how it is sent, its bytes."""

    name: str
    row: str
    kind: str  # "file", "part-headers" or "raw"
    data: bytes
    statuses: frozenset[int]  # acceptable answers
    phrase: str  # what a 4xx detail must mention ("" = anything)

    def body(self) -> tuple[bytes, str]:
        """Multipart body and Content-Type for ``part-headers`` cases (``data`` is the part's header block)."""
        body = b"--" + BOUNDARY + b"\r\n" + self.data + b"\r\n\r\nDATA\r\n--" + BOUNDARY + b"--\r\n"
        return body, f"multipart/form-data; boundary={BOUNDARY.decode()}"


def _jpeg(img: Image.Image, **params: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", **params)
    return buffer.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _set_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    """The JPEG with its frame header (SOF0/SOF2) declaring ``width`` × ``height``."""
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = data.find(marker)
        if at >= 0:
            return data[: at + 5] + struct.pack(">HH", height, width) + data[at + 9 :]
    raise ValueError("no SOF0/SOF2 segment")


def _first_scan_end(data: bytes) -> int:
    """Offset just past the first scan's entropy-coded data (the next marker that is not a stuffed 0xFF)."""
    at = data.find(b"\xff\xda")
    at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
    while True:
        at = data.find(b"\xff", at)
        if data[at + 1] not in (0x00,) and not 0xD0 <= data[at + 1] <= 0xD7:
            return at
        at += 2


def empty_scans_jpeg(scans: int, side: int = 5000) -> bytes:
    """Progressive greyscale JPEG declaring ``side``² pixels whose first scan is followed by ``scans - 1`` empty
    10-byte AC scans (each one a pass over every block of the image for the decoder)."""
    base = _set_jpeg_size(_jpeg(Image.new("L", (16, 16), 255), progressive=True), side, side)
    head = base[: _first_scan_end(base)]
    scan = b"\xff\xda\x00\x08\x01\x01\x00\x01\x3f\x00"  # one component, spectral band 1..63, no data
    return head + scan * (scans - 1) + b"\xff\xd9"


def repeated_scans_jpeg(side: int = 7000, repeats: int = 12) -> bytes:
    """A real blank progressive JPEG of ``side``² pixels with its scans after the first repeated ``repeats`` times
    (61 valid scans at the defaults: just under the scan limit, several passes over 49 M pixels)."""
    base = _jpeg(Image.new("L", (side, side), 255), progressive=True)
    end = _first_scan_end(base)
    return base[:end] + base[end:-2] * repeats + b"\xff\xd9"


def four_component_progressive_jpeg(side: int = 5000) -> bytes:
    """A tiny CMYK progressive JPEG declaring ``side``²: the decoder holds 4 × side² coefficients."""
    base = _set_jpeg_size(_jpeg(Image.new("CMYK", (8, 8)), progressive=True), side, side)
    return base[: _first_scan_end(base)] + b"\xff\xd9"


def fill_jpeg(fill: int = 5 * 2**20 - 4096) -> bytes:
    """A valid JPEG with ``fill`` 0xFF fill bytes before its first header segment after SOI."""
    base = _jpeg(Image.new("L", (64, 64), 255))
    return base[:2] + b"\xff" * fill + base[2:]


def app1_flood_jpeg(count: int = 1_300_000) -> bytes:
    """A valid JPEG with ``count`` empty APP1 segments (4 bytes each) in its header."""
    base = _jpeg(Image.new("L", (64, 64), 255))
    return base[:2] + b"\xff\xe1\x00\x02" * count + base[2:]


def png_chunk_flood(count: int = 436_000) -> bytes:
    """A valid 64×64 PNG with ``count`` empty private chunks before its image data."""
    raw = b"".join(b"\0" + b"\xff" * 64 for _ in range(64))
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 64, 8, 0, 0, 0, 0))
        + b"\x00\x00\x00\x00prVt\xe2\xa5\x7f\x0b" * count  # an empty private chunk with its CRC
        + _png_chunk(b"IDAT", zlib.compress(raw))
        + _png_chunk(b"IEND", b"")
    )


def blank_png(width: int, height: int, colour: int, depth: int = 8, extra: bytes = b"") -> bytes:
    """A blank PNG of any size with tiny compressed data (colour type 0 grey, 2 RGB, 3 palette, 6 RGBA)."""
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour]
    row = b"\0" * (1 + width * channels * depth // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))
        + extra
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def palette_trns_png(width: int, height: int) -> bytes:
    """A blank palette PNG with a transparency table (decoded to grey + alpha)."""
    palette = _png_chunk(b"PLTE", b"\0\0\0\xff\xff\xff") + _png_chunk(b"tRNS", b"\0")
    return blank_png(width, height, 3, extra=palette)


def lossless_webp(side: int) -> bytes:
    """A blank lossless WebP of ``side``² pixels (a few hundred bytes)."""
    buffer = io.BytesIO()
    Image.new("RGBA", (side, side), (0, 0, 0, 0)).save(buffer, "WEBP", lossless=True)
    return buffer.getvalue()


def rle8_bmp(width: int, height: int) -> bytes:
    """An 8-bit RLE BMP whose rows each hold one pixel, then end-of-line (Pillow pads each row in Python)."""
    pixels = b"\x01\x01\x00\x00" * height + b"\x00\x01"
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + palette + pixels


def gif_comment_flood(blocks: int = 2_500_000) -> bytes:
    """A GIF whose comment extension holds ``blocks`` one-byte sub-blocks before its image."""
    buffer = io.BytesIO()
    Image.new("L", (16, 16), 255).save(buffer, "GIF")
    gif = buffer.getvalue()
    comment = b"\x21\xfe" + b"\x01x" * blocks + b"\x00"
    header_end = 13 + (3 << ((gif[10] & 7) + 1) if gif[10] & 0x80 else 0)
    return gif[:header_end] + comment + gif[header_end:]


def _scaled(ink: np.ndarray, long_side: int) -> np.ndarray:
    """A uint8 ink map (white on black) scaled so its longer side is ``long_side``; floats in 0..1."""
    height, width = ink.shape
    size = (round(width * long_side / max(height, width)), round(height * long_side / max(height, width)))
    return np.asarray(Image.fromarray(ink).resize(size, Image.Resampling.BICUBIC), np.float32) / 255.0


def phone_photo_jpeg(ink: np.ndarray) -> bytes:
    """A 12 MP (4032×3024) phone-style photo of the digit ``ink``: dark ink on lit grey paper with sensor noise."""
    width, height = 4032, 3024
    alpha = np.zeros((height, width), np.float32)
    digit = _scaled(ink, 1400)
    top, left = (height - digit.shape[0]) // 2, (width - digit.shape[1]) // 2
    alpha[top : top + digit.shape[0], left : left + digit.shape[1]] = digit
    rng = np.random.default_rng(0)
    paper = 175 + 30 * np.linspace(0, 1, width, dtype=np.float32)[None, :] + rng.normal(0, 4, (height, width))
    grey = np.clip(paper * (1 - alpha) + 35 * alpha, 0, 255).astype(np.uint8)
    return _jpeg(Image.fromarray(grey).convert("RGB"), quality=88)


def screenshot_png(ink: np.ndarray) -> bytes:
    """A 4K (3840×2160) RGBA screenshot-style PNG: the digit ``ink`` in black on a white page."""
    width, height = 3840, 2160
    grey = np.full((height, width), 255, np.uint8)
    digit = _scaled(ink, 900)
    top, left = (height - digit.shape[0]) // 2, (width - digit.shape[1]) // 2
    grey[top : top + digit.shape[0], left : left + digit.shape[1]] = (255 * (1 - digit)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(grey).convert("RGBA").save(buffer, "PNG")
    return buffer.getvalue()


def _multipart_param_flood() -> bytes:
    # 5 MB minus a little: the body stays under the body limit, so the part-header limit is what refuses it
    return b'Content-Disposition: form-data; name="file"; filename="' + b"a" * (5 * 2**20 - 1024) + b'"'


def _multipart_param_repeat() -> bytes:
    return b'Content-Disposition: form-data; name="file"' + b";a=" * 1_700_000


def _raw_request(content_length: bytes) -> bytes:
    return (
        b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary=x\r\n"
        b"Content-Length: " + content_length + b"\r\nConnection: close\r\n\r\n--x--\r\n"
    )


ANY_4XX = frozenset(range(400, 500))
DECODED = frozenset(
    {200, 422}
)  # admitted by the limits and decoded (or stopped by the time budget): blank → 422

# name, threat row, how it is sent, generator, acceptable statuses, a phrase the detail holds (4xx only; "" = any)
GENERATORS: list[tuple[str, str, str, Callable[[], bytes], frozenset[int], str]] = [
    (
        "progressive-empty-scans-64k",
        "progressive JPEG, thousands of empty scans",
        "file",
        lambda: empty_scans_jpeg(6500),
        frozenset({422}),
        "scans",
    ),
    (
        "progressive-empty-scans-10k",
        "progressive JPEG, thousands of empty scans",
        "file",
        lambda: empty_scans_jpeg(1000),
        frozenset({422}),
        "scans",
    ),
    (
        "progressive-empty-scans-5m",
        "same idea at 5 MB",
        "file",
        lambda: empty_scans_jpeg(520_000),
        frozenset({422}),
        "scans",
    ),
    ("progressive-61-scans-49mp", "same idea at 5 MB", "file", repeated_scans_jpeg, DECODED, ""),
    (
        "cmyk-progressive-tiny",
        "4-component progressive JPEG",
        "file",
        four_component_progressive_jpeg,
        frozenset({413}),
        "MiB",
    ),
    (
        "cmyk-progressive-under-cap",
        "4-component progressive JPEG",
        "file",
        lambda: four_component_progressive_jpeg(2800),
        DECODED,
        "",
    ),
    (
        "bmp-rle8-eol",
        "BMP RLE8, one pixel per row",
        "file",
        lambda: rle8_bmp(4000, 16000),
        frozenset({413}),
        "pixels",
    ),
    ("bmp-rle8-under-cap", "BMP RLE8, one pixel per row", "file", lambda: rle8_bmp(256, 256), DECODED, ""),
    (
        "part-header-5mb-param",
        "5 MB quoted Content-Disposition parameter",
        "part-headers",
        _multipart_param_flood,
        ANY_4XX,
        "",
    ),
    (
        "part-header-param-repeat",
        "';a=' repeated 1.7 M times",
        "part-headers",
        _multipart_param_repeat,
        ANY_4XX,
        "",
    ),
    (
        "png-16bit-25mp",
        "16-bit / RGBA PNG, lossless WebP, palette+tRNS",
        "file",
        lambda: blank_png(5000, 5000, 0, 16),
        frozenset({413}),
        "pixels",
    ),
    (
        "png-16bit-at-cap",
        "16-bit / RGBA PNG, lossless WebP, palette+tRNS",
        "file",
        lambda: blank_png(4096, 4096, 0, 16),
        DECODED,
        "",
    ),
    (
        "png-rgba-25mp",
        "16-bit / RGBA PNG, lossless WebP, palette+tRNS",
        "file",
        lambda: blank_png(5000, 5000, 6),
        frozenset({413}),
        "pixels",
    ),
    (
        "png-rgba-at-cap",
        "16-bit / RGBA PNG, lossless WebP, palette+tRNS",
        "file",
        lambda: blank_png(4000, 4000, 6),
        DECODED,
        "",
    ),
    (
        "webp-lossless-25mp",
        "16-bit / RGBA PNG, lossless WebP, palette+tRNS",
        "file",
        lambda: lossless_webp(5000),
        frozenset({413}),
        "pixels",
    ),
    (
        "webp-lossless-7.8mp",
        "16-bit / RGBA PNG, lossless WebP, palette+tRNS",
        "file",
        lambda: lossless_webp(2800),
        DECODED,
        "",
    ),
    (
        "png-palette-trns-25mp",
        "16-bit / RGBA PNG, lossless WebP, palette+tRNS",
        "file",
        lambda: palette_trns_png(5000, 5000),
        frozenset({413}),
        "pixels",
    ),
    (
        "png-palette-trns-at-cap",
        "16-bit / RGBA PNG, lossless WebP, palette+tRNS",
        "file",
        lambda: palette_trns_png(3800, 3800),
        DECODED,
        "",
    ),
    ("jpeg-5mb-fill", "JPEG with 5 MB of 0xFF fill", "file", fill_jpeg, frozenset({422}), "fill bytes"),
    ("jpeg-app1-flood", "1.3 M empty APP1 segments", "file", app1_flood_jpeg, frozenset({422}), "segments"),
    (
        "png-private-chunks",
        "PNG with 436 k private chunks",
        "file",
        png_chunk_flood,
        frozenset({422}),
        "chunks",
    ),
    (
        "gif-comment-flood",
        "GIF with 2.5 M comment sub-blocks",
        "file",
        gif_comment_flood,
        frozenset({422}),
        "blocks",
    ),
    (
        "content-length-superscript",
        "Content-Length: ² or 5,000 digits",
        "raw",
        lambda: _raw_request("²".encode()),
        frozenset({400}),
        "",
    ),
    (
        "content-length-5000-digits",
        "Content-Length: ² or 5,000 digits",
        "raw",
        lambda: _raw_request(b"9" * 5000),
        frozenset({400, 413, 431}),
        "",
    ),
]


def cases() -> list[Case]:
    """Every hostile input, generated now (a few seconds, mostly the 5 MB ones)."""
    return [
        Case(name, row, kind, make(), statuses, phrase)
        for name, row, kind, make, statuses, phrase in GENERATORS
    ]


# Sending them to one replica of a running app, and watching it
def family_rss(pid: int) -> int:
    """Resident memory of a process and all its children (a replica and its decode workers)."""
    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        with suppress(psutil.NoSuchProcess):
            total += child.memory_info().rss
    return total


class Probe:
    """``GET /healthz`` in a loop from a thread; ``worst(since)`` is the longest wait of the probes in flight at or
    after ``since`` (one sent just before and answered after counts: it waited through the start)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.samples: list[tuple[float, float]] = []  # (sent at, seconds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                sent = time.monotonic()
                client.get(f"{self.url}/healthz")
                self.samples.append((sent, time.monotonic() - sent))
                self._stop.wait(0.01)

    def worst(self, since: float) -> float:
        """Longest wait among probes answered at or after ``since`` (waits for one sent after ``since``)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not self.samples or self.samples[-1][0] < since):
            time.sleep(0.01)
        return max((s for t, s in self.samples if t + s >= since), default=0.0)

    @contextmanager
    def running(self) -> Iterator[Probe]:
        """Probe while the block runs."""
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(timeout=30)


def send(url: str, case: Case) -> tuple[int, str]:
    """Send one case to ``url``; its status and detail (raw cases: the status line only)."""
    if case.kind == "raw":
        address = urlsplit(url)
        with socket.create_connection((address.hostname, address.port), timeout=10) as conn:
            conn.sendall(case.data)
            reply = conn.recv(65536).decode("latin-1")
        return int(reply.split()[1]), reply.partition("\r\n\r\n")[2]
    if case.kind == "part-headers":
        body, content_type = case.body()
        response = httpx.post(
            f"{url}/predict", content=body, headers={"content-type": content_type}, timeout=30
        )
    else:
        response = httpx.post(f"{url}/predict", files={"file": (f"{case.name}.bin", case.data)}, timeout=30)
    try:
        detail = str(response.json().get("detail", ""))
    except ValueError:
        detail = response.text
    return response.status_code, detail
