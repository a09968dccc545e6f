"""Structured logs: one JSON object per line on stderr, with the trace and span ids.

``configure_logging`` sets up the root logger once per process; modules keep logging
with ``logging.getLogger(__name__)``. Structured fields go in
``extra={"fields": {...}}`` and land at the top level of the JSON object. ``log_rpc``
writes the one line per RPC (method, status code, duration). Nothing here logs a
request or a response: callers must not put image bytes, names, descriptors or tokens
in a message or field.
"""

from __future__ import annotations

import datetime
import enum
import json
import logging
import math
import sys
from collections.abc import Mapping
from typing import Any, TextIO

from opentelemetry import trace

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMATS = ("json", "text")

# Third-party loggers held at WARNING whatever the level (their warnings and errors still
# show): each is chatty at INFO or DEBUG about things an operator cannot act on.
QUIET_LOGGERS = (
    "faiss.loader",  # INFO for each CPU-specific faiss build it tries (under Milvus Lite)
    "PIL",  # DEBUG for every chunk of every decoded image
    "asyncio",  # DEBUG about selectors and slow callbacks
)

# gRPC status codes that mean a fault on the server's side (or its dependencies'),
# logged at WARNING; others (caller errors, OK) at INFO.
SERVER_FAULT_CODES = frozenset(
    {"INTERNAL", "UNKNOWN", "DATA_LOSS", "UNAVAILABLE", "DEADLINE_EXCEEDED"}
)

# Keys every line has (or may have); a structured field of the same name is written
# as "field.<name>" so it cannot overwrite them.
RESERVED_KEYS = frozenset(
    {"time", "level", "service", "logger", "message", "trace_id", "span_id", "exception", "stack"}
)

_HANDLER_MARK = "_facegrid_logs"


def configure_logging(
    service: str, level: str = "INFO", fmt: str = "json", *, stream: TextIO | None = None
) -> None:
    """Replace the root logger's handlers with one writing ``fmt`` lines to stderr.

    ``level`` is a level name (any case); ``fmt`` is "json" or "text". ``stream`` is for
    tests (default: ``sys.stderr`` as it is at the time of the call).
    Raises ValueError for an unknown level or format.
    """
    level_name = _level_name(level)
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JsonFormatter(service)
    elif fmt == "text":
        formatter = TextFormatter(service)
    else:
        raise ValueError(f"unknown log format {fmt!r}: expected one of {', '.join(FORMATS)}")

    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        if getattr(old, _HANDLER_MARK, False):
            old.close()  # ours; others (a test runner's) are their owners' to close
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    setattr(handler, _HANDLER_MARK, True)
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(level_name)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def log_rpc(
    logger: logging.Logger,
    *,
    method: str,
    code: str | enum.Enum,
    duration_ms: float,
    peer: str | None = None,
    **fields: Any,
) -> None:
    """Log the one line of a finished RPC: its method, status code and duration.

    ``code`` is a status name ("OK", "NOT_FOUND") or a ``grpc.StatusCode``. Server-side
    faults (SERVER_FAULT_CODES) are logged at WARNING, everything else at INFO. Takes no
    request or response, on purpose: ``fields`` are for ids and counts, not contents.
    """
    code_name = code.name if isinstance(code, enum.Enum) else str(code).upper()
    record_fields: dict[str, Any] = {
        "rpc.method": method,
        "rpc.code": code_name,
        "duration_ms": round(float(duration_ms), 1),
    }
    if peer is not None:
        record_fields["peer"] = peer
    record_fields.update(fields)
    level = logging.WARNING if code_name in SERVER_FAULT_CODES else logging.INFO
    logger.log(level, "rpc", extra={"fields": record_fields}, stacklevel=2)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, service, logger, message, ids, fields."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        return json.dumps(
            _jsonable(_record_dict(self, record, self.service)),
            ensure_ascii=False,
            separators=(",", ":"),
            allow_nan=False,
        )


class TextFormatter(logging.Formatter):
    """One readable line: ``time level service logger message key=value ... trace= span=``.

    A traceback, if any, follows on the next lines.
    """

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of text (plus a traceback's lines)."""
        data = _record_dict(self, record, self.service)
        head = [data.pop(key) for key in ("time", "level", "service", "logger")]
        parts = [*head, _one_line(data.pop("message"))]
        exception = data.pop("exception", None)
        stack = data.pop("stack", None)
        trace_id = data.pop("trace_id", None)
        span_id = data.pop("span_id", None)
        parts.extend(f"{key}={_text_value(value)}" for key, value in data.items())
        if trace_id is not None:
            parts.append(f"trace={trace_id}")
        if span_id is not None:
            parts.append(f"span={span_id}")
        line = " ".join(str(part) for part in parts)
        for block in (exception, stack):
            if block:
                line += "\n" + str(block)
        return line


def _record_dict(
    formatter: logging.Formatter, record: logging.LogRecord, service: str
) -> dict[str, Any]:
    """The content of a line, in output order, shared by both formats."""
    data: dict[str, Any] = {
        "time": format_time(record.created),
        "level": record.levelname,
        "service": service,
        "logger": record.name,
        "message": record.getMessage(),
    }
    trace_id, span_id = current_trace_ids()
    if trace_id is not None and span_id is not None:
        data["trace_id"] = trace_id
        data["span_id"] = span_id
    if record.exc_info and not record.exc_text:
        record.exc_text = formatter.formatException(record.exc_info)
    if record.exc_text:
        data["exception"] = record.exc_text
    if record.stack_info:
        data["stack"] = formatter.formatStack(record.stack_info)
    fields = getattr(record, "fields", None)
    if isinstance(fields, Mapping):
        for key, value in fields.items():
            name = str(key)
            data[f"field.{name}" if name in RESERVED_KEYS else name] = value
    return data


def format_time(created: float) -> str:
    """RFC 3339 UTC with milliseconds, e.g. ``2026-11-26T11:20:03.123Z``."""
    moment = datetime.datetime.fromtimestamp(created, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def current_trace_ids() -> tuple[str | None, str | None]:
    """(trace id, span id) of the current OpenTelemetry span as hex, or (None, None)."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None, None
    return trace.format_trace_id(context.trace_id), trace.format_span_id(context.span_id)


def _level_name(level: str) -> str:
    name = str(level).strip().upper()
    if name not in LEVELS:
        raise ValueError(f"unknown log level {level!r}: expected one of {', '.join(LEVELS)}")
    return name


def _jsonable(value: Any) -> Any:
    """``value`` with everything JSON cannot hold turned into strings."""
    if isinstance(value, enum.Enum):
        return _jsonable(value.value)
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(item) for item in value]
    return str(value)


def _text_value(value: Any) -> str:
    """A field value for the text format: bare when it is one plain word, else JSON-quoted."""
    if isinstance(value, str):
        plain = bool(value) and not any(c.isspace() or c in '"=\\' for c in value)
        return value if plain else json.dumps(value, ensure_ascii=False)
    converted = _jsonable(value)
    if isinstance(converted, str):
        return _text_value(converted)
    return json.dumps(converted, ensure_ascii=False, separators=(",", ":"))


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")
