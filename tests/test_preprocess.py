"""Unit tests of upload preprocessing: each upload style, MNIST pass-through, modes, formats and every refusal.

Uploads are made from real MNIST test digits and printed fonts by ``tests/uploads.py``; an output counts as right
when it still looks like the digit it came from (it correlates best with its own source among ten digits).

Run: MNIST_DATA_DIR=../shared/data python -m pytest tests/test_preprocess.py -q
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ray_app.preprocess import MAX_PIXELS, InputError, Limits, inspect, to_mnist
from tests.conftest import require
from tests.helpers import WORDS
from tests.hostile_inputs import rle8_bmp
from tests.uploads import STYLES, encode, fonts, printed_ink, upload

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
# Lowest correlation with the source digit each style must keep (pen and marker redraw the strokes).
MIN_SIMILARITY = {"marker": 0.6, "pen": 0.55}


@pytest.fixture(scope="module")
def mnist_test(mnist_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """MNIST test images (uint8 N×28×28) and labels."""
    test = torchvision.datasets.MNIST(str(mnist_dir), train=False)
    return test.data.numpy(), test.targets.numpy()


@pytest.fixture(scope="module")
def digits(mnist_test: tuple[np.ndarray, np.ndarray]) -> list[np.ndarray]:
    """The first test image of each digit 0–9."""
    images, labels = mnist_test
    return [images[int(np.flatnonzero(labels == d)[0])] for d in range(10)]


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two 28×28 images, maximised over shifts of up to one pixel."""
    best = -1.0
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            shifted = np.roll(a.astype(np.float64), (dy, dx), axis=(0, 1))
            best = max(best, float(np.corrcoef(shifted.ravel(), b.astype(np.float64).ravel())[0, 1]))
    return best


def assert_mnist_like(out: np.ndarray) -> None:
    """Shape, type, a 20-pixel box and a centre of mass near (14, 14), as MNIST's own images have."""
    assert out.shape == (28, 28) and out.dtype == np.uint8
    rows, cols = np.flatnonzero(out.any(axis=1)), np.flatnonzero(out.any(axis=0))
    assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 in (19, 20, 21)
    weights = out.astype(np.float64) / out.sum()
    assert abs(weights.sum(axis=1) @ np.arange(28) - 14) <= 1.0
    assert abs(weights.sum(axis=0) @ np.arange(28) - 14) <= 1.0


def assert_recognisable(outputs: list[np.ndarray], sources: list[np.ndarray], minimum: float) -> None:
    """Each output is most similar to its own source among all sources, and at least ``minimum`` similar."""
    for i, out in enumerate(outputs):
        scores = [similarity(out, source) for source in sources]
        assert int(np.argmax(scores)) == i, (
            f"digit {i} looks like {int(np.argmax(scores))}: {np.round(scores, 2)}"
        )
        assert scores[i] >= minimum, f"digit {i}: similarity {scores[i]:.2f} < {minimum}"


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    """PNG bytes of an array."""
    return encode(Image.fromarray(array, mode), "PNG")


def ink_on_white(image: np.ndarray, side: int = 280) -> Image.Image:
    """An MNIST digit scaled up as black ink on white (grayscale)."""
    big = Image.fromarray(image).resize((side, side), Image.Resampling.BICUBIC)
    return Image.fromarray(255 - np.asarray(big))


# ---- MNIST itself -------------------------------------------------------------------------------------------------


def test_mnist_images_pass_through_almost_unchanged(mnist_test: tuple[np.ndarray, np.ndarray]) -> None:
    images = mnist_test[0][:300]
    diffs = np.array([np.abs(to_mnist(png(img)).astype(int) - img).max() for img in images])
    close = [similarity(to_mnist(png(img)), img) for img in images]
    assert np.mean(diffs <= 8) >= 0.95, f"only {np.mean(diffs <= 8):.0%} within 8 grey levels"
    assert min(close) >= 0.97  # the rest differ by a one-pixel shift from rounding the centre of mass


