"""Sampled frames of every source on this replica -> faces -> tracks -> match events.

Frames of all sources are processed in batches (at most ``max_batch_frames``, waiting at
most ``max_batch_wait_s`` for more once one is ready): every frame of a batch is sent to
detection at once, every face of the batch is embedded in one EmbedChips call, and the
best shots of every source searched in one SearchFaces call per collection and
threshold, instead of one call per frame per camera.

Each source has at most one frame in a batch and one waiting; a newer frame replaces
the waiting one, which is counted as dropped, so nothing queues without bound and a
source whose work falls behind loses its oldest frames, not its newest.

Faces are tracked per source (facegrid_ingest.tracker). A track is searched with its
first shot at once and again whenever a clearly better shot arrives; it makes at most
one event, sent as soon as a searched shot matches. A repeat of the same subject on
the same source within the suppression window makes no event and is counted in the
next one.

Work is spent only where it can change an outcome. A frame is searched for faces in
full at least every ``full_frame_interval_s`` (that is where new faces are found); in
between, only in regions around the live tracks that still want a better shot
(facegrid_ingest.regions) during their first ``max_event_delay``, and not at all when
every face in view is already matched, past that, or no one is there. A face is
embedded only when its embedding is needed: it starts a track, its position fits no
track or several, or it is a shot worth searching; a face that merely continues its one
track by position is not.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
from facegrid import metrics, telemetry
from facegrid.identification.deadline import Deadline
from facegrid.identification.flow import Identifier
from facegrid.identification.policy import ThresholdDecision
from facegrid.tasks import cancel_and_wait
from facegrid.v1 import common_pb2, ingest_pb2, resources_pb2
from google.protobuf import timestamp_pb2
from numpy.typing import NDArray
from PIL import Image

from facegrid_ingest.regions import Region, regions_around, to_frame
from facegrid_ingest.tracker import Detection, Track, Tracker

log = logging.getLogger(__name__)

# Event ids are UUID v5 in this namespace of (processor, source, lease, track, subject).
EVENT_NAMESPACE = uuid.UUID("0f6f3a52-7d2c-4f0e-9b8a-3c1d2e4f5a60")
# A later shot is searched again only when its quality beats the best searched by this.
RESEARCH_GAIN = 1.25
# Most searches of one track (its first shot, better ones, the best at max_event_delay).
MAX_SEARCHES_PER_TRACK = 4
JPEG_QUALITY = 90
# How long collections and threshold decisions are reused before being read again.
COLLECTION_TTL_S = 5.0
# The detector's smallest face at its native scale, when a source sets no minimum.
NATIVE_FACE_SIZE = 80
# Sampling jitter allowed when deciding that a full-frame detection is due.
FULL_FRAME_SLACK_S = 0.05

Found = tuple[common_pb2.FaceDetail, common_pb2.Embedding | None]


def event_id(processor_id: str, source_id: str, lease: int, track: int, subject: str) -> str:
    return str(uuid.uuid5(EVENT_NAMESPACE, f"{processor_id}/{source_id}/{lease}/{track}/{subject}"))


@dataclass(frozen=True)
class SampledFrame:
    """A frame kept by sampling: encoded (pushed) or decoded pixels (pulled)."""

    number: int
    capture_time: float  # unix seconds
    encoded: bytes | None = None
    pixels: NDArray[np.uint8] | None = None

    def jpeg(self) -> bytes:
        if self.encoded is not None:
            return self.encoded
        assert self.pixels is not None
        return _jpeg(self.pixels)

    def rgb(self) -> NDArray[np.uint8]:
        """The pixels, decoded from the pushed bytes if need be."""
        if self.pixels is not None:
            return self.pixels
        assert self.encoded is not None
        with Image.open(io.BytesIO(self.encoded)) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)


@dataclass(frozen=True)
class SourceConfig:
    """Everything one source's processing needs, from its processor and itself."""

    processor_id: str
    source_id: str
    lease_revision: int  # of the lease acquisition: part of every event id
    collection: str
    context: common_pb2.IdentificationContext
    principal: str
    requested_threshold: float | None
    frames_per_second: float
    min_face_size: int | None
    max_matches: int
    max_event_delay_s: float
    suppression_s: float
    quality_filter: int


@dataclass
class _TrackState:
    searches: int = 0
    best_searched_quality: float = 0.0
    late_search_done: bool = False
    evented: bool = False


