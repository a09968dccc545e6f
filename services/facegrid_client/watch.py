"""The ``facegrid watch`` and ``facegrid processors`` commands: watch-lists over video.

``facegrid watch SOURCE`` makes a stream processor for one video source (a file, an
RTSP camera, an HTTP stream) against a watch-list collection, subscribes to its match
events, starts it, and prints each event as it comes, with the source's state as it
changes; on exit (the end of a file, or Ctrl-C) it stops the processor, never deletes
it, so that its events stay stored and audited. ``facegrid watch --replay-since`` and
``--after-cursor`` print stored events, then follow new ones. Every event is a
candidate for a person to review, never an identification.

``facegrid processors`` lists, describes, starts, stops and deletes stream processors.

Every call goes to the ingest service with the caller's bearer token and a deadline;
a failure is printed like the other client commands (code, message, details) with
exit code 1.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeAlias, TypeVar
from urllib.parse import unquote, urlsplit

import grpc
from facegrid import limits, names
from facegrid.auth import read_token
from facegrid.rpc_errors import describe_rpc_error, status_code
from facegrid.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc
from google.protobuf import field_mask_pb2, json_format, timestamp_pb2
from google.protobuf.message import Message
from PIL import Image
from rich.table import Table

from facegrid_client import arguments, output
from facegrid_client.commands import (
    PURPOSES,
    _case_id,
    _collection_name,
    _justification,
    connection_options,
    print_rpc_error,
)
from facegrid_client.connection import (
    ClientError,
    ServiceClient,
)

I = ingest_pb2  # noqa: E741
SP = I.StreamProcessor
VS = I.VideoSource
Request = I.StreamMatchEventsRequest
R = TypeVar("R", bound=Message)

NAME_PREFIX = "streamProcessors/"
PROCESSOR_ID = names.STREAM_PROCESSOR_ID
SOURCE_ID = names.SOURCE_ID
URL_SCHEMES = ("rtsp", "rtsps", "http", "https", "file")
WATCHLIST_PURPOSE = "watchlist-monitoring"
PAGE_SIZE = 1000
# A lost event stream is resumed from its cursor after this, doubling while it stays lost.
RESUME_FIRST_DELAY_S = 0.5
# How often the processor's state is polled while watching.
POLL_S = 2.0
# Once every source has ended: how long to wait for the last events, at least and at most.
END_GRACE_S = 3.0
END_WAIT_MAX_S = 10.0
# An ended state not seen to begin in this run is believed after this long.
STALE_END_S = 30.0
# Each StreamMatchEvents call lasts at most this long, then resumes after its cursor.
STREAM_WINDOW_S = 600.0
# The server sends a heartbeat after 30 s without events: a stream silent for longer
# than this is taken for dead and resumed.
STREAM_SILENCE_S = 75.0
RESUME_MAX_DELAY_S = 5.0
RELATIVE_TIME = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
RELATIVE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
TERMINAL_SOURCE_STATES = (VS.STATE_ENDED, VS.STATE_FAILED)
TRANSIENT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
CANDIDATE_EVENTS_NOTICE = "Candidate matches for review by a trained examiner; not identifications."
# The columns of an event row: (header, width, right-aligned); the last takes the rest.
EVENT_COLUMNS = (
    ("time", 19, False),
    ("camera", 10, False),
    ("candidate", 24, False),
    ("similarity", 10, True),
    ("threshold", 9, True),
    ("FMR", 8, True),
    ("exp. false", 10, True),
    ("track", 8, False),
    ("audit record", 0, False),
)


# -- the ingest service's calls --------------------------------------------------------


def default_ingest_address() -> str:
    """The local ingest service: 127.0.0.1 and the configured ``ingest.port``."""
    from facegrid.config import load_settings

    return f"127.0.0.1:{load_settings().ingest.port}"


class IngestClient(ServiceClient):
    """IngestService calls with the caller's token and a deadline on every one.

    Only the calls the contract declares idempotent are retried (on UNAVAILABLE, with
    exponential backoff); CreateStreamProcessor and DeleteStreamProcessor are not.
    """

    stub_class = ingest_pb2_grpc.IngestServiceStub

    def create(self, request: I.CreateStreamProcessorRequest) -> SP:
        reply = self._call("CreateStreamProcessor", request, I.CreateStreamProcessorResponse)
        return reply.stream_processor

    def get(self, name: str) -> SP:
        reply = self._call(
            "GetStreamProcessor",
            I.GetStreamProcessorRequest(name=name),
            I.GetStreamProcessorResponse,
        )
        return reply.stream_processor

    def list_processors(self, page_token: str) -> I.ListStreamProcessorsResponse:
        return self._call(
            "ListStreamProcessors",
            I.ListStreamProcessorsRequest(page_size=PAGE_SIZE, page_token=page_token),
            I.ListStreamProcessorsResponse,
        )

    def update(self, processor: SP, paths: list[str]) -> SP:
        request = I.UpdateStreamProcessorRequest(
            stream_processor=processor, update_mask=field_mask_pb2.FieldMask(paths=paths)
        )
        reply = self._call("UpdateStreamProcessor", request, I.UpdateStreamProcessorResponse)
        return reply.stream_processor

    def delete(self, name: str) -> None:
        self._call(
            "DeleteStreamProcessor",
            I.DeleteStreamProcessorRequest(name=name),
            I.DeleteStreamProcessorResponse,
        )

    def start(self, name: str) -> SP:
        reply = self._call(
            "StartStreamProcessor",
            I.StartStreamProcessorRequest(name=name),
            I.StartStreamProcessorResponse,
        )
        return reply.stream_processor

    def stop(self, name: str) -> SP:
        reply = self._call(
            "StopStreamProcessor",
            I.StopStreamProcessorRequest(name=name),
            I.StopStreamProcessorResponse,
        )
        return reply.stream_processor

    def get_event(self, name: str, include_chip: bool) -> I.MatchEvent:
        reply = self._call(
            "GetMatchEvent",
            I.GetMatchEventRequest(name=name, include_chip=include_chip),
            I.GetMatchEventResponse,
        )
        return reply.match_event

    def list_events(self, request: I.ListMatchEventsRequest) -> I.ListMatchEventsResponse:
        return self._call("ListMatchEvents", request, I.ListMatchEventsResponse)

    def stream_events(self, request: I.StreamMatchEventsRequest, timeout_s: float) -> Any:
        """A StreamMatchEvents call (an iterator of responses that can be cancelled)."""
        return self.stub.StreamMatchEvents(request, metadata=self.metadata, timeout=timeout_s)


# -- registration ----------------------------------------------------------------------

IngestHandler = Callable[[argparse.Namespace, IngestClient], int]


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add `watch` and `processors` to the `facegrid` command."""
    connection = connection_options("--ingest", "ingest service", "ingest.port")
    _register_watch(commands, connection)
    _register_processors(commands, connection)


