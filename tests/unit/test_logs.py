"""Structured logs: JSON line shape, trace ids, fields, text format, the per-RPC line."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from facegrid.logs import QUIET_LOGGERS, configure_logging, format_time, log_rpc
from opentelemetry.sdk.trace import TracerProvider

TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """A configured root logger writing to a StringIO; the previous setup is restored."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    saved_quiet = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    out = io.StringIO()
    try:
        yield out
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved_handlers:
            root.addHandler(handler)
        root.setLevel(saved_level)
        for name, level in saved_quiet.items():
            logging.getLogger(name).setLevel(level)


def _lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_json_line_shape(stream: io.StringIO) -> None:
    configure_logging("gateway", "INFO", "json", stream=stream)
    logging.getLogger("facegrid.test").info("hello %s", "world")
    logging.getLogger("facegrid.test").debug("below the level")
    (line,) = _lines(stream)
    assert list(line) == ["time", "level", "service", "logger", "message"]
    assert TIME.match(line["time"])
    assert line["level"] == "INFO"
    assert line["service"] == "gateway"
    assert line["logger"] == "facegrid.test"
    assert line["message"] == "hello world"


def test_time_is_rfc3339_utc_milliseconds() -> None:
    assert format_time(1_795_000_803.1234) == "2026-11-18T11:20:03.123Z"
    assert format_time(0.0) == "1970-01-01T00:00:00.000Z"


def test_one_line_per_record_even_with_newlines(stream: io.StringIO) -> None:
    configure_logging("search", stream=stream)
    logging.getLogger("x").warning("two\nlines")
    assert len(stream.getvalue().splitlines()) == 1
    assert _lines(stream)[0]["message"] == "two\nlines"


def test_trace_and_span_ids_inside_a_span(stream: io.StringIO) -> None:
    configure_logging("embedding", stream=stream)
    tracer = TracerProvider().get_tracer("test")  # not the global provider
    log = logging.getLogger("facegrid.test")
    with tracer.start_as_current_span("work") as span:
        log.info("inside")
        context = span.get_span_context()
    log.info("outside")
    inside, outside = _lines(stream)
    assert inside["trace_id"] == f"{context.trace_id:032x}"
    assert inside["span_id"] == f"{context.span_id:016x}"
    assert re.fullmatch(r"[0-9a-f]{32}", inside["trace_id"])
    assert re.fullmatch(r"[0-9a-f]{16}", inside["span_id"])
    assert "trace_id" not in outside
    assert "span_id" not in outside


def test_extra_fields_are_merged(stream: io.StringIO) -> None:
    configure_logging("gateway", stream=stream)
    logging.getLogger("x").info(
        "enrolled",
        extra={
            "fields": {
                "collection": "staff",
                "faces": 3,
                "ratio": 0.5,
                "ok": True,
                "nothing": None,
                "path": Path("/tmp/a"),  # not JSON: written as str
                "nan": float("nan"),  # not valid JSON: written as str
                "nested": {"ids": (1, 2)},
                "message": "collides",  # a reserved key is not overwritten
            }
        },
    )
    (line,) = _lines(stream)
    assert line["message"] == "enrolled"
    assert line["field.message"] == "collides"
    assert line["collection"] == "staff"
    assert line["faces"] == 3
    assert line["ratio"] == 0.5
    assert line["ok"] is True
    assert line["nothing"] is None
    assert line["path"] == "/tmp/a"
    assert line["nan"] == "nan"
    assert line["nested"] == {"ids": [1, 2]}


def test_exception_field(stream: io.StringIO) -> None:
    configure_logging("detection", stream=stream)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("x").exception("failed")
    (line,) = _lines(stream)
    assert line["level"] == "ERROR"
    assert line["message"] == "failed"
    assert line["exception"].startswith("Traceback (most recent call last):")
    assert "RuntimeError: boom" in line["exception"]


