"""Upload-style test images: MNIST or printed digits rendered the way people really send them.

A digit starts as an "ink map" (uint8, white ink on black, any size: a 28×28 MNIST image or a rendered glyph);
``upload(ink, style, rng)`` turns it into the bytes of an image file of that style. Used by the preprocessing and
serving tests and by ``bench/preprocess_accuracy.py``.

Usage:
    data = upload(mnist_image, "canvas", np.random.default_rng(0))
    data = upload(printed_ink(7, font), "photo", rng)
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

FONT_DIR = Path("/usr/share/fonts")
EXIF_ORIENTATION = 0x0112
BLACK, WHITE = (0, 0, 0), (255, 255, 255)
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def fonts(size: int = 160) -> dict[str, Font]:
    """Pillow's built-in font plus every TrueType font under /usr/share/fonts, by name."""
    found: dict[str, Font] = {"pillow-default": ImageFont.load_default(size)}
    for path in sorted(FONT_DIR.rglob("*.ttf")):
        found[path.stem] = ImageFont.truetype(str(path), size)
    return found


def printed_ink(digit: int, font: Font) -> np.ndarray:
    """A printed digit as an ink map, cropped to the glyph with a small margin."""
    left, top, right, bottom = font.getbbox(str(digit))
    margin = 4
    img = Image.new("L", (int(right - left) + 2 * margin, int(bottom - top) + 2 * margin), 0)
    ImageDraw.Draw(img).text((margin - left, margin - top), str(digit), fill=255, font=font)
    return np.asarray(img)


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    """Encode a PIL image into file bytes (``fmt`` as Pillow names it: PNG, JPEG, GIF, BMP, WEBP)."""
    buffer = io.BytesIO()
    img.save(buffer, fmt, **params)
    return buffer.getvalue()


def _resize(ink: np.ndarray, long_side: int) -> np.ndarray:
    """Scale a uint8 ink map so its longer side is ``long_side`` pixels; returns floats in 0..1."""
    height, width = ink.shape
    scale = long_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(ink).resize(size, Image.Resampling.BICUBIC), dtype=np.float32) / 255.0


def _place(ink: np.ndarray, canvas: tuple[int, int], long_side: int, rng: np.random.Generator) -> np.ndarray:
    """Alpha map (float 0..1) of size ``canvas`` (h, w) with the digit scaled to ``long_side`` at a random spot."""
    digit = _resize(ink, long_side)
    out = np.zeros(canvas, dtype=np.float32)
    top = int(rng.integers(0, canvas[0] - digit.shape[0] + 1))
    left = int(rng.integers(0, canvas[1] - digit.shape[1] + 1))
    out[top : top + digit.shape[0], left : left + digit.shape[1]] = digit
    return out


def _centred(ink: np.ndarray, side: int, long_side: int, rng: np.random.Generator) -> np.ndarray:
    """Like ``_place`` on a square canvas, but near the centre (within 5% of the side)."""
    digit = _resize(ink, long_side)
    out = np.zeros((side, side), dtype=np.float32)
    jitter = side // 20
    top = (side - digit.shape[0]) // 2 + int(rng.integers(-jitter, jitter + 1))
    left = (side - digit.shape[1]) // 2 + int(rng.integers(-jitter, jitter + 1))
    top, left = min(max(top, 0), side - digit.shape[0]), min(max(left, 0), side - digit.shape[1])
    out[top : top + digit.shape[0], left : left + digit.shape[1]] = digit
    return out


def _on_paper(
    alpha: np.ndarray, ink: tuple[int, int, int], paper: np.ndarray | tuple[int, int, int]
) -> Image.Image:
    """RGB image: ``ink`` colour over ``paper`` (a colour or an (h, w, 3) array) with coverage ``alpha``."""
    a = alpha[..., None]
    rgb = np.asarray(paper, dtype=np.float32) * (1 - a) + np.asarray(ink, dtype=np.float32) * a
    return Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8), "RGB")


def _mnist(ink: np.ndarray, rng: np.random.Generator) -> bytes:
    """White on black, 28×28 grayscale PNG, the digit in a 20-pixel box (MNIST's own format)."""
    if ink.shape == (28, 28):
        return encode(Image.fromarray(ink), "PNG")
    return encode(Image.fromarray((_centred(ink, 28, 20, rng) * 255 + 0.5).astype(np.uint8)), "PNG")


def _paper(ink: np.ndarray, rng: np.random.Generator) -> bytes:
    """Black ink on white, RGB PNG 280×280, roughly centred."""
    return encode(_on_paper(_centred(ink, 280, int(rng.integers(160, 230)), rng), BLACK, WHITE), "PNG")


def _canvas(ink: np.ndarray, rng: np.random.Generator) -> bytes:
    """A browser canvas export: RGBA PNG 280×280, transparent background, black strokes (alpha = ink)."""
    alpha = _centred(ink, 280, int(rng.integers(160, 230)), rng)
    rgba = np.zeros((280, 280, 4), dtype=np.uint8)
    rgba[..., 3] = (alpha * 255 + 0.5).astype(np.uint8)
    return encode(Image.fromarray(rgba, "RGBA"), "PNG")


def _offcentre(ink: np.ndarray, rng: np.random.Generator) -> bytes:
    """A small digit anywhere on a 400×300 white RGB PNG."""
    return encode(_on_paper(_place(ink, (300, 400), int(rng.integers(80, 150)), rng), BLACK, WHITE), "PNG")