def _register_watch(
    commands: argparse._SubParsersAction[Any], connection: argparse.ArgumentParser
) -> None:
    help_text = (
        "watch a video source for the people of a watch-list collection and print each "
        "candidate match as it comes (audited); or print stored candidate matches"
    )
    watch: argparse.ArgumentParser = commands.add_parser(
        "watch", help=help_text, description=help_text, parents=[connection]
    )
    watch.set_defaults(handler=_runner(_watch))
    watch.add_argument(
        "source",
        nargs="?",
        metavar="SOURCE",
        help="a video file, or a rtsp://, rtsps://, http(s):// or file:// URL "
        "(omit with --replay-since or --after-cursor)",
    )
    watch.add_argument(
        "--collection",
        type=_collection_name,
        metavar="ID",
        help="the watch-list collection (required with SOURCE)",
    )
    watch.add_argument(
        "--processor",
        type=_processor_id,
        metavar="ID",
        help="the stream processor's id (default: watch-<the source's name>); an existing "
        "one watching the same collection and source is reused",
    )
    watch.add_argument(
        "--source-id",
        default="cam-1",
        type=_source_id,
        metavar="ID",
        help="the camera's id, stored with its events (default cam-1)",
    )
    watch.add_argument(
        "--fps",
        type=arguments.bounded_float(0.1, 30.0),
        metavar="F",
        help="frames per second processed, 0.1-30 (default 2)",
    )
    watch.add_argument(
        "--threshold",
        type=arguments.percentage,
        metavar="T",
        help="similarity 0-100; below the administrator's minimum it is raised to it",
    )
    watch.add_argument(
        "--min-face-size",
        type=arguments.bounded_int(limits.MIN_FACE_SIZE, 1000),
        metavar="PX",
        help="smallest face to look for, 20-1000 pixels (default 80, the detector's own)",
    )
    watch.add_argument(
        "--keep",
        action="store_true",
        help="leave the processor running on exit (default: stop it, unless it was running "
        "before; it is never deleted)",
    )
    watch.add_argument(
        "--chips",
        type=Path,
        metavar="DIR",
        help="save each event's best-shot chip in DIR as <event id>.png (for review)",
    )
    watch.add_argument(
        "--json", action="store_true", help="print one JSON object per line instead of text"
    )
    replay = watch.add_argument_group("stored events (with --processor, without SOURCE)")
    start = replay.add_mutually_exclusive_group()
    start.add_argument(
        "--replay-since",
        type=_since,
        metavar="TIME",
        help="print the events stored since TIME (ISO 8601, local time unless it has an "
        "offset, or ago: 30s, 10m, 2h, 1d), then follow new ones",
    )
    start.add_argument(
        "--after-cursor",
        metavar="CURSOR",
        help="print the events stored after this event's cursor, then follow new ones",
    )
    replay.add_argument("--no-follow", action="store_true", help="print the stored events and exit")
    context = watch.add_argument_group("identification context (written to the audit log)")
    context.add_argument(
        "--purpose",
        default=WATCHLIST_PURPOSE,
        type=_purpose,
        metavar="PURPOSE",
        help=f"why the watch-list is run: {', '.join(sorted(PURPOSES))} "
        f"(default {WATCHLIST_PURPOSE})",
    )
    context.add_argument(
        "--case-id",
        "--case",
        dest="case_id",
        type=_case_id,
        metavar="CASE",
        help="case, incident or task id (1-128 chars; required with SOURCE)",
    )
    context.add_argument(
        "--justification",
        default="",
        type=_justification,
        help="why it is needed, in your words (at most 2,000 characters)",
    )


