"""Checks of public request fields that the public services (gateway, ingest) own; the
internal services check the rest."""

from __future__ import annotations

import re
import uuid

from google.protobuf import json_format, struct_pb2

from facegrid.errors import invalid_argument, invalid_arguments
from facegrid.v1 import common_pb2

Purpose = common_pb2.IdentificationContext.Purpose

MAX_CASE_ID = 128
MAX_JUSTIFICATION = 2000
MAX_METADATA_BYTES = 8 * 1024


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


def metadata(value: struct_pb2.Struct, field: str = "metadata") -> None:
    size = len(json_format.MessageToJson(value, indent=None).encode())
    if size > MAX_METADATA_BYTES:
        raise invalid_argument(field, f"at most {MAX_METADATA_BYTES} bytes as JSON, got {size}")
