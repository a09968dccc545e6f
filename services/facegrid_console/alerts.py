"""Watch-list alerts: a stream processor's match events, live.

The page lists the events stored in the last hour (ListMatchEvents), newest first, and
opens a Server-Sent Events stream (``/alerts/stream``) that relays StreamMatchEvents
from just after the newest one listed: its ``cursor``. Each SSE message's id is the
event's cursor, so a browser that loses the connection reconnects with
``Last-Event-ID`` and gets exactly the events it missed; a reloaded page lists what is
stored and continues after it. Without JavaScript the page is still the list, current
when loaded. Every event links to its review page, where decisions on its candidates
are recorded as for a search.
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

from facegrid.tasks import cancel_and_wait
from facegrid.v1 import common_pb2, ingest_pb2
from google.protobuf import timestamp_pb2
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from facegrid_console import views
from facegrid_console.backend import CallError
from facegrid_console.web import Console, Signed, signed_in

Start = ingest_pb2.StreamMatchEventsRequest.StartPosition
LISTED_SINCE_S = 3600.0
# Ingest sends a heartbeat after 30 s without an event: a stream silent for longer is
# taken for dead, and the browser reconnects.
STREAM_SILENCE_S = 75.0
_LIST_PAGES = 5
_SHOWN = 100


def processor_id(value: str) -> str:
    value = value.strip().removeprefix("streamProcessors/")
    if value != "-" and (not value or "/" in value):
        raise HTTPException(400, "Give a stream processor id, or - for all.")
    return value


def event_view(event: ingest_pb2.MatchEvent) -> dict[str, Any]:
    best = event.matches[0] if event.matches else None
    return {
        "name": event.name,
        "dom_id": "event-" + event.event_id,
        "processor": event.stream_processor.removeprefix("streamProcessors/"),
        "source": event.source_id,
        "captured": views.when(event.capture_time),
        "chip": views.chip_data_url(event.face.chip),
        # Listed events come without their chip: the page asks for it (lazily).
        "chip_url": "/alerts/chip?" + urllib.parse.urlencode({"event": event.name}),
        "best": best.face.name if best else "",
        "subject": best.face.subject_id if best else "",
        "similarity": best.similarity if best else 0.0,
        "false_match_rate": best.false_match_rate if best else 0.0,
        "candidates": len(event.matches),
        "record": views.record_id(event.audit_record),
        "case_id": event.context.case_id,
    }


def routes(console: Console) -> list[BaseRoute]:
    async def alerts_page(request: Request, signed: Signed) -> Response:
        given = request.query_params.get("processor", "")
        if not given:
            return console.render(
                request,
                "alerts.html",
                {"processors": await _processors(console, signed), "processor": ""},
                signed=signed,
            )
        processor = processor_id(given)
        since = time.time() - LISTED_SINCE_S
        started = timestamp_pb2.Timestamp()
        started.GetCurrentTime()
        events = await _stored_events(console, signed, processor, since)
        stream_query = urllib.parse.urlencode(
            {"processor": processor, "after": events[-1].cursor}
            if events
            else {"processor": processor, "since": started.ToJsonString()}
        )
        shown = [event_view(e) for e in reversed(events[-_SHOWN:])]
        return console.render(
            request,
            "alerts.html",
            {
                "processor": processor,
                "events": shown,
                "stream_url": "/alerts/stream?" + stream_query,
                "since": views.when(timestamp_pb2.Timestamp(seconds=int(since))),
            },
            signed=signed,
        )

    async def alert_stream(request: Request, signed: Signed) -> Response:
        processor = processor_id(request.query_params.get("processor", ""))
        message = ingest_pb2.StreamMatchEventsRequest(
            stream_processor=f"streamProcessors/{processor}", include_chips=True
        )
        after = request.headers.get("last-event-id") or request.query_params.get("after", "")
        since = request.query_params.get("since", "")
        if after:
            message.start_position = Start.START_POSITION_AFTER_CURSOR
            message.after_cursor = after
        elif since:
            message.start_position = Start.START_POSITION_START_TIME
            try:
                message.start_time.FromJsonString(since)
            except ValueError as error:
                raise HTTPException(400, "since: an RFC 3339 time") from error
        else:
            message.start_position = Start.START_POSITION_LATEST
        if console.event_streams.locked():
            raise HTTPException(503, "Too many live alert views are open; try again shortly.")
        return StreamingResponse(
            _relay(console, signed, message),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )

    async def event_chip(request: Request, signed: Signed) -> Response:
        name = request.query_params.get("event", "")
        if not name.startswith("streamProcessors/") or name.count("/") != 3:
            raise HTTPException(400, "Give a match event, streamProcessors/{p}/matchEvents/{e}.")
        png = await match_event_chip(console, signed, name)
        if not png:
            raise HTTPException(404, "This event has no image.")
        return Response(png, media_type="image/png", headers={"cache-control": "private, no-store"})

    return [
        Route("/alerts", signed_in(console, alerts_page), methods=["GET"]),
        Route("/alerts/chip", signed_in(console, event_chip), methods=["GET"]),
        Route("/alerts/stream", signed_in(console, alert_stream), methods=["GET"]),
    ]


async def match_event_chip(console: Console, signed: Signed, name: str) -> bytes:
    """A match event's best shot as PNG (b"" if it has none); CallError if refused."""
    reply = await console.backend.call(
        console.backend.ingest,
        "GetMatchEvent",
        ingest_pb2.GetMatchEventRequest(name=name, include_chip=True),
        signed.token,
    )
    return views.chip_png(reply.match_event.face.chip)