def _register_processors(
    commands: argparse._SubParsersAction[Any], connection: argparse.ArgumentParser
) -> None:
    help_text = "list, describe, start, stop and delete stream processors"
    parser: argparse.ArgumentParser = commands.add_parser(
        "processors", help=help_text, description=help_text
    )

    def usage(_args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(handler=usage)
    group = parser.add_subparsers(title="processors commands")

    def leaf(name: str, handler: IngestHandler, text: str) -> argparse.ArgumentParser:
        command: argparse.ArgumentParser = group.add_parser(
            name, help=text, description=text, parents=[connection]
        )
        command.set_defaults(handler=_runner(handler))
        return command

    leaf("list", _processors_list, "list the stream processors")
    for name, handler, text in (
        ("get", _processors_get, "describe a stream processor and the state of its sources"),
        ("start", _processors_start, "start a stream processor (audited)"),
        ("stop", _processors_stop, "stop a stream processor (audited; its events are kept)"),
        (
            "delete",
            _processors_delete,
            "delete a stream processor with its match events and chips (their audit "
            "records remain)",
        ),
    ):
        command = leaf(name, handler, text)
        command.add_argument(
            "name", metavar="NAME", type=_processor_name, help="ID or streamProcessors/ID"
        )


def _runner(handler: IngestHandler) -> Callable[[argparse.Namespace], int]:
    """Connect, run, and turn every expected failure into lines on stderr and exit 1."""

    def run(args: argparse.Namespace) -> int:
        errors = output.console(stderr=True)
        address = args.ingest or ""
        # Ctrl-C (and SIGTERM) end a watch cleanly even when this process was started
        # with SIGINT ignored, as a shell does for a background job: Python then
        # installs no handler of its own.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            token = read_token(args.token)
            address = address or default_ingest_address()
            with IngestClient.connect(address, token, args.timeout) as client:
                code = handler(args, client)
            if any(subscription.stuck for subscription in _SUBSCRIPTIONS):
                # A reader thread stuck in a gRPC call would hold up the interpreter's
                # exit: leave now, with everything printed.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
            return code
        except grpc.RpcError as error:
            print_rpc_error(errors, error, "ingest service", address)
            return 1
        except (ClientError, OSError) as error:
            errors.print(f"error: {error}")
            return 1
        except KeyboardInterrupt:
            errors.print("interrupted")
            return 130

    return run


# -- argument types ----------------------------------------------------------------------


_processor_id = arguments.resource_id(PROCESSOR_ID, NAME_PREFIX)


def _processor_name(value: str) -> str:
    """``cam`` or ``streamProcessors/cam`` -> ``streamProcessors/cam``."""
    return NAME_PREFIX + _processor_id(value)


def _source_id(value: str) -> str:
    if not SOURCE_ID.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value!r}: 1 to 128 of [a-zA-Z0-9_.-:]")
    return value


def _purpose(value: str) -> str:
    """A purpose as `facegrid search` takes it; ``watchlist`` for watchlist-monitoring."""
    key = value.lower().removeprefix("purpose_").replace("_", "-")
    if key == "watchlist":
        key = WATCHLIST_PURPOSE
    if key not in PURPOSES:
        raise argparse.ArgumentTypeError(
            f"{value!r}: one of {', '.join(sorted(PURPOSES))} (or watchlist)"
        )
    return key


def _since(value: str) -> datetime:
    """``10m``, ``2h``, ``1d`` ago, or an ISO 8601 time (local unless it has an offset)."""
    relative = RELATIVE_TIME.match(value.strip())
    if relative:
        ago = float(relative.group(1)) * RELATIVE_UNITS[relative.group(2)]
        return datetime.now().astimezone() - timedelta(seconds=ago)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r}: an ISO 8601 time (2025-01-31T14:00:00, +01:00 or Z) or a time ago "
            "(30s, 10m, 2h, 1d)"
        ) from None
    return moment.astimezone()


# -- watch -------------------------------------------------------------------------------


def _watch(args: argparse.Namespace, client: IngestClient) -> int:
    if args.replay_since is not None or args.after_cursor is not None:
        if args.source is not None:
            raise ClientError(
                "give SOURCE to watch a source, or --processor with --replay-since or "
                "--after-cursor to print stored events, not both"
            )
        if args.processor is None:
            raise ClientError("--replay-since and --after-cursor need --processor ID")
        return _replay(args, client)
    if args.source is None:
        raise ClientError(
            "give SOURCE (a video file or a stream URL), or --processor with "
            "--replay-since or --after-cursor to print stored events"
        )
    if args.no_follow:
        raise ClientError("--no-follow goes with --replay-since or --after-cursor")
    if args.collection is None:
        raise ClientError("--collection is required: the watch-list to match against")
    if args.case_id is None:
        raise ClientError("--case-id is required: it is written to the audit log with every event")
    return _watch_live(args, client)


def source_url(source: str) -> str:
    """A URL as given (rtsp, rtsps, http, https, file), or a local file as a file:// URL."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.\-]*://", source):
        scheme = source.partition("://")[0].lower()
        if scheme not in URL_SCHEMES:
            raise ClientError(
                f"{source}: unsupported URL scheme {scheme!r} (use {', '.join(URL_SCHEMES)})"
            )
        return source
    path = Path(source).expanduser().resolve()
    if not path.is_file():
        raise ClientError(
            f"{path}: no such file (for a file on the ingest service's machine, give its "
            "file:// URL)"
        )
    return path.as_uri()


def default_processor_id(url: str) -> str:
    """``watch-`` and a slug of the source: its file name, or its host, port and path
    (never its credentials)."""
    parts = urlsplit(url)
    if parts.scheme.lower() == "file":
        text = Path(unquote(parts.path)).stem
    else:
        host = parts.hostname or ""
        port = f"-{parts.port}" if parts.port else ""
        text = f"{host}{port}-{unquote(parts.path)}"
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return f"watch-{slug}"[:63].rstrip("-") if slug else "watch"


def _source_identity(url: str) -> str:
    """A URL without credentials, query or fragment, to tell whether two name the same."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme.lower()}://{netloc.lower()}{parts.path}"


