"""The ingest service: IngestService, watch-lists over many video sources.

Processors live in NATS KV and events in JetStream, so every replica answers every call
and a subscriber may connect to any of them; which replica reads which source is
decided by leases (facegrid_ingest.replica). Authentication, scopes and the audit log
are the gateway's (facegrid.accountability), appended to the same chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc
import nats
from facegrid import paging, tls, validation
from facegrid.accountability import AuditDraft, Gatekeeper, guarded
from facegrid.audit_log import open_audit_log
from facegrid.authenticator import Authenticator
from facegrid.config import Settings
from facegrid.errors import (
    ServiceError,
    already_exists,
    failed_precondition,
    invalid_argument,
    not_found,
    out_of_range,
    resource_exhausted,
    unavailable,
)
from facegrid.field_masks import update_paths
from facegrid.identification.deadline import Deadline
from facegrid.identification.downstream import Downstream
from facegrid.identification.faces import FacePipeline
from facegrid.identification.flow import Identifier
from facegrid.identification.policy import QualityPolicy, ThresholdPolicy
from facegrid.imaging import decode_image
from facegrid.metrics import INGEST_CONSUMER_LAG, INGEST_FRAMES
from facegrid.retention import EXPIRE_MATCH_EVENTS, Removal, RetentionSchedule
from facegrid.server import (
    FacegridServer,
    ServiceRegistration,
    run_until_stopped,
)
from facegrid.v1 import ingest_pb2, ingest_pb2_grpc

from facegrid_ingest import checks, urls
from facegrid_ingest.erasure import PRINCIPAL as ERASURE_PRINCIPAL
from facegrid_ingest.erasure import TASK as ERASURE_TASK
from facegrid_ingest.erasure import EventErasure
from facegrid_ingest.event_log import EventLog, Start, StoredEvent, decode_cursor
from facegrid_ingest.leases import LeaseManager
from facegrid_ingest.pipeline import FramePipeline, SampledFrame
from facegrid_ingest.processors import ProcessorStore, StoredProcessor
from facegrid_ingest.replica import Replica, SourceWorker, default_replica_id, source_key

log = logging.getLogger(__name__)

I = ingest_pb2  # noqa: E741
SP = I.StreamProcessor
VS = I.VideoSource
Context: TypeAlias = grpc.aio.ServicerContext
SERVICE_NAME = "facegrid.v1.IngestService"
EVENT_RETENTION_TASK = "event-retention"
# The event stream's own age limit is this much past the audited retention sweep's.
EVENT_RETENTION_BACKSTOP_S = 24 * 3600.0
HEARTBEAT_S = 30.0
RESOURCE = "facegrid.v1.StreamProcessor"


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):  # type: ignore[misc]
    def __init__(
        self,
        settings: Settings,
        gatekeeper: Gatekeeper,
        identifier: Identifier,
        store: ProcessorStore,
        events: EventLog,
        replica: Replica,
    ) -> None:
        self._settings = settings
        self._ingest = settings.ingest
        self.gatekeeper = gatekeeper
        self._identifier = identifier
        self._store = store
        self._events = events
        self._replica = replica
        self._push_streams: dict[str, tuple[SourceWorker, asyncio.Event]] = {}

    # ---------------------------------------------------------------- views

    async def _view(self, stored: StoredProcessor) -> SP:
        """The processor as callers see it: credentials masked, live state and status."""
        view = SP()
        view.CopyFrom(stored.processor)
        statuses: list[VS | None] = []
        for source in view.sources:
            if source.HasField("pull"):
                source.pull.url = urls.masked(source.pull.url)
            status = (
                await self._store.status(source_key(stored.processor_id, source.source_id))
                if stored.wants_running
                else None
            )
            statuses.append(status)
            if status is None:
                source.state = VS.STATE_WAITING
                continue
            for name in ("state", "status_message", "owner", "lease_revision"):
                setattr(source, name, getattr(status, name))
            source.counters.CopyFrom(status.counters)
            if status.HasField("last_frame_time"):
                source.last_frame_time.CopyFrom(status.last_frame_time)
        if not stored.wants_running:
            view.state = SP.STATE_STOPPED
            return view
        states = [s.state for s in view.sources]
        if all(s == VS.STATE_FAILED for s in states):
            view.state = SP.STATE_FAILED
            view.state_message = "; ".join(
                f"{s.source_id}: {s.status_message}" for s in view.sources
            )
        elif any(s in (VS.STATE_STREAMING, VS.STATE_ENDED, VS.STATE_RECONNECTING) for s in states):
            view.state = SP.STATE_RUNNING
        else:
            view.state = SP.STATE_STARTING
        return view

    async def _stored(self, name: str, field: str = "name") -> StoredProcessor:
        processor_id = checks.processor_id_of(name, field)
        stored = await self._store.get(processor_id)
        if stored is None:
            raise not_found(RESOURCE, name)
        return stored

    def _check(self, processor: SP) -> None:
        checks.check_processor(processor, self._ingest.allowed_hosts, self._ingest.allowed_dirs)

    async def _check_collection(self, processor: SP, context: Context) -> None:
        """The watch-list collection exists and may be searched for the purpose given
        (no PURPOSE_TESTING on a production collection)."""
        collection = await self._identifier.collection(
            processor.collection, Deadline.of(context), "stream_processor.collection"
        )
        self._identifier.decide(
            collection, processor.context.purpose, None, "stream_processor.match_threshold"
        )

    # ---------------------------------------------------------------- processors

    @guarded
    async def CreateStreamProcessor(  # noqa: N802
        self, request: I.CreateStreamProcessorRequest, context: Context, audit: AuditDraft
    ) -> I.CreateStreamProcessorResponse:
        processor_id = checks.check_processor_id(request.stream_processor_id)
        name = checks.NAME_PREFIX + processor_id
        audit.target(name)
        given = request.stream_processor
        audit.context(given.context)
        audit.collection(given.collection)
        self._check(given)
        await self._check_collection(given, context)
        if len(await self._store.list()) >= self._ingest.max_processors:
            raise resource_exhausted(
                "stream processors",
                f"at most {self._ingest.max_processors} stream processors",
                "TOO_MANY_PROCESSORS",
            )
        processor = SP()
        processor.CopyFrom(given)
        for source in processor.sources:
            for output in ("last_frame_time", "status_message", "state", "owner"):
                source.ClearField(output)
            source.ClearField("lease_revision")
            source.ClearField("counters")
        processor.name = name
        processor.state = SP.STATE_STOPPED
        processor.state_message = ""
        processor.create_time.GetCurrentTime()
        processor.update_time.CopyFrom(processor.create_time)
        principal = audit.record.principal
        stored = await self._store.create(processor, principal)
        if stored is None:
            raise already_exists(RESOURCE, name)
        return I.CreateStreamProcessorResponse(stream_processor=await self._view(stored))

    @guarded
    async def GetStreamProcessor(  # noqa: N802
        self, request: I.GetStreamProcessorRequest, context: Context, audit: AuditDraft
    ) -> I.GetStreamProcessorResponse:
        stored = await self._stored(request.name)
        return I.GetStreamProcessorResponse(stream_processor=await self._view(stored))

    @guarded
    async def ListStreamProcessors(  # noqa: N802
        self, request: I.ListStreamProcessorsRequest, context: Context, audit: AuditDraft
    ) -> I.ListStreamProcessorsResponse:
        size = paging.page_size(request.page_size)
        fingerprint = paging.request_fingerprint("processors")
        after = paging.decode_page_token(request.page_token, fingerprint)
        every = [p for p in await self._store.list() if p.processor_id > after]
        page = every[:size]
        token = ""
        if len(every) > size:
            token = paging.encode_page_token(page[-1].processor_id, fingerprint)
        return I.ListStreamProcessorsResponse(
            stream_processors=[await self._view(p) for p in page], next_page_token=token
        )

    @guarded
    async def UpdateStreamProcessor(  # noqa: N802
        self, request: I.UpdateStreamProcessorRequest, context: Context, audit: AuditDraft
    ) -> I.UpdateStreamProcessorResponse:
        given = request.stream_processor
        name = given.name
        audit.target(name)
        processor_id = checks.processor_id_of(name, "stream_processor.name")
        mask = request.update_mask
        if list(mask.paths) == ["*"]:
            paths = list(checks.UPDATABLE)
        else:
            paths = update_paths(mask, checks.UPDATABLE)
        current = await self._stored(name, "stream_processor.name")
        merged = self._merged(current.processor, given, paths)
        audit.context(merged.context)
        audit.collection(merged.collection)
        self._check(merged)
        if "collection" in paths or "context" in paths:
            await self._check_collection(merged, context)

        def edit(processor: SP) -> None:
            if processor.state == SP.STATE_RUNNING and any(p in checks.STOPPED_ONLY for p in paths):
                raise failed_precondition(
                    "STATE",
                    name,
                    "sources and collection change only while the processor is stopped",
                )
            fresh = self._merged(processor, given, paths)
            processor.CopyFrom(fresh)

        stored = await self._store.change(processor_id, edit)
        if stored is None:
            raise not_found(RESOURCE, name)
        return I.UpdateStreamProcessorResponse(stream_processor=await self._view(stored))

    @staticmethod
    def _merged(current: SP, given: SP, paths: list[str]) -> SP:
        """``current`` with the masked fields of ``given``; a masked pull URL that is
        the masked form of the stored one keeps the stored one (with its password)."""
        merged = SP()
        merged.CopyFrom(current)
        for path in paths:
            if path == "sources":
                stored_urls = {
                    s.source_id: s.pull.url for s in current.sources if s.HasField("pull")
                }
                del merged.sources[:]
                for source in given.sources:
                    copy = merged.sources.add()
                    copy.CopyFrom(source)
                    old = stored_urls.get(source.source_id)
                    if copy.HasField("pull") and old and copy.pull.url == urls.masked(old):
                        copy.pull.url = old
            elif given.DESCRIPTOR.fields_by_name[path].message_type is not None or (
                given.DESCRIPTOR.fields_by_name[path].has_presence
            ):
                if given.HasField(path):
                    field_value = getattr(given, path)
                    if hasattr(field_value, "CopyFrom"):
                        getattr(merged, path).CopyFrom(field_value)
                    else:
                        setattr(merged, path, field_value)
                else:
                    merged.ClearField(path)
            else:
                setattr(merged, path, getattr(given, path))
        return merged

    @guarded
    async def DeleteStreamProcessor(  # noqa: N802
        self, request: I.DeleteStreamProcessorRequest, context: Context, audit: AuditDraft
    ) -> I.DeleteStreamProcessorResponse:
        audit.target(request.name)
        stored = await self._stored(request.name)
        audit.context(stored.processor.context)
        audit.collection(stored.processor.collection)
        await self._store.delete(stored.processor_id)
        self._replica.wake()
        purged = await self._events.purge(stored.processor_id)
        for source in stored.processor.sources:
            await self._store.clear_status(source_key(stored.processor_id, source.source_id))
        audit.results((), count=purged)
        return I.DeleteStreamProcessorResponse()

    @guarded
    async def StartStreamProcessor(  # noqa: N802
        self, request: I.StartStreamProcessorRequest, context: Context, audit: AuditDraft
    ) -> I.StartStreamProcessorResponse:
        return I.StartStreamProcessorResponse(
            stream_processor=await self._set_running(request.name, True, audit)
        )

    @guarded
    async def StopStreamProcessor(  # noqa: N802
        self, request: I.StopStreamProcessorRequest, context: Context, audit: AuditDraft
    ) -> I.StopStreamProcessorResponse:
        return I.StopStreamProcessorResponse(
            stream_processor=await self._set_running(request.name, False, audit)
        )

    async def _set_running(self, name: str, running: bool, audit: AuditDraft) -> SP:
        audit.target(name)
        current = await self._stored(name)
        audit.context(current.processor.context)
        audit.collection(current.processor.collection)
        desired = SP.STATE_RUNNING if running else SP.STATE_STOPPED

        def edit(processor: SP) -> None:
            processor.state = desired

        stored = current
        if current.processor.state != desired:
            changed = await self._store.change(current.processor_id, edit)
            if changed is None:
                raise not_found(RESOURCE, name)
            stored = changed
        self._replica.wake()
        if not running:
            for source in stored.processor.sources:
                event = self._push_streams.get(source_key(stored.processor_id, source.source_id))
                if event is not None:
                    event[1].set()
        return await self._view(stored)

    # ---------------------------------------------------------------- frames

    async def PushFrames(  # noqa: N802
        self, request_iterator: AsyncIterator[I.PushFramesRequest], context: Context
    ) -> I.PushFramesResponse:
        audit = await self.gatekeeper.admit("PushFrames", context)
        counts = I.PushFramesResponse()
        try:
            response = await self._push(request_iterator, context, audit, counts)
        except ServiceError as error:
            await self.gatekeeper.write(audit, error.code)
            raise
        except asyncio.CancelledError:
            await self.gatekeeper.write(audit, grpc.StatusCode.CANCELLED)
            raise
        audit.results((), count=int(counts.frames_accepted))
        await self.gatekeeper.write(audit)
        return response

    async def _push(
        self,
        request_iterator: AsyncIterator[I.PushFramesRequest],
        context: Context,
        audit: AuditDraft,
        counts: I.PushFramesResponse,
    ) -> I.PushFramesResponse:
        iterator = aiter(request_iterator)
        try:
            first = await anext(iterator)
        except StopAsyncIteration:
            raise invalid_argument("stream_processor", "the stream sent no frame") from None
        name, source_id = first.stream_processor, first.source_id
        audit.target(f"{name}/sources/{source_id}")
        stored = await self._stored(name, "stream_processor")
        audit.context(stored.processor.context)
        audit.collection(stored.processor.collection)
        source = next((s for s in stored.processor.sources if s.source_id == source_id), None)
        if source is None:
            raise not_found("facegrid.v1.VideoSource", f"{name}/sources/{source_id}")
        if not source.HasField("push"):
            raise failed_precondition("SOURCE", source_id, f"{source_id} is not a push source")
        if not stored.wants_running:
            raise failed_precondition("STATE", name, f"{name} is not running")
        key = source_key(stored.processor_id, source_id)
        previous = self._push_streams.get(key)
        if previous is not None:
            previous[1].set()  # the older stream ends with ABORTED
        replaced = asyncio.Event()
        worker, owner = await self._replica.open_push(stored, source, replaced.set)
        if worker is None:
            raise unavailable(
                f"source {source_id} is changing hands between replicas ({owner}): retry",
                "SOURCE_HELD_ELSEWHERE",
                retry_after_ms=1000,
            )
        self._push_streams[key] = (worker, replaced)
        limits = self._settings.images
        sampler = _Sampler(worker.run.config.frames_per_second)
        last_sequence: int | None = None

        def reject() -> None:
            counts.frames_rejected += 1
            worker.run.counters.frames_rejected += 1
            INGEST_FRAMES.labels(stored.processor_id, source_id, "rejected").inc()

        def take(message: I.PushFramesRequest) -> None:
            nonlocal last_sequence
            INGEST_FRAMES.labels(stored.processor_id, source_id, "received").inc()
            counts.frames_received += 1
            worker.run.counters.frames_received += 1
            if message.stream_processor and message.stream_processor != name:
                raise invalid_argument("stream_processor", "differs from the first message's")
            if message.source_id and message.source_id != source_id:
                raise invalid_argument("source_id", "differs from the first message's")
            if last_sequence is not None and message.sequence_number <= last_sequence:
                reject()
                return
            last_sequence = message.sequence_number
            if len(message.frame) > self._ingest.max_frame_bytes or not message.frame:
                reject()
                return
            try:
                decode_image(message.frame, limits, "frame")
            except ServiceError:
                reject()
                return
            captured = time.time()
            if message.HasField("capture_time"):
                try:
                    captured = validation.timestamp(message.capture_time, "capture_time")
                except ServiceError:
                    reject()  # counted, like an undecodable frame; the stream goes on
                    return
            if not sampler.keep(captured):
                counts.frames_skipped += 1
                return
            dropped = worker.run.counters.frames_dropped
            self._replica.offer(
                worker, SampledFrame(message.sequence_number, captured, encoded=message.frame)
            )
            worker.last_frame_time = captured
            worker.status_dirty = True
            if worker.run.counters.frames_dropped > dropped:
                counts.frames_dropped += 1
            else:
                counts.frames_accepted += 1

        try:
            take(first)
            reading = asyncio.ensure_future(anext(iterator))
            ended = asyncio.ensure_future(replaced.wait())
            try:
                while True:
                    done, _ = await asyncio.wait(
                        {reading, ended}, return_when=asyncio.FIRST_COMPLETED
                    )
                    if ended in done or worker.run.closed:
                        await context.abort(
                            grpc.StatusCode.ABORTED,
                            "another PushFrames stream for this source (on this replica or "
                            "another) replaced this one, or the processor stopped",
                        )
                    try:
                        message = reading.result()
                    except StopAsyncIteration:
                        break
                    take(message)
                    reading = asyncio.ensure_future(anext(iterator))
            finally:
                # Whatever ended the loop (the stream's end, an abort, the call cancelled
                # by its deadline or a client gone) leaves a future pending: cancel it,
                # or retrieve what it ended with (else asyncio logs "Task exception was
                # never retrieved").
                for future in (reading, ended):
                    if not future.cancel() and not future.cancelled():
                        future.exception()
        finally:
            if self._push_streams.get(key, (None,))[0] is worker:
                del self._push_streams[key]
                await self._replica.close_push(worker)
        return counts

    # ---------------------------------------------------------------- events

    def _event_filter(self, name: str, field: str) -> str | None:
        if name == "streamProcessors/-":
            return None
        return checks.processor_id_of(name, field)

    async def StreamMatchEvents(  # noqa: N802
        self, request: I.StreamMatchEventsRequest, context: Context
    ) -> AsyncIterator[I.StreamMatchEventsResponse]:
        audit = await self.gatekeeper.admit("StreamMatchEvents", context)
        try:
            processor_id = self._event_filter(request.stream_processor, "stream_processor")
            audit.target(request.stream_processor)
            if processor_id is not None:
                stored = await self._stored(request.stream_processor, "stream_processor")
                audit.context(stored.processor.context)
                audit.collection(stored.processor.collection)
            if len(request.source_ids) > checks.MAX_SOURCES:
                raise invalid_argument("source_ids", f"at most {checks.MAX_SOURCES}")
            start = self._start(request)
            if start.sequence:
                await self._check_retained(start.sequence)
        except ServiceError as error:
            await self.gatekeeper.write(audit, error.code)
            raise
        await self.gatekeeper.write(audit)
        subscription = await self._events.subscribe(
            processor_id=processor_id, source_ids=list(request.source_ids), start=start
        )
        lag = _Lag(self._events)
        try:
            while True:
                stored_event = await subscription.next(HEARTBEAT_S)
                await lag.update(stored_event)
                if processor_id is not None and await self._store.get(processor_id) is None:
                    await context.abort(
                        grpc.StatusCode.NOT_FOUND, f"{request.stream_processor} was deleted"
                    )
                if stored_event is None:
                    yield I.StreamMatchEventsResponse()
                    continue
                event = Replica.match_event(
                    stored_event.payload, stored_event.cursor, request.include_chips
                )
                yield I.StreamMatchEventsResponse(event=event)
        finally:
            lag.close()
            with contextlib.suppress(Exception):
                await subscription.aclose()

    async def _check_retained(self, after: int) -> None:
        """OUT_OF_RANGE when events right after the cursor have expired: resuming would
        silently skip them."""
        info = await self._events.js.stream_info(self._events.stream)
        if info.state.messages and after + 1 < info.state.first_seq:
            raise out_of_range(
                "after_cursor",
                "the events after this cursor are no longer retained; resume from "
                "START_POSITION_EARLIEST or a start time",
            )

    @staticmethod
    def _start(request: I.StreamMatchEventsRequest) -> Start:
        R = I.StreamMatchEventsRequest  # noqa: N806
        position = request.start_position
        if position != R.START_POSITION_AFTER_CURSOR and request.after_cursor:
            raise invalid_argument("after_cursor", "only with START_POSITION_AFTER_CURSOR")
        if position != R.START_POSITION_START_TIME and request.HasField("start_time"):
            raise invalid_argument("start_time", "only with START_POSITION_START_TIME")
        if position in (R.START_POSITION_UNSPECIFIED, R.START_POSITION_LATEST):
            return Start.LATEST
        if position == R.START_POSITION_EARLIEST:
            return Start.EARLIEST
        if position == R.START_POSITION_AFTER_CURSOR:
            try:
                return Start.after(decode_cursor(request.after_cursor))
            except ValueError:
                raise invalid_argument("after_cursor", "not a cursor of this service") from None
        if position == R.START_POSITION_START_TIME:
            if not request.HasField("start_time"):
                raise invalid_argument("start_time", "required with START_POSITION_START_TIME")
            return Start.since(validation.timestamp(request.start_time, "start_time"))
        raise invalid_argument("start_position", f"unknown start position {position}")

    @guarded
    async def GetMatchEvent(  # noqa: N802
        self, request: I.GetMatchEventRequest, context: Context, audit: AuditDraft
    ) -> I.GetMatchEventResponse:
        audit.target(request.name)
        parts = request.name.split("/")
        if len(parts) != 4 or parts[0] != "streamProcessors" or parts[2] != "matchEvents":
            raise invalid_argument(
                "name", "must be streamProcessors/{stream_processor}/matchEvents/{match_event}"
            )
        processor_id = checks.processor_id_of("/".join(parts[:2]))
        found = await self._events.get(processor_id, parts[3])
        if found is None:
            raise not_found("facegrid.v1.MatchEvent", request.name)
        event = Replica.match_event(found.payload, found.cursor, request.include_chip)
        audit.context(event.context)
        audit.results([event.name])
        return I.GetMatchEventResponse(match_event=event)

    @guarded
    async def ListMatchEvents(  # noqa: N802
        self, request: I.ListMatchEventsRequest, context: Context, audit: AuditDraft
    ) -> I.ListMatchEventsResponse:
        audit.target(request.parent)
        processor_id = self._event_filter(request.parent, "parent")
        size = paging.page_size(request.page_size)
        time_range = request.create_time_range
        fingerprint = paging.request_fingerprint(
            "events",
            request.parent,
            request.source_id,
            request.subject_id,
            time_range.SerializeToString(deterministic=True).hex(),
        )
        after = int(paging.decode_page_token(request.page_token, fingerprint) or 0)
        if request.source_id and not checks.SOURCE_ID.fullmatch(request.source_id):
            raise invalid_argument("source_id", "1 to 128 characters of [a-zA-Z0-9_.-:]")
        start, end = validation.time_range(time_range, "create_time_range")
        found, next_after = await self._events.page(
            processor_id=processor_id,
            source_ids=[request.source_id] if request.source_id else [],
            after_sequence=after,
            start_time=start,
            end_time=end,
            limit=size,
            header_equals={"Facegrid-Subject": request.subject_id} if request.subject_id else {},
        )
        events = [Replica.match_event(e.payload, e.cursor, False) for e in found]
        token = paging.encode_page_token(str(next_after), fingerprint) if next_after else ""
        audit.results([e.name for e in events])
        return I.ListMatchEventsResponse(match_events=events, next_page_token=token)


class _Lag:
    """This subscription's share of ``facegrid_ingest_consumer_lag``: events stored after
    the last one it was sent (of any processor: an upper bound), checked every 2 s."""

    def __init__(self, events: EventLog) -> None:
        self._events = events
        self._value = 0
        self._checked = 0.0

    async def update(self, sent: StoredEvent | None) -> None:
        now = time.monotonic()
        if now - self._checked < 2.0:
            return
        self._checked = now
        info = await self._events.js.stream_info(self._events.stream)
        last = int(info.state.last_seq)
        value = 0 if sent is None else max(0, last - sent.sequence)
        INGEST_CONSUMER_LAG.inc(value - self._value)
        self._value = value

    def close(self) -> None:
        INGEST_CONSUMER_LAG.dec(self._value)
        self._value = 0


class _Sampler:
    """Keeps a frame when at least 1/fps has passed since the last kept one."""

    def __init__(self, fps: float) -> None:
        self._interval = 1.0 / fps
        self._last: float | None = None

    def keep(self, capture_time: float) -> bool:
        if self._last is not None and capture_time - self._last < self._interval * 0.999:
            return False
        self._last = capture_time
        return True


class EventExpiry:
    """``sweep(now)``: erase the match events older than the retention; how many."""

    def __init__(self, events: EventLog, max_age_s: float) -> None:
        self._events = events
        self._max_age_s = max_age_s

    async def sweep(self, now: float) -> list[Removal]:
        cutoff = now - self._max_age_s
        erased = await self._events.expire(cutoff)
        return [
            Removal(EXPIRE_MATCH_EVENTS, "", f"streamProcessors/{processor}", count, cutoff)
            for processor, count in sorted(erased.items())
        ]


def build_server(
    settings: Settings, servicer: IngestServicer, port: int | None = None
) -> FacegridServer:
    """The ingest service's gRPC server around a servicer built with its dependencies (in
    the event loop it will run in); on ``ingest.port`` unless ``port`` is given."""
    registration = ServiceRegistration.of(
        ingest_pb2, "IngestService", ingest_pb2_grpc.add_IngestServiceServicer_to_server, servicer
    )
    return FacegridServer.for_service("ingest", registration, settings, port)


async def serve(settings: Settings) -> None:
    ingest = settings.ingest
    gateway = settings.gateway
    callers = Authenticator.configured(gateway.credentials_file, settings.oidc)
    callers.reload_on_sighup()
    ThresholdPolicy(gateway)  # refuses a misconfigured policy before serving
    audit_log = open_audit_log(gateway)
    downstream = Downstream.configured(ingest, settings)
    identifier = Identifier(
        downstream, FacePipeline(downstream, QualityPolicy(gateway)), ThresholdPolicy(gateway)
    )
    nats_tls = tls.client_ssl_context(settings.tls)
    if nats_tls is None and not ingest.nats_url.startswith("tls://"):
        tls.check_plaintext_client_allowed("ingest", ingest.nats_url)
    try:
        nc = await nats.connect(
            ingest.nats_url, tls=nats_tls, connect_timeout=5, max_reconnect_attempts=-1
        )
    except Exception as error:
        raise RuntimeError(f"cannot reach NATS at {ingest.nats_url}: {error}") from error
    js = nc.jetstream()
    events = await EventLog.open(
        nc,
        # The sweep below erases (and audits) at event_max_age_s; this is its backstop.
        max_age_s=ingest.event_max_age_s + EVENT_RETENTION_BACKSTOP_S,
        max_bytes=ingest.event_max_bytes,
        replicas=ingest.event_replicas,
    )
    store = await ProcessorStore.open(js, status_ttl_s=3 * ingest.lease_s)
    replica_id = ingest.replica_id or default_replica_id()
    leases = LeaseManager(js, replica_id, lease_s=ingest.lease_s)
    push_leases = LeaseManager(js, replica_id, lease_s=ingest.lease_s)
    await leases.start()
    await push_leases.start()

    def pipeline(emit: Any) -> FramePipeline:
        return FramePipeline(
            identifier,
            emit,
            max_batch_frames=ingest.max_batch_frames,
            max_batch_wait_s=ingest.max_batch_wait_s,
            timeout_s=ingest.downstream_timeout_s,
            full_frame_interval_s=ingest.full_frame_interval_s,
        )

    replica = Replica(ingest, store, leases, push_leases, events, audit_log, pipeline)
    gatekeeper = Gatekeeper(callers, audit_log, SERVICE_NAME)
    servicer = IngestServicer(settings, gatekeeper, identifier, store, events, replica)
    server = build_server(settings, servicer)
    expiry = RetentionSchedule(
        EVENT_RETENTION_TASK,
        audit_log,
        EventExpiry(events, ingest.event_max_age_s).sweep,
        ingest.event_retention_interval_s,
    )
    erasure = RetentionSchedule(
        ERASURE_TASK,
        audit_log,
        EventErasure(events, audit_log).sweep,
        ingest.erasure_interval_s,
        principal=ERASURE_PRINCIPAL,
    )
    await replica.start()
    expiry.start()
    erasure.start()
    log.info("ingest replica %s", replica_id)

    async def on_stop() -> None:
        await expiry.stop()
        await erasure.stop()
        # Hand every source over before exiting, so others take them at once.
        await replica.stop()
        await downstream.close()
        await nc.drain()
        audit_log.close()

    await run_until_stopped(server, on_stop)
