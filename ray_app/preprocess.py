"""Uploaded image bytes → a 28×28 MNIST-style digit: white ink on black, 20×20 box, centred by centre of mass.

Usage: ``x = preprocess(data, mean, std)`` with ``mean``/``std`` from ``model.json``; ``to_mnist(data)`` returns the
uint8 image the model sees. Anything unusable raises :class:`InputError`, which carries an HTTP status and a message.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP")
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)
_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {  # EXIF orientation → the transpose that undoes it (as in ImageOps.exif_transpose)
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

SIDE = 28  # output image side
BOX = 20  # the digit's longer side, as in MNIST
CENTRE = 14.0  # where MNIST puts the centre of mass (row and column index; measured on the test set)
WORK_SIDE = 256  # big uploads are shrunk by an integer factor while their longer side stays at least this
NORM_SIDE = 4 * BOX  # a bigger cropped digit is brought to this size to measure and adjust its stroke width
# Stroke width relative to the digit's longer side (MNIST: median 0.10, 1st percentile 0.05, 90th 0.14).
MIN_STROKE = 0.05  # thinner (a fine pen on a big canvas) is thickened …
TARGET_STROKE = 0.11  # … to this
MAX_STROKE = 0.14  # a bigger drawing with thicker strokes (a felt marker) is thinned …
THICK_TARGET = 0.10  # … to this
MIN_CONTRAST = 48  # ink must differ from the background by this much (of 255), else there is no digit
SPECK_SHARE = 0.03  # ink cut off from the digit by empty lines and holding less than this share is noise


class InputError(ValueError):
    """An upload that cannot be turned into a digit; ``status_code`` is the HTTP status to answer with."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


@dataclass(frozen=True)
class Limits:
    """Which uploads are accepted; checked on the body and the image header, before any pixel is decoded."""

    max_bytes: int = 5 * 1024 * 1024  # larger bodies → 413
    max_pixels: int = 25_000_000  # width × height declared in the header; more → 413 (decompression bombs)
    max_aspect: float = 20.0  # longer side / shorter side; more → 422
    min_side: int = 8  # shorter side in pixels; less → 422

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_pixels < 1 or self.min_side < 1 or self.max_aspect < 1:
            raise ValueError(f"invalid limits: {self}")


def preprocess(data: bytes, mean: float, std: float, limits: Limits = Limits()) -> np.ndarray:
    """Upload bytes → float32 (28, 28), ``(x - mean) / std`` with x in [0, 1], white ink on black."""
    x = to_mnist(data, limits).astype(np.float32) / 255.0
    return (x - np.float32(mean)) / np.float32(std)


def to_mnist(data: bytes, limits: Limits = Limits()) -> np.ndarray:
    """Upload bytes → the uint8 (28, 28) MNIST-style image the model sees.

    Raises:
        InputError: 413 (too many bytes or pixels), 415 (not an image in a supported format) or 422 (corrupt,
            truncated, too small, absurd aspect ratio, no digit found).
    """
    gray = _decode(_open(data, limits))
    if _in_mnist_format(gray):
        return gray
    return _place(_fit(_stroke(_crop(_ink(gray)))))


def _in_mnist_format(gray: np.ndarray) -> bool:
    """True for what the recipe would return anyway (MNIST's own format, the cheap common case): 28×28, light
    ink on a black background, the digit's longer side 16–20 px with an empty border, centre of mass within a
    pixel of MNIST's."""
    if gray.shape != (SIDE, SIDE) or int(gray.max()) < MIN_CONTRAST:
        return False
    rows, cols = np.flatnonzero(gray.any(axis=1)), np.flatnonzero(gray.any(axis=0))
    if rows[0] < 2 or cols[0] < 2 or rows[-1] > SIDE - 3 or cols[-1] > SIDE - 3:
        return False
    if not BOX - 4 <= max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 <= BOX:
        return False
    row, col = _centre_of_mass(gray)
    return abs(row - CENTRE) <= 1 and abs(col - CENTRE) <= 1


