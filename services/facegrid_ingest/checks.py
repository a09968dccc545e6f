"""Checks of stream processors as callers give them: every violation named by field."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from facegrid import limits, names, validation
from facegrid.errors import ServiceError, invalid_argument, invalid_arguments, permission_denied
from facegrid.v1 import common_pb2, ingest_pb2
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2

from facegrid_ingest import urls

SP = ingest_pb2.StreamProcessor

PROCESSOR_ID = names.STREAM_PROCESSOR_ID
SOURCE_ID = names.SOURCE_ID
MAX_SOURCES = 256
MAX_MATCHES = 100
MAX_FACE_SIZE = 1000
MIN_FPS, MAX_FPS = 0.1, 30.0
MAX_SUPPRESSION_S = 24 * 3600.0
# Fields UpdateStreamProcessor may change; `sources` and `collection` only when stopped.
UPDATABLE = (
    "display_name",
    "sources",
    "collection",
    "match_threshold",
    "frames_per_second",
    "quality_filter",
    "max_matches",
    "max_event_delay",
    "context",
    "min_face_size",
    "suppression_window",
)
STOPPED_ONLY = ("sources", "collection")
NAME_PREFIX = "streamProcessors/"


def processor_id_of(name: str, field: str = "name") -> str:
    processor_id = name.removeprefix(NAME_PREFIX)
    if not name.startswith(NAME_PREFIX) or not PROCESSOR_ID.fullmatch(processor_id):
        raise invalid_argument(field, "must be streamProcessors/{stream_processor}")
    return processor_id


def check_processor_id(value: str, field: str = "stream_processor_id") -> str:
    if not PROCESSOR_ID.fullmatch(value):
        raise invalid_argument(
            field,
            "1 to 63 lowercase letters, digits and hyphens, starting with a letter and not "
            "ending with a hyphen",
        )
    return value


def _seconds(value: duration_pb2.Duration) -> float:
    # Not ToTimedelta(): any int64 may arrive, and timedelta overflows on large ones.
    return value.seconds + value.nanos / 1e9


def check_processor(
    processor: SP,
    allowed_hosts: Sequence[str],
    allowed_dirs: Sequence[Path],
    prefix: str = "stream_processor",
) -> None:
    """Every field of a processor a caller gave; INVALID_ARGUMENT naming each bad field,
    PERMISSION_DENIED for a pull URL the administrator does not allow."""
    violations: list[tuple[str, str]] = []

    def bad(field: str, text: str) -> None:
        violations.append((f"{prefix}.{field}", text))

    if len(processor.display_name) > limits.MAX_DISPLAY_NAME:
        bad("display_name", f"at most {limits.MAX_DISPLAY_NAME} characters")
    if not processor.collection.startswith("collections/") or processor.collection == (
        "collections/"
    ):
        bad("collection", "must be collections/{collection}")
    if processor.HasField("match_threshold") and not _percent(processor.match_threshold):
        bad("match_threshold", "must be 0 to 100")
    fps = processor.frames_per_second
    if fps != 0 and not (MIN_FPS <= fps <= MAX_FPS):
        bad("frames_per_second", f"must be {MIN_FPS} to {MAX_FPS}, or 0 for the default 2")
    if processor.quality_filter not in common_pb2.QualityFilter.values():
        bad("quality_filter", f"unknown quality filter {processor.quality_filter}")
    if not 0 <= processor.max_matches <= MAX_MATCHES:
        bad("max_matches", f"must be 1 to {MAX_MATCHES}, or 0 for the default 5")
    if processor.HasField("max_event_delay") and not (
        0.1 <= _seconds(processor.max_event_delay) <= 60
    ):
        bad("max_event_delay", "must be 0.1 s to 60 s")
    if (
        processor.min_face_size
        and not limits.MIN_FACE_SIZE <= processor.min_face_size <= MAX_FACE_SIZE
    ):
        bad("min_face_size", f"must be {limits.MIN_FACE_SIZE} to {MAX_FACE_SIZE}, or 0")
    if processor.HasField("suppression_window") and not (
        0 <= _seconds(processor.suppression_window) <= MAX_SUPPRESSION_S
    ):
        bad("suppression_window", "must be 0 s to 24 h")
    if not processor.sources:
        bad("sources", "at least one source is required")
    elif len(processor.sources) > MAX_SOURCES:
        bad("sources", f"at most {MAX_SOURCES} sources")
    seen: set[str] = set()
    denied: ServiceError | None = None
    for index, source in enumerate(processor.sources):
        field = f"sources[{index}]"
        if not SOURCE_ID.fullmatch(source.source_id):
            bad(f"{field}.source_id", "1 to 128 characters of [a-zA-Z0-9_.-:]")
        elif source.source_id in seen:
            bad(f"{field}.source_id", f"{source.source_id!r} is used twice")
        seen.add(source.source_id)
        if source.HasField("match_threshold") and not _percent(source.match_threshold):
            bad(f"{field}.match_threshold", "must be 0 to 100")
        if source.frames_per_second and not MIN_FPS <= source.frames_per_second <= MAX_FPS:
            bad(f"{field}.frames_per_second", f"must be {MIN_FPS} to {MAX_FPS}, or 0")
        if (
            source.min_face_size
            and not limits.MIN_FACE_SIZE <= source.min_face_size <= MAX_FACE_SIZE
        ):
            bad(
                f"{field}.min_face_size", f"must be {limits.MIN_FACE_SIZE} to {MAX_FACE_SIZE}, or 0"
            )
        kind = source.WhichOneof("input")
        if kind is None:
            bad(field, "a source is either pull (with a url) or push")
        elif kind == "pull":
            try:
                urls.parse_pull_url(source.pull.url, allowed_hosts, allowed_dirs)
            except urls.UrlRejected as rejected:
                if rejected.permission:
                    denied = denied or permission_denied(
                        f"{prefix}.{field}.pull.url", rejected.message, rejected.reason
                    )
                else:
                    bad(f"{field}.pull.url", rejected.message)
    try:
        validation.identification_context(processor.context, f"{prefix}.context")
    except ServiceError as error:
        if not violations and denied is None:
            raise
        violations.extend(_violations(error))
    if violations:
        raise invalid_arguments(violations)
    if denied is not None:
        raise denied


def _percent(value: float) -> bool:
    return math.isfinite(value) and 0 <= value <= 100


def _violations(error: ServiceError) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for detail in error.details:
        if isinstance(detail, error_details_pb2.BadRequest):
            out.extend((v.field, v.description) for v in detail.field_violations)
    return out