def _source_label(url: str) -> str:
    """A file's name, or a URL without its credentials."""
    if urlsplit(url).scheme.lower() == "file":
        return Path(unquote(urlsplit(url).path)).name
    return _source_identity(url)


def _wanted_processor(args: argparse.Namespace, url: str) -> SP:
    processor = SP(
        display_name=f"facegrid watch {_source_label(url)}"[:256],
        sources=[VS(source_id=args.source_id, pull=I.PullSource(url=url))],
        collection=args.collection,
        context=common_pb2.IdentificationContext(
            purpose=PURPOSES[args.purpose], case_id=args.case_id, justification=args.justification
        ),
    )
    if args.fps is not None:
        processor.frames_per_second = args.fps
    if args.threshold is not None:
        processor.match_threshold = args.threshold
    if args.min_face_size is not None:
        processor.min_face_size = args.min_face_size
    return processor


def _ensure_processor(client: IngestClient, processor_id: str, wanted: SP, printer: _Printer) -> SP:
    """The processor: created, or the existing one once checked (and its settings
    brought up to date where they were given)."""
    name = NAME_PREFIX + processor_id
    existing = _get_or_none(client, name)
    if existing is None:
        try:
            created = client.create(
                I.CreateStreamProcessorRequest(
                    stream_processor_id=processor_id, stream_processor=wanted
                )
            )
        except grpc.RpcError as error:
            if status_code(error) != grpc.StatusCode.ALREADY_EXISTS:
                raise
            existing = client.get(name)  # made meanwhile by someone else: check it
        else:
            printer.processor("created", created)
            return created
    return _reuse(client, existing, wanted, printer)


def _get_or_none(client: IngestClient, name: str) -> SP | None:
    try:
        return client.get(name)
    except grpc.RpcError as error:
        if status_code(error) == grpc.StatusCode.NOT_FOUND:
            return None
        raise


def _reuse(client: IngestClient, existing: SP, wanted: SP, printer: _Printer) -> SP:
    name = existing.name
    processor_id = name.removeprefix(NAME_PREFIX)
    other = (
        f"give another --processor, or delete it with `facegrid processors delete {processor_id}`"
    )
    if existing.collection != wanted.collection:
        raise ClientError(
            f"{name} exists and watches {existing.collection}, not {wanted.collection}: {other}"
        )
    url = wanted.sources[0].pull.url
    if not any(
        s.HasField("pull") and _source_identity(s.pull.url) == _source_identity(url)
        for s in existing.sources
    ):
        reads = ", ".join(
            f"{s.source_id} ({s.pull.url if s.HasField('pull') else 'push'})"
            for s in existing.sources
        )
        raise ClientError(f"{name} exists and reads other sources ({reads}): {other}")
    change = SP(name=name)
    paths: list[str] = []
    context = common_pb2.IdentificationContext()
    context.CopyFrom(wanted.context)
    if not context.justification:
        context.justification = existing.context.justification
    if (context.purpose, context.case_id, context.justification) != (
        existing.context.purpose,
        existing.context.case_id,
        existing.context.justification,
    ):
        if existing.state not in (SP.STATE_STOPPED, SP.STATE_FAILED):
            raise ClientError(
                f"{name} is running for case {existing.context.case_id!r} "
                f"({output.purpose_label(existing.context.purpose)}): stop it first "
                f"(`facegrid processors stop {processor_id}`), or {other}"
            )
        change.context.CopyFrom(context)
        paths.append("context")
    if wanted.HasField("match_threshold") and (
        not existing.HasField("match_threshold")
        or existing.match_threshold != wanted.match_threshold
    ):
        change.match_threshold = wanted.match_threshold
        paths.append("match_threshold")
    for field in ("frames_per_second", "min_face_size"):
        value = getattr(wanted, field)
        if value and getattr(existing, field) != value:
            setattr(change, field, value)
            paths.append(field)
    if not paths:
        printer.processor("reused", existing)
        return existing
    updated = client.update(change, paths)
    printer.processor("reused", updated, changed=paths)
    return updated


def _watch_live(args: argparse.Namespace, client: IngestClient) -> int:
    url = source_url(args.source)
    processor_id = args.processor or default_processor_id(url)
    name = NAME_PREFIX + processor_id
    printer = _Printer(client, args.json, args.chips)
    processor = _ensure_processor(client, processor_id, _wanted_processor(args, url), printer)
    # Subscribe before starting, so that no event of this run is missed.
    subscription = _Subscription(
        client, Request(stream_processor=name, start_position=Request.START_POSITION_LATEST)
    )
    subscription.start()
    attached = processor.state in (SP.STATE_STARTING, SP.STATE_RUNNING)
    # Stopped on exit unless --keep, or unless it ran before: then it is not ours to stop.
    stop_on_exit = not (args.keep or attached)
    monitor = _Monitor(client, name, subscription, printer, started=not attached)
    interrupted = False
    code = 0
    try:
        if attached:
            printer.processor("attached", processor)
        else:
            printer.processor("started", client.start(name))
        printer.header()
        code = monitor.run()
    except KeyboardInterrupt:
        interrupted = True
    except BaseException:
        subscription.close()
        if stop_on_exit:
            _stop(client, name, printer, args.ingest or "")
        raise
    subscription.close()
    if interrupted:
        printer.notice("interrupted")
    final = _final_view(client, name) or monitor.last_view
    stopped = stop_on_exit and _stop(client, name, printer, args.ingest or "")
    if stop_on_exit and not stopped:
        code = 1
    reason = "" if stopped else "--keep" if args.keep else "it was running before"
    printer.summary(name, monitor.events, final, left_running=reason)
    return code