def test_text_format(stream: io.StringIO) -> None:
    configure_logging("gateway", "debug", "text", stream=stream)
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("work") as span:
        logging.getLogger("facegrid.x").debug(
            "searched", extra={"fields": {"hits": 2, "collection": "my staff"}}
        )
        context = span.get_span_context()
    (line,) = stream.getvalue().splitlines()
    time, rest = line.split(" ", 1)
    assert TIME.match(time)
    assert rest == (
        'DEBUG gateway facegrid.x searched hits=2 collection="my staff" '
        f"trace={context.trace_id:032x} span={context.span_id:016x}"
    )


def test_text_format_exception_follows(stream: io.StringIO) -> None:
    configure_logging("gateway", fmt="text", stream=stream)
    try:
        raise ValueError("bad")
    except ValueError:
        logging.getLogger("x").exception("failed")
    first, *rest = stream.getvalue().splitlines()
    assert first.endswith("ERROR gateway x failed")
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "ValueError: bad"


@pytest.mark.parametrize(
    ("level", "fmt", "match"),
    [("LOUD", "json", "log level 'LOUD'"), ("INFO", "xml", "log format 'xml'")],
)
def test_invalid_level_or_format(level: str, fmt: str, match: str) -> None:
    root = logging.getLogger()
    handlers = list(root.handlers)
    with pytest.raises(ValueError, match=match):
        configure_logging("gateway", level, fmt)
    assert root.handlers == handlers  # nothing changed


def test_replaces_root_handlers_and_quiets_third_parties(stream: io.StringIO) -> None:
    logging.getLogger().addHandler(logging.NullHandler())
    configure_logging("gateway", "DEBUG", stream=stream)
    configure_logging("gateway", "DEBUG", stream=stream)
    assert len(logging.getLogger().handlers) == 1
    assert logging.getLogger().level == logging.DEBUG
    logging.getLogger("faiss.loader").info("Loading faiss with AVX512 support.")
    logging.getLogger("PIL.PngImagePlugin").debug("STREAM b'IHDR'")
    logging.getLogger("faiss.loader").warning("kept")
    assert [line["message"] for line in _lines(stream)] == ["kept"]


@pytest.mark.parametrize(
    ("code", "level"),
    [
        ("OK", "INFO"),
        ("NOT_FOUND", "INFO"),
        ("INVALID_ARGUMENT", "INFO"),
        ("RESOURCE_EXHAUSTED", "INFO"),
        ("INTERNAL", "WARNING"),
        ("UNKNOWN", "WARNING"),
        ("DATA_LOSS", "WARNING"),
        ("UNAVAILABLE", "WARNING"),
        ("DEADLINE_EXCEEDED", "WARNING"),
    ],
)
def test_log_rpc_levels(stream: io.StringIO, code: str, level: str) -> None:
    configure_logging("gateway", stream=stream)
    log_rpc(
        logging.getLogger("facegrid.rpc"),
        method="/facegrid.v1.FaceService/SearchFaces",
        code=code,
        duration_ms=12.345,
    )
    (line,) = _lines(stream)
    assert line["level"] == level
    assert line["message"] == "rpc"
    assert line["rpc.method"] == "/facegrid.v1.FaceService/SearchFaces"
    assert line["rpc.code"] == code
    assert line["duration_ms"] == 12.3
    assert "peer" not in line


def test_log_rpc_peer_fields_and_grpc_status_code(stream: io.StringIO) -> None:
    import grpc

    configure_logging("search", stream=stream)
    log_rpc(
        logging.getLogger("facegrid.rpc"),
        method="/facegrid.internal.v1.SearchService/Search",
        code=grpc.StatusCode.UNAVAILABLE,
        duration_ms=3,
        peer="ipv4:10.0.0.7:51234",
        principal="ops",
    )
    (line,) = _lines(stream)
    assert line["level"] == "WARNING"
    assert line["rpc.code"] == "UNAVAILABLE"
    assert line["duration_ms"] == 3.0
    assert line["peer"] == "ipv4:10.0.0.7:51234"
    assert line["principal"] == "ops"
