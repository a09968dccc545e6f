"""Image decoding: formats, orientation, colour modes and every limit."""

from __future__ import annotations

import io
import os

import grpc
import numpy as np
import pytest
from conftest import png_header_only
from facegrid.config import ImageLimits
from facegrid.errors import ServiceError
from facegrid.imaging import decode_image
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

LIMITS = ImageLimits()


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **params)
    return out.getvalue()


def gradient(width: int = 64, height: int = 48) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.uint8)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], axis=-1))


def reason_of(error: ServiceError) -> str:
    for detail in error.details:
        reason = getattr(detail, "reason", "")
        if reason:
            return str(reason)
    return ""


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_accepted_formats_decode_to_rgb(fmt: str) -> None:
    decoded = decode_image(encode(gradient(), fmt), LIMITS)
    assert decoded.pixels.shape == (48, 64, 3)
    assert decoded.pixels.dtype == np.uint8
    assert decoded.format == fmt


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs 90 degrees clockwise
    decoded = decode_image(encode(gradient(64, 48), "JPEG", exif=exif), LIMITS)
    assert decoded.orientation == 6
    assert (decoded.width, decoded.height) == (48, 64)


def test_rgba_png_is_composited_on_white() -> None:
    rgba = np.zeros((10, 10, 4), np.uint8)  # fully transparent black
    decoded = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), LIMITS)
    assert (decoded.pixels == 255).all()


def test_cmyk_jpeg_becomes_rgb() -> None:
    decoded = decode_image(encode(gradient().convert("CMYK"), "JPEG"), LIMITS)
    assert decoded.pixels.shape == (48, 64, 3)


def test_16_bit_png_is_scaled_not_clipped() -> None:
    wide = (np.arange(100, dtype=np.uint16).reshape(10, 10) * 600).astype(np.uint16)
    decoded = decode_image(encode(Image.fromarray(wide), "PNG"), LIMITS)
    assert decoded.pixels.shape == (10, 10, 3)
    assert decoded.pixels[..., 0].max() > 200  # 65535-scale values map near 255
    assert len(np.unique(decoded.pixels[..., 0])) > 50  # not clipped to a few values


def test_one_pixel_image_decodes() -> None:
    decoded = decode_image(encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), LIMITS)
    assert decoded.pixels.shape == (1, 1, 3)


def test_empty_bytes() -> None:
    with pytest.raises(ServiceError) as caught:
        decode_image(b"", LIMITS)
    assert reason_of(caught.value) == "IMAGE_EMPTY"


def test_not_an_image() -> None:
    with pytest.raises(ServiceError) as caught:
        decode_image(b"%PDF-1.4 definitely not a photo" * 10, LIMITS)
    assert reason_of(caught.value) == "IMAGE_UNSUPPORTED_FORMAT"


def test_gif_is_refused() -> None:
    with pytest.raises(ServiceError) as caught:
        decode_image(encode(gradient(), "GIF"), LIMITS)
    assert reason_of(caught.value) == "IMAGE_UNSUPPORTED_FORMAT"


def test_truncated_jpeg() -> None:
    data = encode(gradient(640, 480), "JPEG", quality=95)
    with pytest.raises(ServiceError) as caught:
        decode_image(data[: len(data) // 2], LIMITS)
    assert reason_of(caught.value) == "IMAGE_CORRUPT"


def test_oversized_bytes() -> None:
    small = ImageLimits(max_bytes=1000)
    with pytest.raises(ServiceError) as caught:
        decode_image(encode(gradient(640, 480), "PNG"), small)
    assert reason_of(caught.value) == "IMAGE_TOO_LARGE"


def test_decompression_bomb_is_refused_before_decoding() -> None:
    bomb = png_header_only(20000, 20000)
    assert len(bomb) < 2000
    with pytest.raises(ServiceError) as caught:
        decode_image(bomb, LIMITS)
    assert reason_of(caught.value) == "IMAGE_TOO_MANY_PIXELS"


def test_too_many_pixels() -> None:
    limits = ImageLimits(max_pixels=100 * 100)
    with pytest.raises(ServiceError) as caught:
        decode_image(encode(gradient(200, 200), "PNG"), limits)
    assert reason_of(caught.value) == "IMAGE_TOO_MANY_PIXELS"


# ---------------------------------------------------------------- fuzzing

# Valid images of every accepted format and colour mode, which hypothesis then cuts,
# flips bits in, splices and pads: whatever comes of it decodes to RGB pixels within the
# limits or is refused with INVALID_ARGUMENT and a reason, never anything else.
_SEEDS = [
    encode(gradient(), "JPEG"),
    encode(gradient(), "JPEG", progressive=True),
    encode(gradient().convert("CMYK"), "JPEG"),
    encode(gradient(), "PNG"),
    encode(gradient().convert("RGBA"), "PNG"),
    encode(gradient().convert("L"), "PNG"),
    encode(gradient().convert("P"), "PNG"),
    encode(gradient(), "WEBP"),
    encode(gradient(), "WEBP", lossless=True),
]
_REASONS = {
    "IMAGE_EMPTY",
    "IMAGE_TOO_LARGE",
    "IMAGE_UNSUPPORTED_FORMAT",
    "IMAGE_CORRUPT",
    "IMAGE_TOO_MANY_PIXELS",
}
SMALL_LIMITS = ImageLimits(max_bytes=64 * 1024, max_side=512, max_pixels=100_000)


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(_SEEDS)))
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "splice", "header"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            del data[at : at + draw(st.integers(1, 200))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "splice":
            other = draw(st.sampled_from(_SEEDS))
            data = data[:at] + bytearray(other[draw(st.integers(0, len(other) - 1)) :])
        else:  # sizes in headers: overwrite bytes near the start
            data[at % 32 : at % 32 + 4] = draw(st.binary(min_size=4, max_size=4))
    return bytes(data)


# By hand: FACEGRID_FUZZ_EXAMPLES=100000 pytest tests/unit/test_imaging.py -k any_bytes (random).
_BY_HAND = int(os.environ.get("FACEGRID_FUZZ_EXAMPLES", "0"))


@settings(max_examples=_BY_HAND or 2000, deadline=None, database=None, derandomize=not _BY_HAND)
@given(st.one_of(_mutated(), st.binary(max_size=256)))
def test_any_bytes_decode_or_are_refused_with_a_reason(data: bytes) -> None:
    refused: ServiceError | None = None
    try:
        decoded = decode_image(data, SMALL_LIMITS)
    except ServiceError as error:
        refused = error
    if refused is not None:
        assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
        assert reason_of(refused) in _REASONS, refused
        return
    assert decoded.pixels.dtype == np.uint8
    assert decoded.pixels.ndim == 3
    assert decoded.pixels.shape[2] == 3
    assert decoded.width * decoded.height <= SMALL_LIMITS.max_pixels