def test_mnist_format_is_used_as_is_and_anything_else_goes_through_the_recipe(
    mnist_test: tuple[np.ndarray, np.ndarray],
) -> None:
    images = mnist_test[0][:300]
    as_is = [img for img in images if np.array_equal(to_mnist(png(img)), img)]
    assert len(as_is) >= 0.8 * len(images)  # most MNIST digits already are what the recipe makes
    small = np.zeros((28, 28), np.uint8)
    small[2:12, 2:9] = np.asarray(Image.fromarray(as_is[0]).crop((4, 4, 24, 24)).resize((7, 10)))
    out = to_mnist(png(small))  # a small, off-centre digit on 28×28 black is still scaled and centred
    rows, cols = np.flatnonzero(out.any(axis=1)), np.flatnonzero(out.any(axis=0))
    assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 >= 18
    assert abs(np.average(np.arange(28), weights=out.sum(axis=1)) - 14) <= 1


# ---- upload styles ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", list(STYLES))
def test_upload_style_recovers_the_digit(style: str, digits: list[np.ndarray]) -> None:
    rng = np.random.default_rng(7)
    outputs = [to_mnist(upload(digit, style, rng)) for digit in digits]
    for out in outputs:
        assert_mnist_like(out)
    assert_recognisable(outputs, digits, MIN_SIMILARITY.get(style, 0.8))


# Pillow's default font plus a few common TrueType fonts (each skipped when not installed).
FONT_NAMES = [
    "pillow-default",
    "DejaVuSans",
    "DejaVuSerif",
    "DejaVuSans-Bold",
    "DejaVuSansMono",
    "DejaVuSans-Oblique",
    "LiberationSans-Regular",
    "LiberationSerif-Regular",
]
FONT_PACKAGES = "fonts-dejavu-core fonts-dejavu-extra fonts-liberation"  # Debian packages of these fonts


@pytest.mark.parametrize("font_name", FONT_NAMES)
@pytest.mark.parametrize("style", ["paper", "canvas", "jpeg", "photo", "large"])
def test_printed_digits(font_name: str, style: str) -> None:
    available = fonts()
    require(
        font_name in available, f"font {font_name} is not installed", f"apt-get install -y {FONT_PACKAGES}"
    )
    inks = [printed_ink(d, available[font_name]) for d in range(10)]
    # The reference: the same glyphs shrunk into MNIST's format directly.
    references = [to_mnist(upload(ink, "mnist", np.random.default_rng(0))) for ink in inks]
    rng = np.random.default_rng(3)
    outputs = [to_mnist(upload(ink, style, rng)) for ink in inks]
    for out in outputs:
        assert_mnist_like(out)
    assert_recognisable(outputs, references, 0.7)  # big bold glyphs get thinner strokes than the reference


def test_off_centre_digit_is_centred_like_mnist(digits: list[np.ndarray]) -> None:
    canvas = np.full((300, 400), 255, dtype=np.uint8)
    digit = 255 - np.asarray(Image.fromarray(digits[7]).resize((100, 100)))
    canvas[10:110, 290:390] = digit  # near the top-right corner
    out = to_mnist(png(canvas))
    assert_mnist_like(out)
    assert similarity(out, digits[7]) >= 0.85


def test_transparent_canvas_equals_the_same_strokes_on_white(digits: list[np.ndarray]) -> None:
    alpha = np.asarray(Image.fromarray(digits[2]).resize((280, 280), Image.Resampling.BICUBIC))
    rgba = np.zeros((280, 280, 4), dtype=np.uint8)  # (0, 0, 0, 0) background, as canvas.toDataURL gives
    rgba[..., 3] = alpha
    on_white = np.repeat((255 - alpha)[..., None], 3, axis=2)
    np.testing.assert_allclose(to_mnist(png(rgba, "RGBA")), to_mnist(png(on_white, "RGB")), atol=2)


def test_white_strokes_on_a_transparent_canvas_are_kept(digits: list[np.ndarray]) -> None:
    alpha = np.asarray(Image.fromarray(digits[4]).resize((140, 140), Image.Resampling.BICUBIC))
    rgba = np.full((140, 140, 4), 255, dtype=np.uint8)
    rgba[..., 3] = alpha
    assert similarity(to_mnist(png(rgba, "RGBA")), digits[4]) >= 0.9


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation: int, digits: list[np.ndarray]) -> None:
    upright = ink_on_white(digits[7], 200)
    inverse = {  # what a camera stores so that a viewer applying this orientation shows ``upright``
        1: None,
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_90,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_270,
    }[orientation]
    stored = upright if inverse is None else upright.transpose(inverse)
    exif = Image.Exif()
    exif[0x0112] = orientation
    expected = to_mnist(encode(upright, "PNG"))
    for fmt in ("JPEG", "PNG", "WEBP"):
        assert similarity(to_mnist(encode(stored, fmt, exif=exif, quality=95)), expected) >= 0.95, fmt
    if orientation != 1:  # the tag is what makes the difference
        assert similarity(to_mnist(encode(stored, "JPEG", quality=95)), expected) < 0.8