def _stop(client: IngestClient, name: str, printer: _Printer, address: str) -> bool:
    """Stop the processor on exit (never delete it); False, with the error, if that failed."""
    try:
        printer.processor("stopped", client.stop(name))
    except grpc.RpcError as error:
        if status_code(error) == grpc.StatusCode.NOT_FOUND:
            return True  # deleted meanwhile: nothing to stop
        print_rpc_error(output.console(stderr=True), error, "ingest service", address)
        return False
    return True


def _final_view(client: IngestClient, name: str) -> SP | None:
    """The processor's latest counters, read before it stops (a stop clears them)."""
    try:
        return client.get(name)
    except grpc.RpcError:
        return None


class _Monitor:
    """Prints events as they come and the processor's state as it changes; ends when
    every source has ended (a file played to its end) or failed.

    A source's state is taken for this run's once it was seen waiting or reading since
    the start; until then an ended state may be a stale report of an earlier run (of a
    replica that died, say), and is believed only after ``STALE_END_S``.
    """

    def __init__(
        self,
        client: IngestClient,
        name: str,
        subscription: _Subscription,
        printer: _Printer,
        started: bool,
    ) -> None:
        self.client = client
        self.name = name
        self.subscription = subscription
        self.printer = printer
        self.started = started
        self.events = 0
        self.last_view: SP | None = None
        self._seen: set[str] = set()
        self._live: set[str] = set()
        self._states: dict[str, tuple[int, str, str]] = {}
        self._unavailable = False

    def run(self) -> int:
        next_poll = time.monotonic()
        ended_at: float | None = None
        while True:
            now = time.monotonic()
            if now >= next_poll:
                next_poll = now + POLL_S
                view = self._poll()
                if view is not None:
                    if view.state == SP.STATE_FAILED:
                        self.printer.notice(f"error: {view.name} failed: {view.state_message}")
                        return 1
                    sources = list(view.sources)
                    if sources and all(s.state in TERMINAL_SOURCE_STATES for s in sources):
                        ended_at = now if ended_at is None else ended_at
                    else:
                        ended_at = None
            if ended_at is not None and self.last_view is not None and self._ended(now - ended_at):
                failed = [s for s in self.last_view.sources if s.state == VS.STATE_FAILED]
                for source in failed:
                    self.printer.notice(
                        f"error: source {source.source_id} failed: {source.status_message}"
                    )
                return 1 if failed else 0
            self.subscription.check_alive()
            item = self.subscription.get(max(0.05, next_poll - time.monotonic()))
            self.handle(item)

    def _ended(self, waited: float) -> bool:
        """Whether to end, ``waited`` seconds after every source was seen ended: once the
        events they counted have come (or were waited for long enough)."""
        assert self.last_view is not None
        sources = self.last_view.sources
        if self.started and not all(s.source_id in self._live for s in sources):
            return waited >= STALE_END_S
        counted = sum(s.counters.events for s in sources)
        return (waited >= END_GRACE_S and self.events >= counted) or waited >= END_WAIT_MAX_S

    def handle(self, item: _Item) -> None:
        if item is None:
            return
        if isinstance(item, str):
            self.printer.notice(item)
            return
        if isinstance(item, Exception):
            raise item
        if item.event_id in self._seen:
            return  # re-sent after a resumption
        self._seen.add(item.event_id)
        self.events += 1
        self.printer.event(item)

    def _poll(self) -> SP | None:
        try:
            view = self.client.get(self.name)
        except grpc.RpcError as error:
            code = status_code(error)
            if code == grpc.StatusCode.NOT_FOUND:
                raise ClientError(f"{self.name} was deleted") from None
            if code not in TRANSIENT_CODES:
                raise
            if not self._unavailable:
                self.printer.notice(
                    f"state of {self.name} unavailable ({code.name if code else error}); retrying"
                )
            self._unavailable = True
            return None
        self._unavailable = False
        self.last_view = view
        self._print_changes(view)
        return view

    def _print_changes(self, view: SP) -> None:
        key = (int(view.state), view.state_message, "")
        if self._states.get("") != key:
            self._states[""] = key
            self.printer.processor_state(view)
        for source in view.sources:
            state = (int(source.state), source.status_message, source.owner)
            if source.state not in TERMINAL_SOURCE_STATES:
                self._live.add(source.source_id)
            if self._states.get(source.source_id) != state:
                self._states[source.source_id] = state
                self.printer.source_state(view.name, source)


# -- stored events -----------------------------------------------------------------------


def _replay(args: argparse.Namespace, client: IngestClient) -> int:
    name = NAME_PREFIX + args.processor
    printer = _Printer(client, args.json, args.chips)
    seen: set[str] = set()
    count = 0

    def show(event: I.MatchEvent) -> None:
        nonlocal count
        if event.event_id in seen:
            return
        seen.add(event.event_id)
        count += 1
        printer.event(event)

    printer.header()
    if args.no_follow:
        for event in _stored_events(client, name, args.replay_since, args.after_cursor):
            show(event)
        printer.stored_count(name, count)
        return 0
    if args.replay_since is not None:
        request = Request(
            stream_processor=name,
            start_position=Request.START_POSITION_START_TIME,
            start_time=_timestamp(args.replay_since),
        )
    else:
        request = Request(
            stream_processor=name,
            start_position=Request.START_POSITION_AFTER_CURSOR,
            after_cursor=args.after_cursor,
        )
    subscription = _Subscription(client, request)
    subscription.start()
    try:
        while True:
            subscription.check_alive()
            item = subscription.get(POLL_S)
            if isinstance(item, str):
                printer.notice(item)
            elif isinstance(item, Exception):
                raise item
            elif item is not None:
                show(item)
    except KeyboardInterrupt:
        printer.notice("interrupted")
    finally:
        subscription.close()
    printer.stored_count(name, count)
    return 0


