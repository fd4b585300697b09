"""Uploaded image bytes → a 28×28 MNIST-style digit: white ink on black, 20×20 box, centred by centre of mass.

Usage: ``header = inspect(data, limits)`` reads what the upload declares and refuses, before any pixel is decoded,
whatever would cost too much; ``to_mnist(data, limits, header)`` returns the uint8 28×28 image the model sees (the
model applies ``model.json``'s normalisation). Anything unusable raises :class:`InputError`, which carries an HTTP
status and a message.
"""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

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


# Declared pixels (width × height) accepted per format, from what real uploads need: JPEG covers 50 MP phone
# photos (decoded at 1/8 scale), PNG a 5K screenshot (4096² = 16.8 MP), WebP a 4K one (2²³ = 8.4 MP: libwebp needs
# ~16 bytes a pixel), GIF less.
MAX_PIXELS = {"JPEG": 52_000_000, "PNG": 16_777_216, "WEBP": 8_388_608, "GIF": 4_194_304, "BMP": 16_777_216}


@dataclass(frozen=True)
class Limits:
    """Which uploads are accepted; checked on the body and the image header, before any pixel is decoded."""

    max_bytes: int = 5 * 1024 * 1024  # larger bodies → 413
    # Declared width × height per format (an int applies to every format); more → 413 (decompression bombs)
    max_pixels: dict[str, int] | int = field(default_factory=lambda: dict(MAX_PIXELS))
    max_aspect: float = 20.0  # longer side / shorter side; more → 422
    min_side: int = 8  # shorter side in pixels; less → 422
    max_decode_mib: int = (
        128  # estimated memory one decode needs (e.g. a progressive JPEG's coefficients) → 413
    )
    max_jpeg_scans: int = (
        64  # scans in a JPEG (encoders write at most ~20; each costs a pass over the image) → 422
    )
    max_segments: int = (
        512  # JPEG header segments, PNG chunks other than IDAT, GIF blocks before the image → 422
    )
    max_png_chunks: int = 8192  # all PNG chunks, IDAT included (an 8 KiB-chunked 5 MiB PNG has 640) → 422
    max_fill_bytes: int = 64  # 0xFF fill bytes before a JPEG marker → 422
    max_rle_pixels: int = 65536  # BMP RLE4/RLE8 (Pillow decodes them pixel by pixel in Python) → 413

    def __post_init__(self) -> None:
        pixels = self.max_pixels
        if isinstance(pixels, int):
            pixels = dict.fromkeys(FORMATS, pixels)
        if not isinstance(pixels, dict) or not {str(k).upper() for k in pixels} <= set(FORMATS):
            raise ValueError(f"invalid limits: max_pixels keys must be among {list(FORMATS)}: {pixels}")
        object.__setattr__(self, "max_pixels", {**MAX_PIXELS, **{k.upper(): v for k, v in pixels.items()}})
        counts = (self.max_decode_mib, self.max_jpeg_scans, self.max_segments, self.max_png_chunks)
        if (
            self.max_bytes < 1
            or self.min_side < 1
            or self.max_aspect < 1
            or min(self.max_pixels.values()) < 1
            or min(counts) < 1
            or self.max_fill_bytes < 0
            or self.max_rle_pixels < 1
        ):
            raise ValueError(f"invalid limits: {self}")


@dataclass(frozen=True)
class Header:
    """What an upload declares, read without decoding pixels: format, size and the cost of decoding it."""

    format: str  # one of FORMATS
    width: int
    height: int
    decode_bytes: int  # estimated peak memory of the decode
    python_work: bool = False  # Pillow decodes it pixel by pixel in Python (BMP RLE): never on the event loop
    draft_scale: int = 1  # JPEG: decoded at 1/draft_scale (DCT scaling)

    @property
    def pixels(self) -> int:
        """Declared width × height."""
        return self.width * self.height


def to_mnist(data: bytes, limits: Limits = Limits(), header: Header | None = None) -> np.ndarray:
    """Upload bytes → the uint8 (28, 28) MNIST-style image the model sees (``header``: ``inspect``'s answer).

    Raises:
        InputError: 413 (too many bytes, pixels or decode memory), 415 (not an image in a supported format) or
            422 (corrupt, truncated, malformed structure, too small, absurd aspect ratio, no digit found).
    """
    header = header or inspect(data, limits)
    gray = _decode(_open(data, header), header)
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


