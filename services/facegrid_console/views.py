"""How values look on the pages: similarities, rates, purposes, times, face images.

Images are shown as ``data:`` URLs made here from what a call returned (the probe the
person just uploaded, cropped to the face the gateway searched with; a match event's
chip): nothing is kept, and no page fetches an image from elsewhere.
"""

from __future__ import annotations

import base64
import io
from typing import Any

from facegrid.config import ImageLimits
from facegrid.errors import ServiceError
from facegrid.imaging import decode_image
from facegrid.v1 import common_pb2, face_service_pb2
from google.protobuf import timestamp_pb2
from PIL import Image

Purpose = common_pb2.IdentificationContext.Purpose


# The purposes a person may pick on a search form (those an identification may name).
def enum_label(name: str, prefix: str) -> str:
    return name.removeprefix(prefix).replace("_", " ").capitalize()


PURPOSES = [
    (name, enum_label(name, "PURPOSE_"))
    for name in Purpose.keys()  # noqa: SIM118
    if name != "PURPOSE_UNSPECIFIED"
]
_PROBE_SIZE = 240


def purpose_label(value: int) -> str:
    name = Purpose.Name(value) if value in Purpose.values() else "PURPOSE_UNSPECIFIED"
    return enum_label(name, "PURPOSE_")


def purpose_value(name: str) -> int:
    """A form's PURPOSE_... name as the enum's value; 0 (unspecified: the gateway
    refuses it) for anything else."""
    return Purpose.Value(name) if name in Purpose.keys() else 0  # noqa: SIM118


def outcome_label(value: int) -> str:
    outcome = face_service_pb2.ReviewDecision.Outcome
    name = outcome.Name(value) if value in outcome.values() else "OUTCOME_UNSPECIFIED"
    return enum_label(name, "OUTCOME_")


def similarity(value: float) -> str:
    return f"{value:.1f}"


def rate(value: float) -> str:
    """A false match rate as a fraction people read: "1 in 12,500 (8.0e-05)"."""
    if value <= 0:
        return "below what was measured"
    if value >= 1:
        return "1 in 1"
    return f"1 in {round(1 / value):,} ({value:.1e})"


def expected(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:,.0f}"


def when(stamp: timestamp_pb2.Timestamp) -> str:
    if not stamp.seconds and not stamp.nanos:
        return ""
    return stamp.ToDatetime().strftime("%Y-%m-%d %H:%M:%S UTC")


def record_id(name: str) -> str:
    return name.removeprefix("auditRecords/")


def _png_data_url(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return png_data_url(out.getvalue())


def chip_png(chip: common_pb2.Chip) -> bytes:
    """A match event's aligned chip (RGB bytes) as PNG; b"" when there is none."""
    if not chip.width or not chip.height or len(chip.rgb) != chip.width * chip.height * 3:
        return b""
    out = io.BytesIO()
    Image.frombytes("RGB", (chip.width, chip.height), chip.rgb).save(out, format="PNG")
    return out.getvalue()


def png_data_url(png: bytes) -> str:
    """PNG bytes as a ``data:`` URL; "" for none."""
    return "data:image/png;base64," + base64.b64encode(png).decode() if png else ""


def chip_data_url(chip: common_pb2.Chip) -> str:
    """The chip as a ``data:`` URL; "" when there is none."""
    return png_data_url(chip_png(chip))


def probe_data_url(photo: bytes, box: common_pb2.BoundingBox, limits: ImageLimits) -> str:
    """The uploaded probe cropped to ``box`` (the face searched with) with a margin,
    upright as the gateway saw it; "" if the photo does not decode."""
    try:
        decoded = decode_image(photo, limits)
    except ServiceError:
        return ""
    image = Image.fromarray(decoded.pixels)
    if box.width and box.height:
        margin_x, margin_y = box.width // 3, box.height // 3
        image = image.crop(
            (
                max(0, box.left - margin_x),
                max(0, box.top - margin_y),
                min(image.width, box.left + box.width + margin_x),
                min(image.height, box.top + box.height + margin_y),
            )
        )
    image.thumbnail((_PROBE_SIZE, _PROBE_SIZE))
    return _png_data_url(image)


def filters() -> dict[str, Any]:
    """The Jinja filters the templates use."""
    return {
        "purpose": purpose_label,
        "similarity": similarity,
        "rate": rate,
        "expected": expected,
        "when": when,
        "record_id": record_id,
        "outcome": outcome_label,
    }