def _stored_events(
    client: IngestClient, name: str, since: datetime | None, after_cursor: str | None
) -> Iterator[I.MatchEvent]:
    """The stored events since a time, or after a cursor (ListMatchEvents, page by page)."""
    request = I.ListMatchEventsRequest(parent=name, page_size=PAGE_SIZE)
    if since is not None:
        request.create_time_range.start_time.CopyFrom(_timestamp(since))
    found = after_cursor is None
    while True:
        reply = client.list_events(request)
        for event in reply.match_events:
            if found:
                yield event
            elif event.cursor == after_cursor:
                found = True
        if not reply.next_page_token:
            break
        request.page_token = reply.next_page_token
    if not found:
        raise ClientError(
            f"no stored event of {name} has cursor {after_cursor}: its events may have "
            "expired; use --replay-since"
        )


def _timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(moment.timestamp() * 1e9))
    return stamp


# -- the event stream --------------------------------------------------------------------

# Every subscription of this process, to check at exit that none is stuck.
_SUBSCRIPTIONS: list[_Subscription] = []

# What the subscription hands over: an event, a notice to print, a fatal error, or
# nothing (the wait ran out).
_Item: TypeAlias = I.MatchEvent | str | Exception | None


class _Subscription:
    """StreamMatchEvents read in a thread, into a queue.

    Each call has a deadline (``STREAM_WINDOW_S``); when it runs out, or the service is
    unavailable, or the stream falls silent for longer than the heartbeats allow, the
    subscription resumes after the cursor of the last event received (before any
    event: from the time it began), so that nothing is missed; a resumption may
    repeat an event, which the reader drops by its id.
    """

    def __init__(
        self,
        client: IngestClient,
        request: I.StreamMatchEventsRequest,
        window_s: float = STREAM_WINDOW_S,
    ) -> None:
        self._client = client
        self._request = request
        self._window_s = window_s
        self._queue: queue.Queue[_Item] = queue.Queue()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._call: Any = None
        self._restart = False
        self._cursor = ""
        self._began = timestamp_pb2.Timestamp()
        self._last_message = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="facegrid-watch", daemon=True)
        _SUBSCRIPTIONS.append(self)

    def start(self) -> None:
        self._began.GetCurrentTime()
        self._thread.start()

    def get(self, timeout_s: float) -> _Item:
        try:
            return self._queue.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def check_alive(self) -> None:
        """Resume a stream that sent nothing, not even a heartbeat, for too long."""
        if time.monotonic() - self._last_message < STREAM_SILENCE_S:
            return
        with self._lock:
            self._last_message = time.monotonic()
            if self._call is not None:
                self._restart = True
                self._call.cancel()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            if self._call is not None:
                self._call.cancel()
        self._thread.join(timeout=5)

    @property
    def stuck(self) -> bool:
        """The reader thread did not end after close(): a gRPC call that would not
        cancel. Exiting normally could then wait on it at interpreter shutdown."""
        return self._thread.is_alive()

    def _resume_request(self) -> I.StreamMatchEventsRequest:
        if self._cursor:
            return Request(
                stream_processor=self._request.stream_processor,
                source_ids=list(self._request.source_ids),
                start_position=Request.START_POSITION_AFTER_CURSOR,
                after_cursor=self._cursor,
            )
        if self._request.start_position in (
            Request.START_POSITION_UNSPECIFIED,
            Request.START_POSITION_LATEST,
        ):
            return Request(
                stream_processor=self._request.stream_processor,
                source_ids=list(self._request.source_ids),
                start_position=Request.START_POSITION_START_TIME,
                start_time=self._began,
            )
        return self._request

    def _run(self) -> None:
        request = self._request
        delay = RESUME_FIRST_DELAY_S
        while not self._closed.is_set():
            with self._lock:
                if self._closed.is_set():
                    return
                self._call = self._client.stream_events(request, self._window_s)
                self._restart = False
                call = self._call
            self._last_message = time.monotonic()
            try:
                for message in call:
                    self._last_message = time.monotonic()
                    delay = RESUME_FIRST_DELAY_S
                    if message.HasField("event"):
                        self._cursor = message.event.cursor
                        self._queue.put(message.event)
            except grpc.RpcError as error:
                if self._closed.is_set():
                    return
                code = status_code(error)
                if code == grpc.StatusCode.CANCELLED and self._restart:
                    self._queue.put("the event stream fell silent; resuming it")
                elif code == grpc.StatusCode.UNAVAILABLE:
                    self._queue.put(
                        f"the event stream was lost (UNAVAILABLE); resuming in {delay:.1f} s"
                    )
                    if self._closed.wait(delay):
                        return
                    delay = min(delay * 2, RESUME_MAX_DELAY_S)
                elif code != grpc.StatusCode.DEADLINE_EXCEEDED:
                    self._queue.put(error)
                    return
            else:
                # The service ended the stream (shutting down, say): resume, not at once.
                if self._closed.wait(delay):
                    return
                delay = min(delay * 2, RESUME_MAX_DELAY_S)
            request = self._resume_request()