def _large(ink: np.ndarray, rng: np.random.Generator) -> bytes:
    """A 1000×1000 white RGB PNG with a digit 550–800 pixels tall."""
    return encode(_on_paper(_place(ink, (1000, 1000), int(rng.integers(550, 800)), rng), BLACK, WHITE), "PNG")


def _jpeg(ink: np.ndarray, rng: np.random.Generator) -> bytes:
    """Black on white, 400×400 JPEG at quality 40–75 (visible compression artefacts)."""
    img = _on_paper(_centred(ink, 400, int(rng.integers(220, 320)), rng), BLACK, WHITE)
    return encode(img, "JPEG", quality=int(rng.integers(40, 76)))


def _marker(ink: np.ndarray, rng: np.random.Generator) -> bytes:
    """A thick felt marker: strokes widened to about a fifth of the digit's height, PNG 280×280."""
    alpha = _centred(ink, 280, 190, rng)
    thick = Image.fromarray((alpha * 255).astype(np.uint8)).filter(
        ImageFilter.MaxFilter(int(rng.choice([9, 11, 13])))
    )
    return encode(_on_paper(np.asarray(thick, dtype=np.float32) / 255, (10, 10, 10), WHITE), "PNG")


def _pen(ink: np.ndarray, rng: np.random.Generator) -> bytes:
    """A thin ballpoint: the digit's skeleton drawn about 6 pixels wide (1% of its height), blue, 700×700 PNG."""
    skeleton = _skeleton(_resize(ink, 140) > 0.4)
    line = Image.fromarray(skeleton.astype(np.uint8) * 255).resize(
        (skeleton.shape[1] * 4, skeleton.shape[0] * 4), Image.Resampling.NEAREST
    )
    line = line.filter(ImageFilter.MaxFilter(3)).filter(ImageFilter.GaussianBlur(1))
    alpha = _place(np.asarray(line), (700, 700), 560, rng)
    return encode(_on_paper(alpha, (20, 30, 140), WHITE), "PNG")


def _exif(ink: np.ndarray, rng: np.random.Generator) -> bytes:
    """A phone photo stored sideways with an EXIF orientation tag (3, 6 or 8) that makes it upright: JPEG."""
    upright = _on_paper(_centred(ink, 360, 250, rng), BLACK, WHITE)
    orientation = int(rng.choice([3, 6, 8]))
    # Store the inverse of the transpose a viewer applies for this orientation.
    inverse = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
    stored = upright.transpose(inverse[orientation])
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return encode(stored, "JPEG", quality=90, exif=exif)


def _photo(ink: np.ndarray, rng: np.random.Generator) -> bytes:
    """A photo of paper: grey-beige background with a lighting gradient and sensor noise, dark ink, JPEG."""
    height, width = 600, 800
    alpha = _place(ink, (height, width), int(rng.integers(250, 450)), rng)
    blurred = Image.fromarray((alpha * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.5))
    alpha = np.asarray(blurred, dtype=np.float32) / 255
    ramp = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :] * np.linspace(0.6, 1.0, height)[:, None]
    light = 170 + 50 * ramp  # 170 (shadow) … 220 (lit)
    paper = light[..., None] * np.array([1.0, 0.97, 0.9], dtype=np.float32)
    paper = paper + rng.normal(0.0, 6.0, size=(height, width, 1)).astype(np.float32)
    return encode(_on_paper(alpha * 0.85, (40, 40, 50), paper), "JPEG", quality=85)


STYLES: dict[str, Callable[[np.ndarray, np.random.Generator], bytes]] = {
    "mnist": _mnist,
    "paper": _paper,
    "canvas": _canvas,
    "offcentre": _offcentre,
    "large": _large,
    "jpeg": _jpeg,
    "marker": _marker,
    "pen": _pen,
    "exif": _exif,
    "photo": _photo,
}


def upload(ink: np.ndarray, style: str, rng: np.random.Generator) -> bytes:
    """The bytes of an image file showing the digit in ``ink`` in the given style (a key of ``STYLES``)."""
    return STYLES[style](np.asarray(ink, dtype=np.uint8), rng)


def _skeleton(mask: np.ndarray) -> np.ndarray:
    """Zhang–Suen thinning of a boolean mask to 1-pixel-wide lines."""
    img = np.pad(mask, 1).astype(np.uint8)
    changed = True
    while changed:
        changed = False
        for step in (0, 1):
            p2, p3, p4 = img[:-2, 1:-1], img[:-2, 2:], img[1:-1, 2:]
            p5, p6, p7 = img[2:, 2:], img[2:, 1:-1], img[2:, :-2]
            p8, p9 = img[1:-1, :-2], img[:-2, :-2]
            ring = [p2, p3, p4, p5, p6, p7, p8, p9, p2]
            neighbours = sum(p.astype(np.int32) for p in ring[:8])
            transitions = sum(
                ((a == 0) & (b == 1)).astype(np.int32) for a, b in zip(ring, ring[1:], strict=False)
            )
            if step == 0:
                corner = (p2 * p4 * p6 == 0) & (p4 * p6 * p8 == 0)
            else:
                corner = (p2 * p4 * p8 == 0) & (p2 * p6 * p8 == 0)
            remove = (
                (img[1:-1, 1:-1] == 1) & (neighbours >= 2) & (neighbours <= 6) & (transitions == 1) & corner
            )
            if remove.any():
                img[1:-1, 1:-1][remove] = 0
                changed = True
    return img[1:-1, 1:-1].astype(bool)