@dataclass(eq=False)  # by identity: a run is a key of batches
class SourceRun:
    """The processing state of one source while this replica reads it."""

    config: SourceConfig
    holds_lease: Callable[[], bool]
    tracker: Tracker = field(default_factory=Tracker)
    counters: ingest_pb2.VideoSourceCounters = field(default_factory=ingest_pb2.VideoSourceCounters)
    tracks: dict[int, _TrackState] = field(default_factory=dict)
    # subject -> (time of its last event, repeats suppressed since)
    last_events: dict[str, tuple[float, int]] = field(default_factory=dict)
    pending: SampledFrame | None = None
    busy: bool = False
    closed: bool = False
    last_full_frame_s: float | None = None  # capture time of the last full-frame detection


@dataclass(frozen=True)
class _Shot:
    run: SourceRun
    frame: SampledFrame
    track: Track
    face: common_pb2.FaceDetail
    embedding: common_pb2.Embedding | None  # None until embedded for the search


@dataclass(frozen=True)
class _Plan:
    """Where to look for faces in one frame: all of it (regions None), regions, or nowhere."""

    regions: list[Region] | None
    skip: bool = False


EmitEvent = Callable[[SourceRun, ingest_pb2.MatchEvent], Awaitable[None]]


class FramePipeline:
    """Batches sampled frames of all sources through detection, embedding and search."""

    def __init__(
        self,
        identifier: Identifier,
        emit: EmitEvent,
        *,
        max_batch_frames: int,
        max_batch_wait_s: float,
        timeout_s: float,
        full_frame_interval_s: float = 0.0,
    ) -> None:
        self._identifier = identifier
        self._emit = emit
        self._max_batch = max_batch_frames
        self._max_wait_s = max_batch_wait_s
        self._timeout_s = timeout_s
        self._full_frame_interval_s = full_frame_interval_s
        self._ready: asyncio.Queue[SourceRun] = asyncio.Queue()
        self._collections: dict[str, tuple[float, resources_pb2.Collection]] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="ingest-batches")
        self._task.add_done_callback(_log_crash)

    async def stop(self) -> None:
        await cancel_and_wait([self._task], what="ingest batch loop")

    def offer(self, run: SourceRun, frame: SampledFrame) -> None:
        """Hand over a sampled frame; it replaces (and drops) one still waiting."""
        run.counters.frames_sampled += 1
        if run.pending is not None:
            run.counters.frames_dropped += 1
        elif not run.busy:
            self._ready.put_nowait(run)
        run.pending = frame

    async def _loop(self) -> None:
        while True:
            runs = [await self._ready.get()]
            waited_until = time.monotonic() + self._max_wait_s
            while len(runs) < self._max_batch:
                left = waited_until - time.monotonic()
                if left <= 0:
                    break
                try:
                    runs.append(await asyncio.wait_for(self._ready.get(), left))
                except TimeoutError:
                    break
            batch: list[tuple[SourceRun, SampledFrame]] = []
            for run in dict.fromkeys(runs):  # a run once per batch
                if run.pending is None or run.closed:
                    continue
                batch.append((run, run.pending))
                run.pending = None
                run.busy = True
            try:
                if batch:
                    await self._process(batch)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("a batch of %d frames failed", len(batch))
            finally:
                for run, _ in batch:
                    run.busy = False
                    if run.pending is not None and not run.closed:
                        self._ready.put_nowait(run)

    async def _collection(self, name: str, deadline: Deadline) -> resources_pb2.Collection:
        cached = self._collections.get(name)
        if cached is not None and time.monotonic() - cached[0] < COLLECTION_TTL_S:
            return cached[1]
        collection = await self._identifier.collection(name, deadline, "collection")
        self._collections[name] = (time.monotonic(), collection)
        return collection

    async def _process(self, batch: list[tuple[SourceRun, SampledFrame]]) -> None:
        deadline = Deadline.after(self._timeout_s)
        metrics.INGEST_BATCH_FRAMES.observe(len(batch))
        with telemetry.span("ingest.batch", frame_count=len(batch)):
            detected = await asyncio.gather(
                *(self._detect(run, frame, deadline) for run, frame in batch),
                return_exceptions=True,
            )
            wanted: list[common_pb2.FaceDetail] = []
            for index, result in enumerate(detected):
                if isinstance(result, BaseException):
                    run = batch[index][0]
                    run.counters.frames_rejected += 1
                    log.warning(
                        "a frame of %s/%s was not analysed: %s",
                        run.config.processor_id,
                        run.config.source_id,
                        result,
                    )
                    continue
                if result is None:
                    continue
                run, frame = batch[index]
                for face, needed in zip(
                    result, self._embeddings_needed(run, frame, result), strict=True
                ):
                    if needed:
                        wanted.append(face)
            embeddings, model_version = await self._identifier.pipeline.embed(wanted, deadline)
            by_face = {id(face): e for face, e in zip(wanted, embeddings, strict=True)}
            telemetry.annotate(
                face_count=sum(len(r) for r in detected if isinstance(r, list)),
                embedded_count=len(wanted),
                model_version=model_version,
            )
            shots: list[_Shot] = []
            for index, (run, frame) in enumerate(batch):
                result = detected[index]
                if isinstance(result, BaseException) or result is None:
                    continue  # rejected, or not looked at (the tracks wait for the next look)
                found = [(face, by_face.get(id(face))) for face in result]
                shots.extend(self._track(run, frame, found))
            log.debug(
                "batch: %d frames, %d embedded, %d shots to search",
                len(batch),
                len(wanted),
                len(shots),
            )
            if shots:
                model_version = await self._embed_shots(shots, model_version, deadline)
                await self._search(shots, model_version, deadline)

    def _full_frame_due(self, run: SourceRun, frame: SampledFrame) -> bool:
        last = run.last_full_frame_s
        return (
            self._full_frame_interval_s <= 0
            or last is None
            or frame.capture_time - last >= self._full_frame_interval_s - FULL_FRAME_SLACK_S
        )

    def _plan(self, run: SourceRun, frame: SampledFrame, width: int, height: int) -> _Plan:
        """Between full-frame detections: regions around the tracks wanting a shot."""
        wanting = [
            track.predicted_box(frame.capture_time)
            for track in run.tracker.tracks
            if _wants_region(run.tracks.get(track.track_number))
        ]
        if not wanting:
            return _Plan(None, skip=True)
        regions = regions_around(
            wanting, width, height, run.config.min_face_size or NATIVE_FACE_SIZE
        )
        if regions is not None and not regions:
            return _Plan(None, skip=True)  # every such track predicted off the frame
        return _Plan(regions)

    async def _detect(
        self, run: SourceRun, frame: SampledFrame, deadline: Deadline
    ) -> list[common_pb2.FaceDetail] | None:
        """The frame's faces that pass the quality filter; None: the frame was not looked at."""
        source = (run.config.processor_id, run.config.source_id)
        pixels = frame.pixels
        if self._full_frame_due(run, frame):
            plan = _Plan(None)  # pushed bytes go to detection as they are, not decoded here
        else:
            if pixels is None:
                pixels = await asyncio.to_thread(frame.rgb)
            plan = self._plan(run, frame, pixels.shape[1], pixels.shape[0])
        if plan.skip:
            run.counters.detections_skipped += 1
            metrics.INGEST_DETECTIONS.labels(*source, "skipped").inc()
            return None
        if plan.regions is None:
            image = await asyncio.to_thread(frame.jpeg)
            faces = list(
                (
                    await self._identifier.pipeline.detect(
                        image, deadline, "frame", min_face_size=run.config.min_face_size
                    )
                ).faces
            )
            run.last_full_frame_s = frame.capture_time
            run.counters.full_frame_detections += 1
            metrics.INGEST_DETECTIONS.labels(*source, "full").inc()
        else:
            assert pixels is not None
            faces = await self._detect_regions(run, pixels, plan.regions, deadline)
            run.counters.region_detections += 1
            metrics.INGEST_DETECTIONS.labels(*source, "regions").inc()
        level = self._identifier.pipeline.quality.level(run.config.quality_filter)
        return [
            face for face in faces if not self._identifier.pipeline.quality.reasons(face, level)
        ]

    async def _detect_regions(
        self,
        run: SourceRun,
        pixels: NDArray[np.uint8],
        regions: list[Region],
        deadline: Deadline,
    ) -> list[common_pb2.FaceDetail]:
        height, width = pixels.shape[:2]

        async def one(region: Region) -> list[common_pb2.FaceDetail]:
            cut = pixels[region.top : region.bottom, region.left : region.right]
            image = await asyncio.to_thread(_jpeg, cut)
            detected = await self._identifier.pipeline.detect(
                image, deadline, "frame", min_face_size=run.config.min_face_size
            )
            return [to_frame(face, region, width, height) for face in detected.faces]

        found = await asyncio.gather(*(one(region) for region in regions))
        return [face for faces in found for face in faces]

    def _embeddings_needed(
        self, run: SourceRun, frame: SampledFrame, faces: list[common_pb2.FaceDetail]
    ) -> list[bool]:
        """Which faces must be embedded now: all but those that continue one track by
        position alone, unambiguously, with a shot not worth searching."""
        candidates = run.tracker.geometric_candidates(
            frame.capture_time, [_box(face) for face in faces]
        )
        claims: dict[int, int] = {}
        for tracks in candidates:
            for track in tracks:
                claims[track.track_number] = claims.get(track.track_number, 0) + 1
        needed: list[bool] = []
        for face, tracks in zip(faces, candidates, strict=True):
            if len(tracks) != 1 or claims[tracks[0].track_number] != 1:
                needed.append(True)
                continue
            track = tracks[0]
            state = run.tracks.get(track.track_number)
            if track.embedding is None or state is None:
                needed.append(True)
            elif not _wants_shot(state):
                needed.append(False)
            else:
                needed.append(shot_quality(face) >= state.best_searched_quality * RESEARCH_GAIN)
        return needed

    def _track(self, run: SourceRun, frame: SampledFrame, found: list[Found]) -> list[_Shot]:
        """Update the source's tracks; the shots worth searching."""
        detections = [
            Detection(
                box=_box(face),
                embedding=None
                if embedding is None
                else np.asarray(embedding.values, dtype=np.float32),
                quality=shot_quality(face),
                payload=(face, embedding),
            )
            for face, embedding in found
        ]
        update = run.tracker.update(frame.capture_time, frame.number, detections)
        for track in update.ended:
            run.tracks.pop(track.track_number, None)
        run.counters.tracks += len(update.started)
        if update.started:
            metrics.INGEST_TRACKS.labels(run.config.processor_id, run.config.source_id).inc(
                len(update.started)
            )
        shots: list[_Shot] = []
        for track, detection in [*update.matched, *update.started]:
            state = run.tracks.setdefault(track.track_number, _TrackState())
            if not _wants_shot(state):
                continue
            age = frame.capture_time - track.first_time_s
            better = detection.quality >= state.best_searched_quality * RESEARCH_GAIN
            late = age >= run.config.max_event_delay_s and not state.late_search_done
            if state.searches == 0 or better or late:
                # The track's best shot so far (this one, when it is the best).
                best = track.best_shots[0]
                if best.detection is not detection and not late:
                    continue
                face: common_pb2.FaceDetail
                embedding: common_pb2.Embedding | None
                face, embedding = best.detection.payload  # type: ignore[misc]
                state.searches += 1
                state.best_searched_quality = max(
                    state.best_searched_quality, best.detection.quality
                )
                state.late_search_done = state.late_search_done or late
                shot_frame = (
                    frame
                    if best.detection is detection
                    else SampledFrame(number=best.frame_number, capture_time=best.time_s)
                )
                shots.append(_Shot(run, shot_frame, track, face, embedding))
        return shots

    async def _embed_shots(self, shots: list[_Shot], model_version: str, deadline: Deadline) -> str:
        """Embed the shots to search that were not embedded with their frame (a best shot
        kept without one, or a face whose track the position alone did not tell)."""
        missing = [index for index, shot in enumerate(shots) if shot.embedding is None]
        if not missing:
            return model_version
        embeddings, version = await self._identifier.pipeline.embed(
            [shots[index].face for index in missing], deadline
        )
        for index, embedding in zip(missing, embeddings, strict=True):
            shot = shots[index]
            shots[index] = _Shot(shot.run, shot.frame, shot.track, shot.face, embedding)
        return version

    async def _search(self, shots: list[_Shot], model_version: str, deadline: Deadline) -> None:
        groups: dict[tuple[str, float, int], list[_Shot]] = {}
        decisions: dict[tuple[str, float, int], ThresholdDecision] = {}
        collections: dict[str, resources_pb2.Collection] = {}
        for shot in shots:
            config = shot.run.config
            collection = collections.get(config.collection)
            if collection is None:
                collection = await self._collection(config.collection, deadline)
                collections[config.collection] = collection
            decision = self._identifier.decide(
                collection,
                config.context.purpose,
                config.requested_threshold,
                "match_threshold",
            )
            key = (config.collection, decision.applied, config.max_matches)
            decisions[key] = decision
            groups.setdefault(key, []).append(shot)
        for key, members in groups.items():
            collection_name, _, top_k = key
            results = await self._identifier.search(
                collection_name,
                [s.embedding for s in members if s.embedding is not None],
                collections[collection_name].model_version,
                top_k,
                decisions[key],
                deadline,
            )
            for shot, matches in zip(members, results, strict=True):
                if matches:
                    await self._match(shot, matches, decisions[key], collections[collection_name])

    async def _match(
        self,
        shot: _Shot,
        matches: list[resources_pb2.FaceMatch],
        decision: ThresholdDecision,
        collection: resources_pb2.Collection,
    ) -> None:
        run, config = shot.run, shot.run.config
        state = run.tracks.setdefault(shot.track.track_number, _TrackState())
        if state.evented:
            return
        state.evented = True
        top = matches[0].face
        subject = top.subject_id or top.name
        last = run.last_events.get(subject)
        now = shot.frame.capture_time
        if last is not None and now - last[0] < config.suppression_s:
            run.last_events[subject] = (last[0], last[1] + 1)
            run.counters.suppressed_repeats += 1
            metrics.INGEST_SUPPRESSED.labels(config.processor_id, config.source_id).inc()
            return
        suppressed = 0 if last is None else last[1]
        if not run.holds_lease():
            log.warning("lease of %s/%s lost: no event", config.processor_id, config.source_id)
            return
        identifier = event_id(
            config.processor_id,
            config.source_id,
            config.lease_revision,
            shot.track.track_number,
            subject,
        )
        created = timestamp_pb2.Timestamp()
        created.GetCurrentTime()
        event = ingest_pb2.MatchEvent(
            event_id=identifier,
            name=f"streamProcessors/{config.processor_id}/matchEvents/{identifier}",
            stream_processor=f"streamProcessors/{config.processor_id}",
            source_id=config.source_id,
            capture_time=_timestamp(shot.frame.capture_time),
            frame_sequence_number=shot.frame.number,
            create_time=created,
            track_id=f"{config.lease_revision}-{shot.track.track_number}",
            face=shot.face,
            matches=matches,
            threshold=decision.with_compared(int(collection.face_count)),
            model_version=collection.model_version,
            context=config.context,
            lease_revision=config.lease_revision,
            suppressed_repeat_count=suppressed,
        )
        await self._emit(run, event)
        run.last_events[subject] = (now, 0)
        run.counters.events += 1