def test_background_specks_are_ignored(digits: list[np.ndarray]) -> None:
    clean = np.asarray(ink_on_white(digits[5], 400))
    specks = clean.copy()
    rng = np.random.default_rng(0)
    for y, x in rng.integers(0, 400, size=(12, 2)):
        specks[y : y + 3, x : x + 3] = 0  # pepper: 3×3 black dots anywhere, some far from the digit
    assert similarity(to_mnist(png(specks)), to_mnist(png(clean))) >= 0.95


def test_thin_pen_is_thickened_to_mnist_stroke_width(digits: list[np.ndarray]) -> None:
    out = to_mnist(upload(digits[0], "pen", np.random.default_rng(0)))
    assert np.count_nonzero(out > 127) >= 0.6 * np.count_nonzero(digits[0] > 127)


# ---- formats and modes --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "params"),
    [("PNG", {}), ("JPEG", {"quality": 90}), ("GIF", {}), ("BMP", {}), ("WEBP", {"lossless": True})],
)
def test_every_supported_format(fmt: str, params: dict[str, object], digits: list[np.ndarray]) -> None:
    img = ink_on_white(digits[6]).convert("RGB")
    assert similarity(to_mnist(encode(img, fmt, **params)), to_mnist(encode(img, "PNG"))) >= 0.98


def test_multi_picture_jpeg_uses_the_first_picture(digits: list[np.ndarray]) -> None:
    pictures = [ink_on_white(digits[5], 600).convert("RGB"), ink_on_white(digits[0], 600).convert("RGB")]
    data = encode(pictures[0], "MPO", save_all=True, append_images=pictures[1:])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    assert similarity(to_mnist(data), to_mnist(encode(pictures[0], "JPEG"))) >= 0.95


def test_gif_uses_the_first_frame(digits: list[np.ndarray]) -> None:
    frames = [ink_on_white(digits[3]), ink_on_white(digits[8])]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    out = to_mnist(data)
    assert similarity(out, digits[3]) > similarity(out, digits[8])
    assert similarity(out, digits[3]) >= 0.9


