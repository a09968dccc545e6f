"""Image decoding and its limits, in one place.

Every service that accepts image bytes decodes them here, so the same inputs get the
same answers everywhere: JPEG, PNG and WebP only; the size checked before any pixel is
decoded (decompression bombs never allocate); EXIF orientation applied; CMYK, 16-bit,
palette and alpha images turned into 8-bit RGB.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageOps, UnidentifiedImageError

from facegrid.config import ImageLimits
from facegrid.errors import ServiceError, invalid_argument

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP")
EXIF_ORIENTATION_TAG = 0x0112

# Our own pixel limit is checked before decoding; Pillow's global bomb guard stays on as
# a second line of defence at a higher value.
Image.MAX_IMAGE_PIXELS = 200_000_000


@dataclass(frozen=True)
class DecodedImage:
    """An 8-bit RGB image, upright (EXIF orientation already applied)."""

    pixels: NDArray[np.uint8]  # H x W x 3, C-contiguous
    format: str
    orientation: int  # the EXIF orientation that was applied, 1 (none) to 8

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


def decode_image(data: bytes, limits: ImageLimits, field: str = "image") -> DecodedImage:
    """Decode image bytes or raise a ServiceError (INVALID_ARGUMENT) saying what is wrong."""
    if not data:
        raise invalid_argument(field, "image is empty (0 bytes)", reason="IMAGE_EMPTY")
    if len(data) > limits.max_bytes:
        raise invalid_argument(
            field,
            f"image is {len(data)} bytes; the limit is {limits.max_bytes}",
            reason="IMAGE_TOO_LARGE",
        )
    image = _open(data, field)
    _check_dimensions(image.size, limits, field)
    orientation = _exif_orientation(image)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
            upright = ImageOps.exif_transpose(image) if orientation != 1 else image
            pixels = _to_rgb8(upright)
    except ServiceError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning) as exc:
        raise invalid_argument(
            field, f"image data is corrupt or truncated: {exc}", reason="IMAGE_CORRUPT"
        ) from exc
    return DecodedImage(
        pixels=np.ascontiguousarray(pixels), format=str(image.format), orientation=orientation
    )


def _open(data: bytes, field: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Opening reads only the header; our own limits are checked right after.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError as exc:
        raise invalid_argument(
            field,
            "not an image in an accepted format (JPEG, PNG or WebP)",
            reason="IMAGE_UNSUPPORTED_FORMAT",
        ) from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise invalid_argument(
            field, f"image header is corrupt: {exc}", reason="IMAGE_CORRUPT"
        ) from exc
    except Image.DecompressionBombError as exc:
        raise invalid_argument(field, str(exc), reason="IMAGE_TOO_MANY_PIXELS") from exc


def _check_dimensions(size: tuple[int, int], limits: ImageLimits, field: str) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise invalid_argument(field, f"image has no pixels ({width}x{height})", "IMAGE_CORRUPT")
    if width > limits.max_side or height > limits.max_side:
        raise invalid_argument(
            field,
            f"image is {width}x{height}; the longest side may be {limits.max_side} pixels",
            reason="IMAGE_TOO_MANY_PIXELS",
        )
    if width * height > limits.max_pixels:
        raise invalid_argument(
            field,
            f"image is {width}x{height} = {width * height} pixels; "
            f"the limit is {limits.max_pixels}",
            reason="IMAGE_TOO_MANY_PIXELS",
        )


def _exif_orientation(image: Image.Image) -> int:
    try:
        value = int(image.getexif().get(EXIF_ORIENTATION_TAG, 1))
    except (ValueError, TypeError, OSError, SyntaxError):
        return 1  # unreadable EXIF: keep the image as stored
    return value if 1 <= value <= 8 else 1


def _to_rgb8(image: Image.Image) -> NDArray[np.uint8]:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: Pillow's convert("L") clips instead of scaling.
        wide = np.asarray(image, dtype=np.uint32)
        scale = 257.0 if wide.max(initial=0) > 255 else 1.0
        grey = np.clip(wide / scale, 0, 255).astype(np.uint8)
        return np.stack([grey, grey, grey], axis=-1)
    if mode == "F":
        grey = np.clip(np.asarray(image, dtype=np.float32), 0, 255).astype(np.uint8)
        return np.stack([grey, grey, grey], axis=-1)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        # Transparent pixels carry arbitrary colours: put them on white.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"), dtype=np.uint8)
    if mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)