def _wants_shot(state: _TrackState | None) -> bool:
    """Whether a track can still make an event from a better shot."""
    return state is None or (not state.evented and state.searches < MAX_SEARCHES_PER_TRACK)


def _wants_region(state: _TrackState | None) -> bool:
    """Whether a track is worth a region detection between full-frame ones: until its
    search at ``max_event_delay``; after that a better shot is looked for only in full
    frames."""
    return _wants_shot(state) and (state is None or not state.late_search_done)


def _jpeg(pixels: NDArray[np.uint8]) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the batch loop stopped", exc_info=task.exception())


def shot_quality(face: common_pb2.FaceDetail) -> float:
    """How good a shot is for searching: face size, sharpness, frontal pose."""
    q = face.quality
    size = float(q.face_size)
    sharpness = min(1.0, float(q.sharpness) / 30.0)
    yaw = abs(q.yaw) if q.HasField("yaw") else 0.0
    frontal = max(0.1, 1.0 - yaw / 90.0)
    return size * (0.5 + 0.5 * sharpness) * frontal * max(0.1, face.confidence / 100.0)


def _box(face: common_pb2.FaceDetail) -> tuple[float, float, float, float]:
    b = face.bounding_box
    return (float(b.left), float(b.top), max(1.0, float(b.width)), max(1.0, float(b.height)))


def _timestamp(unix_s: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(unix_s * 1e9))
    return stamp