def test_sixteen_bit_grayscale(digits: list[np.ndarray]) -> None:
    eight = np.asarray(ink_on_white(digits[9]))
    sixteen = Image.fromarray(eight.astype(np.uint16) * 257)  # full 0–65535 range
    data = encode(sixteen, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    np.testing.assert_allclose(to_mnist(data), to_mnist(png(eight)), atol=2)


def test_cmyk_jpeg(digits: list[np.ndarray]) -> None:
    img = ink_on_white(digits[1]).convert("RGB")
    cmyk = encode(img.convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(cmyk)).mode == "CMYK"
    assert similarity(to_mnist(cmyk), to_mnist(encode(img, "JPEG", quality=95))) >= 0.95


def test_palette_with_transparency(digits: list[np.ndarray]) -> None:
    alpha = np.asarray(Image.fromarray(digits[2]).resize((112, 112), Image.Resampling.NEAREST)) > 127
    indices = alpha.astype(np.uint8)  # 0 = transparent background, 1 = black ink
    img = Image.fromarray(indices, "P")
    img.putpalette([0, 0, 0] * 256)  # every entry black: only the transparency tells background from ink
    for fmt in ("PNG", "GIF"):
        data = encode(img, fmt, transparency=0)
        assert Image.open(io.BytesIO(data)).info.get("transparency") == 0
        assert similarity(to_mnist(data), digits[2]) >= 0.85, fmt


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA"])
def test_other_modes(mode: str, digits: list[np.ndarray]) -> None:
    img = ink_on_white(digits[4], 112)
    converted = img.convert(mode, dither=Image.Dither.NONE)
    assert converted.mode == mode
    assert similarity(to_mnist(encode(converted, "PNG")), digits[4]) >= 0.85


# ---- refusals -----------------------------------------------------------------------------------------------------


def refusal(data: bytes, limits: Limits | None = None) -> InputError:
    """The InputError raised for ``data`` (fails the test if there is none)."""
    with pytest.raises(InputError) as caught:
        to_mnist(data, limits or Limits())
    error = caught.value
    assert isinstance(error, ValueError) and error.detail and str(error) == error.detail
    return error


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` × ``height`` 8-bit grayscale pixels but holds one row of data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1)))
        + chunk(b"IEND", b"")
    )


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's own, above 89 M pixels
@pytest.mark.parametrize(("width", "height"), [(30000, 30000), (10000, 10000), (6000, 5000)])
def test_decompression_bomb_is_refused_from_the_header(
    width: int, height: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Image, "open", None)  # refused before Pillow sees the file
    error = refusal(png_header(width, height))
    assert error.status_code == 413 and "pixels" in error.detail


def test_gif_bomb_is_refused() -> None:
    gif = bytearray(encode(Image.new("L", (16, 16), 255), "GIF"))
    gif[6:10] = struct.pack("<HH", 65535, 65535)  # the logical screen size in the header
    assert refusal(bytes(gif)).status_code == 413


def test_pixel_limit_is_configurable(digits: list[np.ndarray]) -> None:
    data = encode(ink_on_white(digits[0], 300), "PNG")
    assert refusal(data, Limits(max_pixels=300 * 300 - 1)).status_code == 413
    assert to_mnist(data, Limits(max_pixels=300 * 300)).shape == (28, 28)


def test_body_over_the_size_limit() -> None:
    assert refusal(b"\0" * (5 * 1024 * 1024 + 1)).status_code == 413
    noisy = np.random.default_rng(0).integers(0, 256, size=(200, 200), dtype=np.uint8)
    data = png(noisy)
    error = refusal(data, Limits(max_bytes=len(data) - 1))
    assert error.status_code == 413 and str(len(data)) in error.detail


@pytest.mark.parametrize(
    "data", [b"hello, this is text", b"%PDF-1.7\n" + b"\0" * 100, bytes(range(256)) * 4, b"<svg></svg>"]
)
def test_not_an_image(data: bytes) -> None:
    error = refusal(data)
    assert error.status_code == 415 and "PNG" in error.detail


def test_unsupported_image_format(digits: list[np.ndarray]) -> None:
    tiff = encode(ink_on_white(digits[0]), "TIFF")
    assert refusal(tiff).status_code == 415


def test_empty_body() -> None:
    assert refusal(b"").status_code == 422


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "WEBP"])
def test_truncated_image(fmt: str, digits: list[np.ndarray]) -> None:
    noise = np.random.default_rng(1).integers(0, 256, size=(200, 200, 3), dtype=np.uint8)  # incompressible
    data = encode(Image.fromarray(noise), fmt)
    for cut in (len(data) // 2, 40):
        error = refusal(data[:cut])
        assert error.status_code == 422 and "truncated" in error.detail, (cut, error.detail)


def test_corrupt_pixel_data(digits: list[np.ndarray]) -> None:
    data = bytearray(encode(ink_on_white(digits[0]), "PNG"))
    data[60:80] = b"\xff" * 20  # inside the compressed pixel data
    assert refusal(bytes(data)).status_code == 422


@pytest.mark.parametrize(("width", "height"), [(2000, 50), (30, 900)])
def test_absurd_aspect_ratio(width: int, height: int) -> None:
    error = refusal(png(np.full((height, width), 255, dtype=np.uint8)))
    assert error.status_code == 422 and "aspect" in error.detail


@pytest.mark.parametrize("side", [1, 4, 7])
def test_tiny_image(side: int) -> None:
    error = refusal(png(np.zeros((side, side), dtype=np.uint8)))
    assert error.status_code == 422 and "at least" in error.detail


def blank_images() -> dict[str, bytes]:
    """Uploads with nothing drawn on them."""
    rng = np.random.default_rng(0)
    paper = np.clip(rng.normal(235, 3, size=(300, 300)), 0, 255).astype(np.uint8)
    return {
        "white": png(np.full((200, 200), 255, dtype=np.uint8)),
        "black": png(np.zeros((200, 200), dtype=np.uint8)),
        "transparent": png(np.zeros((280, 280, 4), dtype=np.uint8), "RGBA"),
        "white jpeg": encode(Image.new("RGB", (640, 480), "white"), "JPEG", quality=30),
        "grey paper with noise": encode(Image.fromarray(paper), "JPEG", quality=80),
        "faint mark": png(np.pad(np.full((20, 20), 240, dtype=np.uint8), 90, constant_values=255)),
    }


@pytest.mark.parametrize("name", list(blank_images()))
def test_blank_image_is_no_digit(name: str) -> None:
    error = refusal(blank_images()[name])
    assert error.status_code == 422 and "no digit found" in error.detail


def test_invalid_limits() -> None:
    with pytest.raises(ValueError):
        Limits(max_bytes=0)


# ---- robustness -------------------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_random_bytes_raise_only_input_error(data: bytes) -> None:
    try:
        image = to_mnist(data)
    except InputError as error:
        assert error.status_code in (413, 415, 422)
    else:
        assert image.shape == (28, 28) and image.dtype == np.uint8


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "WEBP"]), st.integers(0, 10**9), st.integers(1, 8))
def test_damaged_files_raise_only_input_error(fmt: str, seed: int, flips: int) -> None:
    rng = np.random.default_rng(seed)
    image = np.full((64, 64), 255, dtype=np.uint8)
    image[16:48, 28:36] = 0
    data = bytearray(encode(Image.fromarray(image), fmt))
    for position in rng.integers(0, len(data), size=flips):
        data[position] = int(rng.integers(0, 256))
    try:
        out = to_mnist(bytes(data))
    except InputError as error:
        assert error.status_code in (413, 415, 422)
    else:
        assert out.shape == (28, 28) and out.dtype == np.uint8


def test_committed_samples_are_small_and_clean() -> None:
    for name in WORDS:
        for path in (SAMPLES / f"{name}.png", SAMPLES / "ink" / f"{name}.png"):
            assert path.stat().st_size < 5000, path
            assert_mnist_like(to_mnist(path.read_bytes()))
    zero = to_mnist((SAMPLES / "zero.png").read_bytes())
    assert similarity(zero, to_mnist((SAMPLES / "ink" / "zero.png").read_bytes())) >= 0.95


# ---- decode work bounded from the header ---------------------------------------------------------------------------


def jpeg_with_size(width: int, height: int, **params: object) -> bytes:
    """A small JPEG whose frame header declares ``width`` × ``height`` (its pixel data is not decoded here)."""
    data = encode(Image.new("L", (16, 16), 255), "JPEG", **params)
    at = data.find(b"\xff\xc2" if params.get("progressive") else b"\xff\xc0")
    return data[: at + 5] + struct.pack(">HH", height, width) + data[at + 9 :]


def test_pixel_limits_are_per_format() -> None:
    assert inspect(jpeg_with_size(6000, 5000)).pixels == 30_000_000  # a 30 MP photo: fine as JPEG …
    assert refusal(png_header(6000, 5000)).status_code == 413  # … not as a PNG
    assert refusal(jpeg_with_size(16000, 12000)).status_code == 413  # a 192 MP photo
    assert Limits(max_pixels=1000).max_pixels == dict.fromkeys(MAX_PIXELS, 1000)
    assert Limits(max_pixels={"png": 5}).max_pixels == {**MAX_PIXELS, "PNG": 5}
    with pytest.raises(ValueError):
        Limits(max_pixels={"TIFF": 5})


def test_big_jpegs_decode_at_reduced_scale(digits: list[np.ndarray]) -> None:
    photo = encode(ink_on_white(digits[5], 4000).convert("RGB"), "JPEG", quality=90)
    header = inspect(photo)
    assert header.draft_scale == 8 and header.decode_bytes < 2 * (4000 // 8) ** 2 + 1
    assert similarity(to_mnist(photo, header=header), to_mnist(png(digits[5]))) >= 0.9
    assert inspect(encode(ink_on_white(digits[5], 300), "JPEG")).draft_scale == 1


def test_progressive_jpeg_scans_are_limited() -> None:
    data = jpeg_with_size(64, 64, progressive=True)
    assert inspect(data)  # a normal progressive file: ~6 scans
    first_scan = data.rfind(b"\xff\xd9")
    flooded = data[:first_scan] + b"\xff\xda\x00\x08\x01\x01\x00\x01\x3f\x00" * 64 + b"\xff\xd9"
    error = refusal(flooded)
    assert error.status_code == 422 and "scans" in error.detail
    assert inspect(flooded, Limits(max_jpeg_scans=1000))


def test_progressive_jpeg_coefficient_memory_is_estimated() -> None:
    cmyk = encode(Image.new("CMYK", (16, 16)), "JPEG", progressive=True)
    at = cmyk.find(b"\xff\xc2")
    big = cmyk[: at + 5] + struct.pack(">HH", 5000, 5000) + cmyk[at + 9 :]
    error = refusal(big)
    assert error.status_code == 413 and "MiB" in error.detail  # 4 × 25 M coefficients of 2 bytes
    baseline = encode(Image.new("CMYK", (16, 16)), "JPEG")
    at = baseline.find(b"\xff\xc0")
    sequential = baseline[: at + 5] + struct.pack(">HH", 5000, 5000) + baseline[at + 9 :]
    assert inspect(sequential).decode_bytes < 2**24  # streamed at 1/8 scale: no coefficient buffer


@pytest.mark.parametrize(
    ("insert", "phrase"),
    [
        (b"\xff" * 100, "fill bytes"),
        (b"\xff\xe1\x00\x02" * 600, "header segments"),
        (b"junk", "junk between segments"),
    ],
)
def test_jpeg_header_structure_is_bounded(insert: bytes, phrase: str) -> None:
    data = encode(Image.new("L", (32, 32), 255), "JPEG")
    at = 4 + int.from_bytes(data[4:6], "big")  # after the first segment (APP0)
    error = refusal(data[:at] + insert + data[at:])
    assert error.status_code == 422 and phrase in error.detail
    assert inspect(data[:at] + b"\xff" * 10 + data[at:])  # a few fill bytes are legal


def test_lossless_jpeg_is_refused() -> None:
    data = bytearray(encode(Image.new("L", (32, 32), 255), "JPEG"))
    data[data.find(b"\xff\xc0") + 1] = 0xC3
    assert refusal(bytes(data)).status_code == 415


def test_png_chunk_floods_are_refused(digits: list[np.ndarray]) -> None:
    data = png(digits[1])
    private = struct.pack(">I", 0) + b"prVt" + struct.pack(">I", zlib.crc32(b"prVt"))
    flooded = data[:33] + private * 600 + data[33:]  # after the 8-byte signature and 25-byte IHDR
    error = refusal(flooded)
    assert error.status_code == 422 and "chunks" in error.detail
    assert similarity(to_mnist(data[:33] + private * 100 + data[33:]), digits[1]) > 0.95


def test_gif_block_floods_are_refused() -> None:
    gif = encode(Image.new("L", (16, 16), 255), "GIF")
    end = 13 + (3 << ((gif[10] & 7) + 1) if gif[10] & 0x80 else 0)
    comment = b"\x21\xfe" + b"\x01x" * 1000 + b"\x00"
    error = refusal(gif[:end] + comment + gif[end:])
    assert error.status_code == 422 and "blocks" in error.detail


def test_run_length_bmp_is_capped_and_never_inline() -> None:
    assert inspect(rle8_bmp(200, 200)).python_work
    error = refusal(rle8_bmp(1000, 1000))
    assert error.status_code == 413 and "run-length" in error.detail
    assert not inspect(encode(Image.new("L", (200, 200), 255), "BMP")).python_work


@pytest.mark.parametrize("params", [{}, {"lossless": True}, {"exif": b"Exif\x00\x00"}])
def test_webp_size_is_read_from_its_own_header(params: dict[str, object]) -> None:
    data = encode(Image.new("RGB", (321, 123), "white"), "WEBP", **params)
    header = inspect(data)
    assert (header.width, header.height) == Image.open(io.BytesIO(data)).size == (321, 123)


def test_memory_estimate_limit_is_configurable(digits: list[np.ndarray]) -> None:
    data = png(np.asarray(ink_on_white(digits[0], 2000)))
    assert inspect(data).decode_bytes > 4 * 2**20
    error = refusal(data, Limits(max_decode_mib=4))
    assert error.status_code == 413 and "MiB" in error.detail


def test_header_and_pillow_must_agree() -> None:
    data = bytearray(encode(Image.new("L", (64, 64), 255), "GIF"))
    data[6:8] = struct.pack("<H", 32)  # the screen says 32 wide; the frame (64) is wider, so the size is 64
    assert inspect(bytes(data)).width == 64