# -- printing ----------------------------------------------------------------------------


def _local_time(value: timestamp_pb2.Timestamp) -> str:
    if value.seconds == 0 and value.nanos == 0:
        return ""
    moment = datetime.fromtimestamp(value.ToNanoseconds() / 1e9).astimezone()
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _now() -> str:
    return datetime.now().astimezone().strftime("%H:%M:%S")


def _state_label(enum: Any, value: int) -> str:
    """``STATE_RECONNECTING`` -> ``reconnecting``."""
    return str(enum.Name(value)).removeprefix("STATE_").lower()


def _cells(values: list[str]) -> str:
    cells = []
    for (_, width, right), value in zip(EVENT_COLUMNS, values, strict=True):
        cells.append(value.rjust(width) if right else value.ljust(width))
    return "  ".join(cells).rstrip()


class _Printer:
    """Events, states and summaries, as text (event rows under a header printed once)
    or as one JSON object per line with its ``kind``. Notices go to stderr."""

    def __init__(self, client: IngestClient, as_json: bool, chips: Path | None) -> None:
        self.client = client
        self.json = as_json
        self.chips = chips
        self.out = output.console()
        self.err = output.console(stderr=True)
        if chips is not None:
            chips.mkdir(parents=True, exist_ok=True)

    def _emit(self, kind: str, **fields: Any) -> None:
        sys.stdout.write(json.dumps({"kind": kind, **fields}, sort_keys=False) + "\n")
        sys.stdout.flush()

    def _line(self, text: str) -> None:
        self.out.print(text, soft_wrap=True)

    def notice(self, text: str) -> None:
        self.err.print(text, soft_wrap=True)

    def header(self) -> None:
        if self.json:
            return
        self._line(CANDIDATE_EVENTS_NOTICE)
        self._line(_cells([header for header, _, _ in EVENT_COLUMNS]))

    def processor(self, action: str, processor: SP, changed: list[str] | None = None) -> None:
        if self.json:
            self._emit(
                "processor",
                action=action,
                stream_processor=json_format.MessageToDict(
                    processor, preserving_proto_field_name=True
                ),
                **({"changed": changed} if changed else {}),
            )
            return
        state = _state_label(SP.State, processor.state)
        if action in ("created", "reused"):
            sources = ", ".join(
                f"{s.source_id} {s.pull.url if s.HasField('pull') else '(push)'}"
                for s in processor.sources
            )
            context = processor.context
            self._line(
                f"{action} {processor.name}: {sources}; watch-list {processor.collection}; "
                f"purpose {output.purpose_label(context.purpose)}, case {context.case_id}"
                + (f"; changed {', '.join(changed)}" if changed else "")
            )
        elif action == "attached":
            self._line(
                f"{processor.name} is already {state}: following its events (it is left "
                "running on exit)"
            )
        elif action == "started":
            self._line(f"started {processor.name} ({state}); Ctrl-C stops it")
        else:
            self._line(f"{action} {processor.name} ({state}); its events are kept")

    def processor_state(self, processor: SP) -> None:
        if self.json:
            self._emit(
                "processor_state",
                time=datetime.now().astimezone().isoformat(),
                stream_processor=processor.name,
                state=SP.State.Name(processor.state),
                state_message=processor.state_message,
            )
            return
        # Its state message repeats its sources' (each printed on its own line).
        self._line(f"-- {_now()} {processor.name} {_state_label(SP.State, processor.state)}")

    def source_state(self, name: str, source: VS) -> None:
        if self.json:
            self._emit(
                "source_state",
                time=datetime.now().astimezone().isoformat(),
                stream_processor=name,
                source_id=source.source_id,
                state=VS.State.Name(source.state),
                status_message=source.status_message,
                owner=source.owner,
            )
            return
        message = f": {source.status_message}" if source.status_message else ""
        owner = f" (read by {source.owner})" if source.owner else ""
        self._line(
            f"-- {_now()} source {source.source_id} "
            f"{_state_label(VS.State, source.state)}{message}{owner}"
        )

    def event(self, event: I.MatchEvent) -> None:
        chip = self._save_chip(event) if self.chips is not None else None
        if self.json:
            extra = {"chip": str(chip)} if chip is not None else {}
            self._emit(
                "event",
                match_event=json_format.MessageToDict(event, preserving_proto_field_name=True),
                **extra,
            )
            return
        top = event.matches[0] if event.matches else None
        candidate = (top.face.subject_id or top.face.name) if top is not None else ""
        self._line(
            _cells(
                [
                    _local_time(event.capture_time),
                    event.source_id,
                    candidate,
                    f"{top.similarity:.1f}" if top is not None else "",
                    f"{event.threshold.applied:.1f}",
                    output.rate(top.false_match_rate) if top is not None else "",
                    f"{event.threshold.expected_false_candidates:.2g}",
                    event.track_id,
                    event.audit_record,
                ]
            )
        )
        if len(event.matches) > 1:
            others = ", ".join(
                f"{m.face.subject_id or m.face.name} {m.similarity:.1f}" for m in event.matches[1:]
            )
            self._line(f"    other candidates: {others}")
        if chip is not None:
            self._line(f"    chip: {chip}")

    def _save_chip(self, event: I.MatchEvent) -> Path | None:
        assert self.chips is not None
        try:
            chip = self.client.get_event(event.name, include_chip=True).face.chip
        except grpc.RpcError as error:
            self.notice(f"chip of {event.name} not saved: {describe_rpc_error(error)[0]}")
            return None
        if not chip.width or len(chip.rgb) != chip.width * chip.height * 3:
            self.notice(f"chip of {event.name} not saved: the event has no chip")
            return None
        path = self.chips / f"{event.event_id}.png"
        Image.frombytes("RGB", (chip.width, chip.height), chip.rgb).save(path, format="PNG")
        return path

    def stored_count(self, name: str, count: int) -> None:
        if self.json:
            self._emit("summary", stream_processor=name, candidate_events=count)
            return
        self._line(f"{output.plural(count, 'candidate event')} of {name}")
        self._line(output.CANDIDATES_NOTICE)

    def summary(self, name: str, events: int, view: SP | None, left_running: str) -> None:
        """``left_running``: why the processor was not stopped; empty if it was."""
        sources = list(view.sources) if view is not None else []

        def total(field: str) -> int:
            return sum(int(getattr(s.counters, field)) for s in sources)

        counts = {
            "candidate_events": events,
            "frames_received": total("frames_received"),
            "frames_sampled": total("frames_sampled"),
            "frames_dropped": total("frames_dropped"),
            "tracks": total("tracks"),
        }
        if self.json:
            self._emit(
                "summary",
                stream_processor=name,
                **counts,
                processor="left running" if left_running else "stopped",
            )
            return
        self._line(f"Summary of {name}")
        table = Table()
        table.add_column("")
        table.add_column("count", justify="right")
        for label, count in counts.items():
            table.add_row(label.replace("_", " "), str(count))
        self.out.print(table)
        self._line(
            f"the processor was left running ({left_running})"
            if left_running
            else "the processor was stopped; its events and their audit records are kept"
        )
        self._line(output.CANDIDATES_NOTICE)