# Header inspection: the file's structure is walked with bounded work before Pillow's own (Python) parsers see it
def inspect(data: bytes, limits: Limits = Limits()) -> Header:
    """Identify the upload and check what it declares against ``limits``, without decoding any pixel.

    The cost is bounded by the limits' segment and chunk counts, not by the upload: files built to make Pillow's
    header parsers or decoders loop (fill bytes, empty segments, thousands of scans or chunks) are refused here.
    """
    if not data:
        raise InputError(422, "empty upload: expected an image file (PNG, JPEG, GIF, BMP or WebP)")
    if len(data) > limits.max_bytes:
        raise InputError(413, f"upload is {len(data)} bytes; the limit is {limits.max_bytes} bytes")
    kind = _sniff(data)
    if kind is None:
        raise InputError(415, "not an image in a supported format (PNG, JPEG, GIF, BMP, WebP)")
    try:
        header = _INSPECTORS[kind](data, limits)
    except InputError:
        raise
    except Exception:  # struct errors, index errors, Pillow's header parsers on damaged data
        raise InputError(
            422, f"corrupt or truncated {_NAMES[kind]} image: its header cannot be read"
        ) from None
    width, height = header.width, header.height
    if width < 1 or height < 1:
        raise InputError(422, f"corrupt {_NAMES[kind]} image: it declares a size of {width}×{height}")
    limit = limits.max_pixels[kind]
    if header.pixels > limit:
        raise InputError(
            413, f"{_NAMES[kind]} image is {width}×{height} = {header.pixels} pixels; the limit is {limit}"
        )
    if min(width, height) < limits.min_side:
        raise InputError(
            422, f"image is {width}×{height}; each side must be at least {limits.min_side} pixels"
        )
    if max(width, height) > limits.max_aspect * min(width, height):
        raise InputError(
            422, f"image is {width}×{height}; the aspect ratio must be at most {limits.max_aspect:g}:1"
        )
    if header.python_work and header.pixels > limits.max_rle_pixels:
        raise InputError(
            413,
            f"run-length encoded BMP of {header.pixels} pixels; the limit is {limits.max_rle_pixels} "
            "(send PNG or JPEG)",
        )
    mib = -(-header.decode_bytes // 2**20)
    if mib > limits.max_decode_mib:
        raise InputError(
            413,
            f"decoding this {_NAMES[kind]} image needs about {mib} MiB; the limit is {limits.max_decode_mib} MiB",
        )
    return header


_NAMES = {"PNG": "PNG", "JPEG": "JPEG", "GIF": "GIF", "BMP": "BMP", "WEBP": "WebP"}


def _sniff(data: bytes) -> str | None:
    """The format a file claims by its magic bytes (Pillow's name), if it is one of ours."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _SIGNATURES if data.startswith(magic)), None)


def draft_scale(width: int, height: int) -> int:
    """JPEG DCT scaling factor (1, 2, 4 or 8): the largest that keeps the longer side at least WORK_SIDE."""
    long_side = max(width, height)
    if long_side < 2 * WORK_SIDE:
        return 1
    return min(8, 1 << ((long_side // WORK_SIDE).bit_length() - 1))


_FILL = re.compile(rb"\xff*")
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_DIFFERENTIAL_OR_LOSSLESS = {0xC3, 0xC5, 0xC6, 0xC7, 0xCB, 0xCD, 0xCE, 0xCF}
_PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}


def _inspect_jpeg(data: bytes, limits: Limits) -> Header:
    """Walk the JPEG's header segments up to the first scan; count the scans with one C-speed search."""
    pos, segments, frame = 2, 0, None
    while True:
        if data[pos] != 0xFF:
            raise InputError(422, f"corrupt JPEG image: no marker at byte {pos} (junk between segments)")
        fill_end = _FILL.match(data, pos).end()
        if fill_end - pos - 1 > limits.max_fill_bytes:
            raise InputError(
                422,
                f"JPEG image has {fill_end - pos - 1} fill bytes before a marker; at most {limits.max_fill_bytes}",
            )
        marker, pos = data[fill_end], fill_end + 1
        if marker == 0xDA:  # start of the first scan: the header ends here
            break
        segments += 1
        if segments > limits.max_segments:
            raise InputError(422, f"JPEG image has more than {limits.max_segments} header segments")
        if marker == 0xD9:
            raise InputError(422, "corrupt or truncated JPEG image: it ends before any image data")
        if 0xD0 <= marker <= 0xD7 or marker in (0x01, 0xD8):  # markers without a length
            continue
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2 or pos + length > len(data):
            raise InputError(422, "corrupt or truncated JPEG image: a header segment runs past the end")
        if marker in _SOF:
            frame = (marker, data[pos + 2 : pos + length])
        pos += length
    if frame is None:
        raise InputError(422, "corrupt JPEG image: no frame header before the image data")
    marker, sof = frame
    if marker in _DIFFERENTIAL_OR_LOSSLESS:
        raise InputError(
            415, "lossless or hierarchical JPEG is not supported; send a baseline or progressive JPEG"
        )
    height, width, count = int.from_bytes(sof[1:3], "big"), int.from_bytes(sof[3:5], "big"), sof[5]
    if count not in (1, 3, 4) or len(sof) < 6 + 3 * count:
        raise InputError(422, f"unsupported JPEG image: {count} colour components")
    sampling = [(sof[6 + 3 * i + 1] >> 4, sof[6 + 3 * i + 1] & 15) for i in range(count)]
    if min(min(s) for s in sampling) < 1:
        raise InputError(422, "corrupt JPEG image: a component has no sampling factor")
    scans = data.count(b"\xff\xda", pos - 2)  # 0xFF 0xDA cannot occur inside entropy-coded data
    if scans > limits.max_jpeg_scans:
        raise InputError(
            422,
            f"JPEG image has {scans} scans; at most {limits.max_jpeg_scans} are accepted (encoders write ~10)",
        )
    scale = draft_scale(width, height)
    bands = 1 if count != 4 else 4  # YCbCr and grayscale decode straight to 'L' in draft mode
    need = -(-width // scale) * -(-height // scale) * (bands + 1)
    if marker in _PROGRESSIVE or scans > 1:  # every coefficient of the image is held until the last scan
        h_max, v_max = max(h for h, _ in sampling), max(v for _, v in sampling)
        blocks = sum(-(-width * h // h_max // 8) * -(-height * v // v_max // 8) for h, v in sampling)
        need += blocks * 64 * 2
    return Header("JPEG", width, height, need, draft_scale=scale)


# Peak bytes a pixel while decoding, by PNG colour type (measured: the decoded image and Pillow's transient copies)
_PNG_BYTES_PER_PIXEL = {0: 1, 2: 4, 3: 2, 4: 4, 6: 8}
_PNG_16_BIT_GREY = 6  # 'I;16' cannot be reduced by Pillow: numpy arrays on the way to 8 bits
_PALETTE_WITH_ALPHA = 9  # a palette with tRNS converts to grey + alpha through RGBA


def _inspect_png(data: bytes, limits: Limits) -> Header:
    """Read IHDR and walk the chunk list (lengths only), refusing chunk floods."""
    length, kind = struct.unpack_from(">I4s", data, 8)
    if kind != b"IHDR" or length != 13:
        raise InputError(422, "corrupt PNG image: it does not start with an IHDR chunk")
    width, height, depth, colour = struct.unpack_from(">IIBB", data, 16)
    if colour not in _PNG_BYTES_PER_PIXEL:
        raise InputError(422, f"corrupt PNG image: colour type {colour}")
    pos, chunks, others, end, transparency = 8, 0, 0, len(data), False
    while pos + 8 <= end:
        length, kind = struct.unpack_from(">I4s", data, pos)
        chunks += 1
        if kind == b"IEND":
            break
        if kind != b"IDAT":
            others += 1
            transparency = transparency or kind == b"tRNS"
            if others > limits.max_segments:
                raise InputError(
                    422, f"PNG image has more than {limits.max_segments} chunks besides its image data"
                )
        if chunks > limits.max_png_chunks:
            raise InputError(422, f"PNG image has more than {limits.max_png_chunks} chunks")
        pos += 12 + length
    per_pixel = _PNG_BYTES_PER_PIXEL[colour]
    if depth == 16 and colour == 0:
        per_pixel = _PNG_16_BIT_GREY
    elif colour == 3 and transparency:
        per_pixel = _PALETTE_WITH_ALPHA
    return Header("PNG", width, height, width * height * per_pixel + width * height // 4)


def _inspect_gif(data: bytes, limits: Limits) -> Header:
    """Logical screen and first frame size; extension blocks before the first frame are counted."""
    width, height, flags = struct.unpack_from("<HHB", data, 6)
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    blocks = 0
    while True:
        introducer = data[pos]
        if introducer == 0x2C:  # image descriptor: the first frame
            left, top, frame_w, frame_h = struct.unpack_from("<HHHH", data, pos + 1)
            width, height = max(width, left + frame_w), max(height, top + frame_h)
            break
        if introducer != 0x21:
            raise InputError(422, "corrupt GIF image: no image before the end of the file")
        pos += 2
        while True:  # the extension's data sub-blocks
            blocks += 1
            if blocks > limits.max_segments:
                raise InputError(
                    422, f"GIF image has more than {limits.max_segments} blocks before its first frame"
                )
            size = data[pos]
            pos += 1 + size
            if size == 0:
                break
    return Header("GIF", width, height, width * height * _PALETTE_WITH_ALPHA)


def _inspect_webp(data: bytes, limits: Limits) -> Header:
    """Canvas size from the first RIFF chunk (VP8X extended, VP8L lossless or VP8 lossy)."""
    chunk = data[12:16]
    if chunk == b"VP8X":
        width, height = 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    elif chunk == b"VP8L" and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        width, height = 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    elif chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack_from("<HH", data, 26)
        width, height = width & 0x3FFF, height & 0x3FFF
    else:
        raise InputError(422, "corrupt WebP image: unknown first chunk")
    return Header(
        "WEBP", width, height, width * height * 16
    )  # measured: libwebp's buffers, canvas, Pillow's copy


def _inspect_bmp(data: bytes, limits: Limits) -> Header:
    """BMP: Pillow's header parser reads a fixed-size header; run-length encoding is noted (decoded in Python)."""
    try:
        with Image.open(io.BytesIO(data), formats=("BMP",)) as img:
            width, height = img.size
            bands = len(img.getbands())
            rle = bool(img.tile) and img.tile[0][0] == "bmp_rle"
    except Image.DecompressionBombError:  # Pillow's own guard, at twice Image.MAX_IMAGE_PIXELS
        raise InputError(413, f"BMP image declares more than {2 * Image.MAX_IMAGE_PIXELS} pixels") from None
    return Header("BMP", width, height, width * height * (bands + 2), python_work=rle)  # + a conversion


_INSPECTORS: dict[str, Callable[[bytes, Limits], Header]] = {
    "JPEG": _inspect_jpeg,
    "PNG": _inspect_png,
    "GIF": _inspect_gif,
    "BMP": _inspect_bmp,
    "WEBP": _inspect_webp,
}


# Decoding
def _open(data: bytes, header: Header) -> Image.Image:
    """Open the inspected image with Pillow (only the inspected format) and check it agrees with the header."""
    try:
        img = Image.open(io.BytesIO(data), formats=(header.format,))
    except Exception:  # Pillow's header parsers raise several exception types for damaged data
        raise InputError(
            422, f"corrupt or truncated {_NAMES[header.format]} image: its header cannot be read"
        ) from None
    if img.size != (header.width, header.height):
        raise InputError(
            422, f"corrupt {_NAMES[header.format]} image: inconsistent sizes {img.size} in its header"
        )
    return img


def _decode(img: Image.Image, header: Header) -> np.ndarray:
    """Decode the first frame to an upright uint8 grayscale array, alpha composited, big images reduced first."""
    if header.draft_scale > 1:  # DCT scaling: decode fewer pixels (MPO is a phone's multi-picture JPEG)
        width, height = img.size
        img.draft("L", (-(-width // header.draft_scale), -(-height // header.draft_scale)))
    try:
        img.load()
        orientation = _orientation(img)
        gray = _flatten(img)
    except InputError:
        raise
    except MemoryError:
        raise InputError(
            413, f"{_NAMES[header.format]} image needs more memory to decode than allowed"
        ) from None
    except Exception as exc:  # truncated or damaged pixel data: OSError, SyntaxError, ValueError, EOFError …
        raise InputError(422, f"corrupt or truncated {_NAMES[header.format]} image: {exc}") from None
    if orientation in _TRANSPOSE:
        gray = gray.transpose(_TRANSPOSE[orientation])
    return np.asarray(gray)


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1 = upright); unreadable EXIF counts as upright."""
    try:
        return int(img.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # malformed EXIF blocks raise various errors; the pixels are still usable
        return 1


_REDUCIBLE = {
    "L",
    "LA",
    "La",
    "RGB",
    "RGBA",
    "RGBa",
    "CMYK",
    "I",
    "F",
}  # modes Image.reduce averages correctly
_ALPHA = {"LA", "La", "PA", "RGBA", "RGBa"}


def _flatten(img: Image.Image) -> Image.Image:
    """Any mode → 'L': reduced first where the mode allows, 16/32-bit integers rescaled, alpha composited onto
    the backdrop the ink stands out on."""
    if img.mode in _REDUCIBLE:
        img = _shrink(img)
    if img.mode.startswith("I"):  # 'I' and 'I;16*' (16-bit PNG): values up to 65535
        values = np.asarray(
            img
        )  # 'I;16' cannot be reduced by Pillow: 2 bytes a pixel here, 1 after the shift
        if values.max() > 255:
            values = values >> 8 if values.dtype == np.uint16 else values // 257
        if values.dtype != np.uint16:
            values = np.clip(values, 0, 255)
        return _shrink(Image.fromarray(values.astype(np.uint8)))
    if img.mode in _ALPHA or img.has_transparency_data:
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