def _open(data: bytes, limits: Limits) -> Image.Image:
    """Identify the image from its header alone and check the declared size against ``limits``."""
    if not data:
        raise InputError(422, "empty upload: expected an image file (PNG, JPEG, GIF, BMP or WebP)")
    if len(data) > limits.max_bytes:
        raise InputError(413, f"upload is {len(data)} bytes; the limit is {limits.max_bytes} bytes")
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:  # Pillow's own guard, at twice Image.MAX_IMAGE_PIXELS
        raise InputError(
            413,
            f"image declares more than {2 * Image.MAX_IMAGE_PIXELS} pixels; the limit is {limits.max_pixels}",
        ) from None
    except Exception:  # Pillow's header parsers raise several exception types for damaged data
        kind = _sniff(data)
        if kind:
            raise InputError(422, f"corrupt or truncated {kind} image: its header cannot be read") from None
        raise InputError(415, "not an image in a supported format (PNG, JPEG, GIF, BMP, WebP)") from None
    width, height = img.size
    if width * height > limits.max_pixels:
        raise InputError(
            413, f"image is {width}×{height} = {width * height} pixels; the limit is {limits.max_pixels}"
        )
    if min(width, height) < limits.min_side:
        raise InputError(
            422, f"image is {width}×{height}; each side must be at least {limits.min_side} pixels"
        )
    if max(width, height) > limits.max_aspect * min(width, height):
        raise InputError(
            422, f"image is {width}×{height}; the aspect ratio must be at most {limits.max_aspect:g}:1"
        )
    return img


