"""One ingest replica: which sources it reads, their readers, their status, their events.

A control loop (every third of the lease, and at once when a processor changes) lists
the processors that should run, asks the lease manager which of their pull sources this
replica should hold among the live replicas, starts a reader for each source it holds
and stops the readers of sources it lost or handed over. Push sources are held by the
replica that receives their PushFrames stream, for as long as the stream lasts.

Every match event gets its audit record, then is stored in JetStream under an id derived
from (processor, source, lease, track, subject); it is published only while this
replica still holds the source's lease, and a retry publishes the same id, which
JetStream stores once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from facegrid import metrics
from facegrid.accountability import AuditDraft
from facegrid.audit_log import AuditLog
from facegrid.config import IngestSettings
from facegrid.tasks import cancel_and_wait
from facegrid.v1 import face_service_pb2, ingest_pb2
from google.protobuf import timestamp_pb2

from facegrid_ingest.event_log import EventLog, source_token
from facegrid_ingest.leases import LeaseManager, lease_key
from facegrid_ingest.pipeline import FramePipeline, SampledFrame, SourceConfig, SourceRun
from facegrid_ingest.processors import ProcessorStore, StoredProcessor
from facegrid_ingest.sources import PullReader, SourceState

log = logging.getLogger(__name__)
# How long stop() waits for the replica's loops to end.
_STOP_WAIT_S = 5.0

SP = ingest_pb2.StreamProcessor
VS = ingest_pb2.VideoSource
EVENT_METHOD = "/facegrid.v1.IngestService/MatchEvent"
DEFAULT_FPS = 2.0
DEFAULT_MAX_MATCHES = 5
DEFAULT_MAX_EVENT_DELAY_S = 2.0
DEFAULT_SUPPRESSION_S = 60.0
_PUBLISH_ATTEMPTS = 5
# How often a source's status is written while nothing changes.
_STATUS_INTERVAL_S = 2.0

_READER_STATES = {
    SourceState.CONNECTING: VS.STATE_CONNECTING,
    SourceState.STREAMING: VS.STATE_STREAMING,
    SourceState.RECONNECTING: VS.STATE_RECONNECTING,
    SourceState.ENDED: VS.STATE_ENDED,
    SourceState.FAILED: VS.STATE_FAILED,
}


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def source_key(processor_id: str, source_id: str) -> str:
    return lease_key(processor_id, source_token(source_id))


def source_config(stored: StoredProcessor, source: VS, lease_revision: int) -> SourceConfig:
    """A source's effective settings: its own overrides, else its processor's."""
    p = stored.processor
    threshold: float | None = None
    if source.HasField("match_threshold"):
        threshold = source.match_threshold
    elif p.HasField("match_threshold"):
        threshold = p.match_threshold
    delay = (
        p.max_event_delay.ToTimedelta().total_seconds()
        if p.HasField("max_event_delay")
        else DEFAULT_MAX_EVENT_DELAY_S
    )
    suppression = (
        p.suppression_window.ToTimedelta().total_seconds()
        if p.HasField("suppression_window")
        else DEFAULT_SUPPRESSION_S
    )
    min_face = source.min_face_size or p.min_face_size or None
    return SourceConfig(
        processor_id=stored.processor_id,
        source_id=source.source_id,
        lease_revision=lease_revision,
        collection=p.collection,
        context=p.context,
        principal=stored.principal,
        requested_threshold=threshold,
        frames_per_second=source.frames_per_second or p.frames_per_second or DEFAULT_FPS,
        min_face_size=min_face,
        max_matches=p.max_matches or DEFAULT_MAX_MATCHES,
        max_event_delay_s=delay,
        suppression_s=suppression,
        quality_filter=p.quality_filter,
    )


@dataclass
class SourceWorker:
    """A source this replica reads: its run state, its reader task, its status."""

    key: str
    run: SourceRun
    state: int = VS.STATE_CONNECTING
    message: str = ""
    last_frame_time: float | None = None
    task: asyncio.Task[None] | None = None
    reader: PullReader | None = None
    url: str = ""  # of a pull source
    lease_revision: int = 0  # the latest revision, renewed
    status_dirty: bool = True
    on_stop: list[Callable[[], None]] = field(default_factory=list)
    on_lost: Callable[[], None] | None = None  # a push source's lease was taken

    def status(self, owner: str) -> VS:
        status = VS(
            source_id=self.run.config.source_id,
            state=self.state,  # type: ignore[arg-type]
            status_message=self.message,
            owner=owner,
            lease_revision=self.run.config.lease_revision,
        )
        status.counters.CopyFrom(self.run.counters)
        if self.last_frame_time is not None:
            status.last_frame_time.FromNanoseconds(int(self.last_frame_time * 1e9))
        return status


class Replica:
    """Runs the sources this replica holds; emits their events."""

    def __init__(
        self,
        settings: IngestSettings,
        store: ProcessorStore,
        leases: LeaseManager,
        push_leases: LeaseManager,
        events: EventLog,
        audit_log: AuditLog,
        pipeline_factory: Callable[[Callable[..., object]], FramePipeline],
    ) -> None:
        self.settings = settings
        self.replica_id = leases.replica_id
        self._store = store
        self._leases = leases
        self._push_leases = push_leases
        self._events = events
        self._audit_log = audit_log
        self.pipeline = pipeline_factory(self.emit)
        self.workers: dict[str, SourceWorker] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.pipeline.start()
        self._tasks = [
            asyncio.create_task(self._control_loop(), name="ingest-control"),
            asyncio.create_task(self._watch_processors(), name="ingest-watch"),
            asyncio.create_task(self._status_loop(), name="ingest-status"),
        ]

    async def stop(self) -> None:
        """Hand every source over (release its lease) and stop."""
        self._stopping = True
        self._wake.set()
        # The loops also stop on their own at their next round, since _stopping is set.
        await cancel_and_wait(self._tasks, _STOP_WAIT_S, "replica loops")
        for key in list(self.workers):
            await self._stop_worker(key)
        with contextlib.suppress(Exception):
            await self._leases.release_all()
        await self.pipeline.stop()

    def wake(self) -> None:
        self._wake.set()

    async def _watch_processors(self) -> None:
        while not self._stopping:
            try:
                async for _ in self._store.changes():
                    self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("watching processors failed (%s); retrying", error)
                await asyncio.sleep(1.0)

    async def _control_loop(self) -> None:
        while not self._stopping:
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reconciling sources failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._leases.interval_s)

    async def reconcile(self) -> None:
        if self._stopping:
            return  # handing over: take nothing new
        processors = {p.processor_id: p for p in await self._store.list()}
        wanted: dict[str, tuple[StoredProcessor, VS]] = {}
        every: dict[str, tuple[StoredProcessor, VS]] = {}
        for stored in processors.values():
            if not stored.wants_running:
                continue
            for source in stored.processor.sources:
                key = source_key(stored.processor_id, source.source_id)
                every[key] = (stored, source)
                if source.HasField("pull"):
                    wanted[key] = (stored, source)
        assignment = await self._leases.reconcile(list(wanted))
        held = assignment.held
        for key in list(self.workers):
            worker = self.workers[key]
            if worker.reader is None:
                if key in every:  # a push source: its stream holds it
                    self._refresh(worker, *every[key])
                continue
            if key not in held:
                await self._stop_worker(key)
                continue
            worker.lease_revision = held[key]
            if key in wanted and not self._refresh(worker, *wanted[key]):
                # Another URL or frame rate: read it afresh under the same lease.
                await self._stop_worker(key)
                stored, source = wanted[key]
                self._start_pull(key, stored, source, held[key])
        for key, revision in held.items():
            if key in self.workers or key not in wanted:
                continue
            if len(self.workers) >= self.settings.max_sources_per_replica:
                log.warning("this replica reads its most sources; %s waits", key)
                await self._leases.release(key, revision)
                continue
            stored, source = wanted[key]
            self._start_pull(key, stored, source, revision)
        for key in assignment.lost:
            metrics.INGEST_LEASES_LOST.inc()
            log.warning("lease of %s lost", key)

    @staticmethod
    def _refresh(worker: SourceWorker, stored: StoredProcessor, source: VS) -> bool:
        """Apply a changed processor to a running source (threshold, faces, delays,
        context...); False if its reader must be reopened (URL or frame rate)."""
        current = worker.run.config
        fresh = source_config(stored, source, current.lease_revision)
        if fresh == current:
            return True
        if worker.reader is not None and (
            fresh.frames_per_second != current.frames_per_second or source.pull.url != worker.url
        ):
            return False
        worker.run.config = fresh
        return True

    # ------------------------------------------------------------------ pull sources

    def _start_pull(self, key: str, stored: StoredProcessor, source: VS, revision: int) -> None:
        if self._stopping:
            return
        config = source_config(stored, source, revision)
        run = SourceRun(config, holds_lease=lambda: self._holds(key, revision))
        worker = SourceWorker(key=key, run=run, lease_revision=revision)
        loop = asyncio.get_running_loop()

        def on_state(state: SourceState, message: str) -> None:
            def apply() -> None:
                worker.state = _READER_STATES[state]
                worker.message = message
                worker.status_dirty = True
                if state is SourceState.RECONNECTING:
                    run.counters.reconnects += 1
                    metrics.INGEST_RECONNECTS.labels(config.processor_id, config.source_id).inc()

            loop.call_soon_threadsafe(apply)

        worker.reader = PullReader(
            source.pull.url,
            sample_fps=config.frames_per_second,
            on_state=on_state,
            allowed_hosts=self.settings.allowed_hosts,
        )
        worker.url = source.pull.url
        worker.task = asyncio.create_task(self._read(worker), name=f"ingest-read-{key}")
        self.workers[key] = worker
        metrics.INGEST_LEASE_OWNER.labels(config.processor_id, config.source_id).set(1)
        log.info(
            "reading source",
            extra={"fields": {"processor": config.processor_id, "source": config.source_id}},
        )

    def _holds(self, key: str, acquired_revision: int) -> bool:
        """Whether this replica still holds the lease it acquired at that revision."""
        worker = self.workers.get(key)
        return (
            worker is not None
            and worker.run.config.lease_revision == acquired_revision
            and not worker.run.closed
            and (key in self._leases.held or key in self._push_leases.held)
        )

    async def _read(self, worker: SourceWorker) -> None:
        assert worker.reader is not None
        config = worker.run.config
        received = 0
        try:
            async for frame in worker.reader.frames():
                counted = worker.reader.frames_received
                metrics.INGEST_FRAMES.labels(config.processor_id, config.source_id, "received").inc(
                    counted - received
                )
                received = counted
                worker.run.counters.frames_received = counted
                worker.last_frame_time = frame.capture_time
                self.offer(
                    worker, SampledFrame(frame.index, frame.capture_time, pixels=frame.image)
                )
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.exception("reading %s failed", worker.key)
            worker.state = VS.STATE_FAILED
            worker.message = f"reading failed: {error}"
        worker.status_dirty = True

    def offer(self, worker: SourceWorker, frame: SampledFrame) -> None:
        config = worker.run.config
        dropped = worker.run.counters.frames_dropped
        self.pipeline.offer(worker.run, frame)
        metrics.INGEST_FRAMES.labels(config.processor_id, config.source_id, "sampled").inc()
        if worker.run.counters.frames_dropped > dropped:
            metrics.INGEST_FRAMES.labels(config.processor_id, config.source_id, "dropped").inc()

    async def _stop_worker(self, key: str) -> None:
        worker = self.workers.pop(key, None)
        if worker is None:
            return
        worker.run.closed = True
        if worker.reader is not None:
            worker.reader.stop()
        await cancel_and_wait([worker.task], _STOP_WAIT_S, f"tasks of source {key}")
        for callback in worker.on_stop:
            callback()
        config = worker.run.config
        metrics.INGEST_LEASE_OWNER.labels(config.processor_id, config.source_id).set(0)
        with contextlib.suppress(Exception):
            await self._store.clear_status(key)

    # ------------------------------------------------------------------ push sources

    async def open_push(
        self, stored: StoredProcessor, source: VS, on_lost: Callable[[], None]
    ) -> tuple[SourceWorker | None, str]:
        """Hold a push source for a PushFrames stream: its worker, or None and the owner
        that holds it elsewhere. The newest stream wins: one already open here is
        replaced (the caller aborts it), and a source held by another replica is taken
        over (that replica's stream ends when its next renewal fails). ``on_lost`` is
        called when this stream's lease is lost in turn."""
        key = source_key(stored.processor_id, source.source_id)
        existing = self.workers.get(key)
        if existing is not None:
            revision = existing.lease_revision
            await self._stop_worker(key)
            renewed = await self._push_leases.renew(key, revision)
            if renewed is None:
                renewed = await self._push_leases.take_over(key)
        else:
            renewed = await self._push_leases.acquire(key)
            if renewed is None:
                renewed = await self._push_leases.take_over(key)
        if renewed is None:
            holder = await self._push_leases.owner(key)
            return None, holder[0] if holder else ""
        config = source_config(stored, source, renewed)
        run = SourceRun(config, holds_lease=lambda: self._holds(key, renewed))
        worker = SourceWorker(key=key, run=run, lease_revision=renewed, state=VS.STATE_STREAMING)
        worker.on_lost = on_lost
        worker.task = asyncio.create_task(self._renew_push(worker), name=f"ingest-push-{key}")
        self.workers[key] = worker
        return worker, self.replica_id

    async def _renew_push(self, worker: SourceWorker) -> None:
        # Ends when its stream closes (run.closed) even if the cancellation was lost.
        while True:
            await asyncio.sleep(self._push_leases.interval_s)
            if worker.run.closed:
                return
            renewed = await self._push_leases.renew(worker.key, worker.lease_revision)
            if renewed is not None:
                worker.lease_revision = renewed  # what close_push releases
            if worker.run.closed:
                return
            if renewed is None:
                log.warning("lease of push source %s lost (its stream moved)", worker.key)
                worker.run.closed = True
                if worker.on_lost is not None:
                    worker.on_lost()
                return

    async def close_push(self, worker: SourceWorker) -> None:
        if self.workers.get(worker.key) is worker:
            await self._stop_worker(worker.key)
            await self._push_leases.release(worker.key, worker.lease_revision)

    # ------------------------------------------------------------------ status

    async def _status_loop(self) -> None:
        last_written: dict[str, float] = {}
        while not self._stopping:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for key, worker in list(self.workers.items()):
                if worker.status_dirty or now - last_written.get(key, 0.0) > _STATUS_INTERVAL_S:
                    worker.status_dirty = False
                    last_written[key] = now
                    try:
                        await self._store.put_status(key, worker.status(self.replica_id))
                    except Exception as error:
                        log.warning("status of %s not written: %s", key, error)

    # ------------------------------------------------------------------ events

    async def emit(self, run: SourceRun, event: ingest_pb2.MatchEvent) -> None:
        """Audit, then store the event (once, whatever retries and fail-overs)."""
        config = run.config
        received = timestamp_pb2.Timestamp()
        received.GetCurrentTime()
        draft = AuditDraft(
            face_service_pb2.AuditRecord(
                create_time=received,
                principal=config.principal,
                method=EVENT_METHOD,
                status_code=0,
            )
        )
        draft.context(config.context)
        draft.collection(config.collection)
        draft.target(event.name)
        draft.threshold(event.threshold)
        draft.model_version(event.model_version)
        draft.results(
            [m.face.name for m in event.matches],
            [m.similarity for m in event.matches],
            [m.false_match_rate for m in event.matches],
        )
        stored = await self._audit_log.append(draft.record)
        event.audit_record = stored.name
        top = event.matches[0].face
        headers = {
            "Facegrid-Subject": top.subject_id or "",
            "Facegrid-Lease": str(event.lease_revision),
        }
        payload = event.SerializeToString()
        for attempt in range(_PUBLISH_ATTEMPTS):
            if not run.holds_lease():
                log.warning("lease lost before publishing %s: not published", event.name)
                return
            try:
                published = await self._events.publish(
                    config.processor_id, config.source_id, event.event_id, payload, headers
                )
            except Exception as error:
                log.warning("publishing %s failed (%s); retrying", event.name, error)
                await asyncio.sleep(0.2 * 2**attempt)
                continue
            metrics.INGEST_EVENTS.labels(config.processor_id, config.source_id).inc()
            latency = time.time() - event.capture_time.ToNanoseconds() / 1e9
            metrics.INGEST_EVENT_LATENCY.observe(max(0.0, latency))
            if published.duplicate:
                log.info("event %s was stored before", event.event_id)
            return
        log.error("event %s could not be stored", event.name)

    @staticmethod
    def match_event(payload: bytes, cursor: str, include_chip: bool) -> ingest_pb2.MatchEvent:
        event = ingest_pb2.MatchEvent.FromString(payload)
        event.cursor = cursor
        if not include_chip:
            event.face.ClearField("chip")
        return event