async def _relay(
    console: Console, signed: Signed, message: ingest_pb2.StreamMatchEventsRequest
) -> AsyncIterator[str]:
    """SSE messages: ``match`` (an event's card, id = its cursor), ``problem`` (ingest
    refused the stream: the page says why and stops), comments as heartbeats.

    The response ends, without a ``problem``, when the console starts to stop (so that
    no open view holds the shutdown up), when ingest ends the stream, or when nothing,
    not even ingest's 30-second heartbeat, came for ``STREAM_SILENCE_S``: the browser
    then reconnects by itself with the last cursor, to this replica or another.
    """
    template = console.templates.env.get_template("event_card.html")
    async with console.event_streams:
        yield "retry: 2000\n: facegrid match events\n\n"
        stream = console.backend.match_events(message, signed.token)
        stopping = asyncio.ensure_future(console.stopping.wait())
        try:
            while True:
                following = asyncio.ensure_future(anext(stream))
                await asyncio.wait(
                    {following, stopping},
                    timeout=STREAM_SILENCE_S,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if not following.done():  # stopping, or a silent stream
                    await cancel_and_wait([following], what="match event read")
                    return
                try:
                    reply = following.result()
                except StopAsyncIteration:
                    return
                if not reply.HasField("event"):
                    yield ": heartbeat\n\n"
                    continue
                card = template.render(event=event_view(reply.event))
                yield _sse("match", card, reply.event.cursor)
        except CallError as failure:
            yield _sse("problem", " ".join(failure.lines))
        finally:
            stopping.cancel()
            await stream.aclose()


def _sse(kind: str, data: str, event_id: str = "") -> str:
    lines = [f"event: {kind}"]
    if event_id:
        lines.append(f"id: {event_id}")
    lines.extend(f"data: {line}" for line in data.splitlines() or [""])
    return "\n".join(lines) + "\n\n"


async def _stored_events(
    console: Console, signed: Signed, processor: str, since: float
) -> list[ingest_pb2.MatchEvent]:
    """The processor's events stored since ``since``, oldest first (a few pages)."""
    start = timestamp_pb2.Timestamp(seconds=int(since))
    request = ingest_pb2.ListMatchEventsRequest(
        parent=f"streamProcessors/{processor}",
        page_size=100,
        create_time_range=common_pb2.TimeRange(start_time=start),
    )
    events: list[ingest_pb2.MatchEvent] = []
    for _ in range(_LIST_PAGES):
        reply = await console.backend.call(
            console.backend.ingest, "ListMatchEvents", request, signed.token
        )
        events.extend(reply.match_events)
        if not reply.next_page_token:
            break
        request.page_token = reply.next_page_token
    return events


async def _processors(console: Console, signed: Signed) -> list[dict[str, str]]:
    """The processors to choose from, if the person may list them (ingest.admin)."""
    try:
        reply = await console.backend.call(
            console.backend.ingest,
            "ListStreamProcessors",
            ingest_pb2.ListStreamProcessorsRequest(page_size=100),
            signed.token,
        )
    except CallError:
        return []
    return [
        {
            "id": p.name.removeprefix("streamProcessors/"),
            "label": p.display_name or p.name,
            "state": ingest_pb2.StreamProcessor.State.Name(p.state).removeprefix("STATE_").lower(),
        }
        for p in reply.stream_processors
    ]
