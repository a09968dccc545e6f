"""Checks of public request fields that the public services (gateway, ingest) own; the
internal services check the rest."""

from __future__ import annotations

import re
import uuid

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from facegrid.errors import invalid_argument, invalid_arguments
from facegrid.v1 import common_pb2

Purpose = common_pb2.IdentificationContext.Purpose

MAX_CASE_ID = 128
MAX_JUSTIFICATION = 2000
MAX_METADATA_BYTES = 8 * 1024
# The range RFC 3339 (and so protobuf's Timestamp) can express: years 1 to 9999.
MIN_TIMESTAMP_SECONDS = -62_135_596_800
MAX_TIMESTAMP_SECONDS = 253_402_300_799


def identification_context(
    context: common_pb2.IdentificationContext, field: str = "context"
) -> None:
    """Purpose and case id are required on every identification call."""
    violations = []
    if context.purpose == Purpose.PURPOSE_UNSPECIFIED:
        violations.append((f"{field}.purpose", "a purpose is required for identification"))
    elif context.purpose not in Purpose.values():
        violations.append((f"{field}.purpose", f"unknown purpose {context.purpose}"))
    case_id = context.case_id
    if not case_id:
        violations.append((f"{field}.case_id", "a case id is required for identification"))
    elif len(case_id) > MAX_CASE_ID or not case_id.isprintable():
        violations.append((f"{field}.case_id", f"1 to {MAX_CASE_ID} printable characters"))
    if len(context.justification) > MAX_JUSTIFICATION:
        violations.append((f"{field}.justification", f"at most {MAX_JUSTIFICATION} characters"))
    if violations:
        raise invalid_arguments(violations, reason="IDENTIFICATION_CONTEXT_REQUIRED")


def count(value: int, field: str, maximum: int, default: int) -> int:
    """0 means the default; otherwise 1 to ``maximum``."""
    if value == 0:
        return default
    if not 1 <= value <= maximum:
        raise invalid_argument(field, f"must be 1 to {maximum}, got {value}")
    return value


def optional_id(value: str, pattern: re.Pattern[str], field: str) -> str:
    if value and not pattern.fullmatch(value):
        raise invalid_argument(field, f"must match {pattern.pattern}")
    return value


def request_id(value: str, field: str = "request_id") -> uuid.UUID | None:
    if not value:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        raise invalid_argument(field, "must be a UUID") from None


def timestamp(value: timestamp_pb2.Timestamp, field: str) -> float:
    """A valid Timestamp (years 1 to 9999, nanos 0 to 999,999,999) as Unix seconds."""
    if not (
        MIN_TIMESTAMP_SECONDS <= value.seconds <= MAX_TIMESTAMP_SECONDS
        and 0 <= value.nanos <= 999_999_999
    ):
        raise invalid_argument(
            field, f"not a valid timestamp (seconds {value.seconds}, nanos {value.nanos})"
        )
    return value.seconds + value.nanos / 1e9


def time_range(value: common_pb2.TimeRange, field: str) -> tuple[float | None, float | None]:
    """The set ends of a TimeRange as Unix seconds, checked: valid, end not before start."""
    start = (
        timestamp(value.start_time, f"{field}.start_time") if value.HasField("start_time") else None
    )
    end = timestamp(value.end_time, f"{field}.end_time") if value.HasField("end_time") else None
    if start is not None and end is not None and end < start:
        raise invalid_argument(field, "end_time is before start_time")
    return start, end


def metadata(value: struct_pb2.Struct, field: str = "metadata") -> None:
    try:
        text = json_format.MessageToJson(value, indent=None)
    except ValueError:  # NaN or an infinity: JSON has no such numbers
        raise invalid_argument(
            field, "numbers must be finite (JSON has no NaN or Infinity)"
        ) from None
    size = len(text.encode())
    if size > MAX_METADATA_BYTES:
        raise invalid_argument(field, f"at most {MAX_METADATA_BYTES} bytes as JSON, got {size}")