# -- processors --------------------------------------------------------------------------


def _all_processors(client: IngestClient) -> Iterator[SP]:
    token = ""
    while True:
        reply = client.list_processors(token)
        yield from reply.stream_processors
        token = reply.next_page_token
        if not token:
            return


def _processors_list(args: argparse.Namespace, client: IngestClient) -> int:
    out = output.console()
    table = Table(title="Stream processors", title_justify="left")
    for column in ("id", "display name", "state", "collection", "sources", "purpose", "case"):
        table.add_column(
            column, overflow="fold", justify="right" if column == "sources" else "left"
        )
    table.add_column("created")
    count = 0
    for processor in _all_processors(client):
        count += 1
        table.add_row(
            processor.name.removeprefix(NAME_PREFIX),
            processor.display_name,
            _state_label(SP.State, processor.state),
            processor.collection.removeprefix("collections/"),
            str(len(processor.sources)),
            output.purpose_label(processor.context.purpose),
            processor.context.case_id,
            output.timestamp(processor.create_time),
        )
    out.print(table)
    out.print(output.plural(count, "stream processor"))
    return 0


def _processors_get(args: argparse.Namespace, client: IngestClient) -> int:
    processor = client.get(args.name)
    out = output.console()
    details = Table(show_header=False, title=processor.name, title_justify="left")
    details.add_column("field", style="bold")
    details.add_column("value", overflow="fold")
    context = processor.context
    rows = [
        ("display name", processor.display_name),
        ("state", _state_label(SP.State, processor.state)),
        ("state message", processor.state_message),
        ("collection", processor.collection),
        ("purpose", output.purpose_label(context.purpose)),
        ("case", context.case_id),
        ("justification", context.justification),
        (
            "threshold",
            f"{processor.match_threshold:g}"
            if processor.HasField("match_threshold")
            else "the administrator's minimum",
        ),
        ("frames per second", f"{processor.frames_per_second or 2:g}"),
        ("smallest face", f"{processor.min_face_size or 80} px"),
        ("most matches per event", str(processor.max_matches or 5)),
        ("created", output.timestamp(processor.create_time)),
        ("updated", output.timestamp(processor.update_time)),
    ]
    for key, value in rows:
        details.add_row(key, value)
    out.print(details)
    sources = Table(title="Sources", title_justify="left")
    columns = (
        "source",
        "url",
        "state",
        "status",
        "owner",
        "last frame",
        "received",
        "sampled",
        "dropped",
        "rejected",
        "reconnects",
        "tracks",
        "events",
    )
    for column in columns:
        sources.add_column(
            column, overflow="fold", justify="right" if columns.index(column) >= 6 else "left"
        )
    for source in processor.sources:
        counters = source.counters
        sources.add_row(
            source.source_id,
            source.pull.url if source.HasField("pull") else "(push)",
            _state_label(VS.State, source.state),
            source.status_message,
            source.owner,
            output.timestamp(source.last_frame_time),
            str(counters.frames_received),
            str(counters.frames_sampled),
            str(counters.frames_dropped),
            str(counters.frames_rejected),
            str(counters.reconnects),
            str(counters.tracks),
            str(counters.events),
        )
    out.print(sources)
    return 0


def _processors_start(args: argparse.Namespace, client: IngestClient) -> int:
    processor = client.start(args.name)
    output.console().print(f"started {processor.name} ({_state_label(SP.State, processor.state)})")
    return 0


def _processors_stop(args: argparse.Namespace, client: IngestClient) -> int:
    processor = client.stop(args.name)
    output.console().print(
        f"stopped {processor.name} ({_state_label(SP.State, processor.state)}); its events are kept"
    )
    return 0


def _processors_delete(args: argparse.Namespace, client: IngestClient) -> int:
    client.delete(args.name)
    output.console().print(
        f"deleted {args.name} with its match events and chips (their audit records remain)"
    )
    return 0