def _sniff(data: bytes) -> str | None:
    """The format a file claims by its magic bytes, if it is one of ours."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in _SIGNATURES if data.startswith(magic)), None)


def _decode(img: Image.Image) -> np.ndarray:
    """Decode the first frame to an upright uint8 grayscale array, alpha composited, big images shrunk."""
    width, height = img.size
    long_side = max(width, height)
    if img.format in ("JPEG", "MPO") and long_side >= 2 * WORK_SIDE:  # MPO: a phone's multi-picture JPEG
        scale = min(8, 1 << ((long_side // WORK_SIDE).bit_length() - 1))
        img.draft("L", (max(1, width // scale), max(1, height // scale)))  # DCT scaling: decode fewer pixels
    try:
        img.load()
        orientation = _orientation(img)
        gray = _flatten(img)
    except InputError:
        raise
    except Exception as exc:  # truncated or damaged pixel data: OSError, SyntaxError, ValueError, EOFError …
        raise InputError(422, f"corrupt or truncated {img.format} image: {exc}") from None
    if orientation in _TRANSPOSE:
        gray = gray.transpose(_TRANSPOSE[orientation])
    return np.asarray(gray)


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1 = upright); unreadable EXIF counts as upright."""
    try:
        return int(img.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # malformed EXIF blocks raise various errors; the pixels are still usable
        return 1


def _flatten(img: Image.Image) -> Image.Image:
    """Any mode → 'L': 16/32-bit integers rescaled, alpha composited onto the backdrop the ink stands out on."""
    if img.mode.startswith("I"):  # 'I' and 'I;16*' (16-bit PNG): values up to 65535
        values = np.asarray(img, dtype=np.float32)
        if values.max() > 255:
            values = values / 257.0
        return _shrink(Image.fromarray(np.clip(values, 0, 255).astype(np.uint8)))
    if img.mode in ("LA", "La", "PA", "RGBA", "RGBa") or img.has_transparency_data:
        la = _shrink(img.convert("LA"))
        lum, alpha = la.split()
        # Ink on a transparent canvas is usually dark; if the visible pixels are light, put them on black.
        a = np.asarray(alpha, dtype=np.float32)
        coverage = float(a.sum())
        light = coverage > 0 and float((np.asarray(lum, dtype=np.float32) * a).sum()) / coverage > 127
        backdrop = Image.new("L", la.size, 0 if light else 255)
        backdrop.paste(lum, mask=alpha)
        return backdrop
    return _shrink(img if img.mode == "L" else img.convert("L"))


def _shrink(img: Image.Image) -> Image.Image:
    """Box-average by an integer factor so the longer side stays at least WORK_SIDE."""
    factor = max(img.size) // WORK_SIDE
    return img.reduce(factor) if factor > 1 else img


def _ink(gray: np.ndarray) -> np.ndarray:
    """Grayscale → float32 ink map in [0, 1] (1 = full ink), light backgrounds inverted, background noise cut."""
    hist = np.bincount(gray.ravel(), minlength=256)
    cumulative = np.cumsum(hist)
    total = int(cumulative[-1])
    if np.searchsorted(cumulative, total / 2) > 127:  # the background is most of the image: light → dark ink
        gray = 255 - gray
        hist = hist[::-1]
        cumulative = np.cumsum(hist)
    background = int(np.searchsorted(cumulative, total / 2))
    # Background noise (paper texture, JPEG ringing) measured on the border, which is nearly always background.
    border = np.sort(np.concatenate((gray[0], gray[-1], gray[:, 0], gray[:, -1])))
    median, high = int(border[border.size // 2]), int(border[border.size * 9 // 10])
    floor = min(max(background, median + 3 * (high - median)), 255)
    cut = max(_otsu(hist, cumulative), floor)
    ink_count = total - int(cumulative[cut])
    if ink_count == 0:
        raise InputError(422, "no digit found: the image is blank")
    ink_level = int(np.searchsorted(cumulative, total - ink_count / 10))  # the ink's top decile
    if ink_level - background < MIN_CONTRAST:
        raise InputError(422, "no digit found: too little contrast between ink and background")
    low = min(floor, (background + ink_level) // 2)
    ink = gray.astype(np.float32)
    ink -= low
    ink *= 1.0 / (ink_level - low)
    return np.clip(ink, 0.0, 1.0, out=ink)


_LEVELS = np.arange(256, dtype=np.float64)


def _otsu(hist: np.ndarray, cumulative: np.ndarray) -> int:
    """Otsu's threshold: the level that best separates the histogram into two classes."""
    weight = cumulative.astype(np.float64)
    mass = np.cumsum(hist * _LEVELS)
    total, total_mass = weight[-1], mass[-1]
    split = weight * (total - weight)
    split[split == 0] = np.inf  # a level with everything on one side separates nothing
    return int(np.argmax((total_mass * weight - total * mass) ** 2 / split))


def _crop(ink: np.ndarray) -> np.ndarray:
    """Crop to the ink's bounding box, leaving out small specks separated from the digit by empty space."""
    solid = ink > 0.5
    rows = solid.sum(axis=1)
    if not rows.any():
        raise InputError(422, "no digit found: the image is blank")
    top, bottom = _span(rows, ink.any(axis=1))
    left, right = _span(solid[top:bottom].sum(axis=0), ink[top:bottom].any(axis=0))
    return ink[top:bottom, left:right]


def _span(profile: np.ndarray, inked: np.ndarray) -> tuple[int, int]:
    """[start, stop) of the lines holding the digit: the runs of non-empty lines between the SPECK_SHARE and
    1 - SPECK_SHARE quantiles of the ink, plus up to two lines of faint (anti-aliased) edge on each side."""
    cumulative = np.cumsum(profile)
    total = cumulative[-1]
    first = int(np.searchsorted(cumulative, SPECK_SHARE * total, side="right"))
    last = int(np.searchsorted(cumulative, (1 - SPECK_SHARE) * total))
    empty = np.flatnonzero(profile == 0)
    before, after = empty[empty < first], empty[empty > last]
    start = int(before[-1]) + 1 if before.size else 0
    stop = int(after[0]) if after.size else profile.size
    for _ in range(2):
        start -= int(start > 0 and inked[start - 1])
        stop += int(stop < profile.size and inked[stop])
    return start, stop


def _stroke(digit: np.ndarray) -> np.ndarray:
    """Digit ink map → uint8 at most NORM_SIDE, with thin strokes thickened and, for big drawings, thick ones thinned.

    Digits already at MNIST's scale are left as drawn.
    """
    height, width = digit.shape
    long_side = max(height, width)
    pixels = (digit * 255.0 + 0.5).astype(np.uint8)
    if long_side <= SIDE:
        return pixels
    drawn_big = long_side > NORM_SIDE
    if drawn_big:
        size = (max(1, round(width * NORM_SIDE / long_side)), max(1, round(height * NORM_SIDE / long_side)))
        pixels = np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BOX))
        long_side = NORM_SIDE
        peak = np.percentile(pixels[pixels > 0], 90)  # strokes thinner than a pixel here come out grey
        if peak < 255:
            pixels = np.minimum(pixels * (255.0 / peak) + 0.5, 255).astype(np.uint8)
    solid = np.zeros((pixels.shape[0] + 2, pixels.shape[1] + 2), dtype=bool)
    solid[1:-1, 1:-1] = pixels > 127
    edges = np.count_nonzero(solid[1:] != solid[:-1]) + np.count_nonzero(solid[:, 1:] != solid[:, :-1])
    width_ratio = 2.0 * np.count_nonzero(solid) / max(edges, 1) / long_side  # width ≈ 2·area / perimeter
    if width_ratio < MIN_STROKE:
        return _morph(pixels, round((TARGET_STROKE - width_ratio) * long_side / 2), np.maximum)
    if drawn_big and width_ratio > MAX_STROKE:
        return _morph(pixels, round((width_ratio - THICK_TARGET) * long_side / 2), np.minimum)
    return pixels


_CROSS = ((1, 0), (-1, 0), (0, 1), (0, -1))
_DIAGONALS = ((1, 1), (1, -1), (-1, 1), (-1, -1))


def _morph(pixels: np.ndarray, radius: int, op: np.ufunc) -> np.ndarray:
    """Grey-level dilation (``np.maximum``) or erosion (``np.minimum``) by an octagon, cropped to the result."""
    if radius < 1:
        return pixels
    out = np.pad(pixels, radius)
    for step in range(radius):
        source = out
        for shift in _CROSS + _DIAGONALS if step % 2 else _CROSS:  # alternating: an octagon, close to a disc
            out = op(out, np.roll(source, shift, axis=(0, 1)))
    rows, cols = np.flatnonzero(out.any(axis=1)), np.flatnonzero(out.any(axis=0))
    if rows.size == 0:  # eroded away: keep the original
        return pixels
    return out[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _fit(pixels: np.ndarray) -> np.ndarray:
    """Resize so the longer side is BOX pixels, keeping the aspect ratio."""
    height, width = pixels.shape
    long_side = max(height, width)
    if long_side == BOX:
        return pixels
    size = (max(1, round(width * BOX / long_side)), max(1, round(height * BOX / long_side)))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR))


def _centre_of_mass(pixels: np.ndarray) -> tuple[float, float]:
    """(row, column) of the ink's centre of mass; the image must not be blank."""
    weights = pixels.astype(np.float64)
    total = weights.sum()
    row = weights.sum(axis=1) @ _LEVELS[: pixels.shape[0]] / total
    col = weights.sum(axis=0) @ _LEVELS[: pixels.shape[1]] / total
    return row, col


def _place(pixels: np.ndarray) -> np.ndarray:
    """Paste into a black 28×28 image with the centre of mass at MNIST's centre."""
    height, width = pixels.shape
    if not pixels.any():
        raise InputError(422, "no digit found: the image is blank")
    row, col = _centre_of_mass(pixels)
    top = min(max(round(CENTRE - row), 0), SIDE - height)
    left = min(max(round(CENTRE - col), 0), SIDE - width)
    out = np.zeros((SIDE, SIDE), dtype=np.uint8)
    out[top : top + height, left : left + width] = pixels
    return out
