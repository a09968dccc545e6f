"""The ingest service end to end, with real parts: a real nats-server with JetStream,
detection, embedding, search and the gateway as processes, ingest replicas as processes,
the Hamilton clip read from file:// and pushed with PushFrames.

With lin-manuel-miranda.png enrolled, the clip makes match events for him (right
subject, threshold, model version, one per track), each audited and stored once; a
gallery without him makes none; a subscriber resumes from its cursor with exactly what
it missed; two replicas share the sources and a SIGKILLed one's move to the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import nats
import nats.js.errors
import pytest
from facegrid import diagnostics
from facegrid.audit_chain import verify_chain
from facegrid.v1 import (
    common_pb2,
    face_service_pb2,
    ingest_pb2,
    ingest_pb2_grpc,
    resources_pb2,
)
from facegrid_ingest.event_log import source_token
from facegrid_ingest.leases import DEFAULT_LEASES_BUCKET, lease_key
from google.protobuf import duration_pb2, field_mask_pb2

from tests.conftest import SHARED_DATA
from tests.e2e.ingest_helpers import (
    CALL_TIMEOUT_S,
    CLIP,
    LEASE_S,
    MIRANDA,
    IngestStack,
    clip_jpegs,
    enrol,
    identification_context,
    ingest_stack,
    push_visit,
    wait_events,
)
from tests.e2e.media_servers import HttpFileServer, RtspServer

F = face_service_pb2
I = ingest_pb2  # noqa: E741
SP = I.StreamProcessor
Purpose = common_pb2.IdentificationContext.Purpose
ARCADE = SHARED_DATA / "video" / "arcade-walking.mp4"
OTHERS = [
    SHARED_DATA / "faces" / "misc" / "alex-lacamoire.png",
    SHARED_DATA / "faces" / "misc" / "obama.jpg",
    SHARED_DATA / "faces" / "misc" / "biden.jpg",
]

pytestmark = pytest.mark.skipif(not CLIP.is_file(), reason=f"test video not found ({CLIP})")


@pytest.fixture(scope="module")
def stack(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[IngestStack]:
    with ingest_stack(
        model_repo, tmp_path_factory.mktemp("ingest"), [CLIP.parent, ARCADE.parent]
    ) as running:
        yield running


@pytest.fixture(scope="module")
def watchlist(stack: IngestStack) -> str:
    """A watch-list with him alone."""
    return enrol(stack, "watchlist", {"lin-manuel-miranda": MIRANDA})


def _processor(collection: str, *sources: I.VideoSource, **fields: Any) -> SP:
    return SP(
        display_name="test",
        sources=list(sources),
        collection=collection,
        context=identification_context(),
        **fields,
    )


def _create_push_processor(s: IngestStack, processor_id: str, source_id: str, **fields: Any) -> str:
    """A stream processor on the watch-list with one push source (not started): its name."""
    response = s.ingest.CreateStreamProcessor(
        I.CreateStreamProcessorRequest(
            stream_processor_id=processor_id,
            stream_processor=_processor(
                "collections/watchlist",
                I.VideoSource(source_id=source_id, push=I.PushSource()),
                **fields,
            ),
        ),
        metadata=s.metadata(),
        timeout=CALL_TIMEOUT_S,
    )
    return str(response.stream_processor.name)


def _held_open(
    name: str, source_id: str, frame: bytes, release: threading.Event
) -> Iterator[I.PushFramesRequest]:
    """A PushFrames stream that sends one frame, then nothing until ``release``."""
    yield I.PushFramesRequest(
        stream_processor=name, source_id=source_id, frame=frame, sequence_number=1
    )
    release.wait(30)


def _file_source(source_id: str = "cam-1") -> I.VideoSource:
    return I.VideoSource(source_id=source_id, pull=I.PullSource(url=CLIP.resolve().as_uri()))


def _collect(
    s: IngestStack, request: I.StreamMatchEventsRequest, events: list[I.MatchEvent]
) -> tuple[threading.Thread, Any]:
    call = s.ingest.StreamMatchEvents(request, metadata=s.metadata(), timeout=300)

    def read() -> None:
        try:
            for message in call:
                if message.HasField("event"):
                    events.append(message.event)
        except grpc.RpcError:
            pass

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread, call


def _wait_state(s: IngestStack, name: str, states: set[int], timeout_s: float = 60) -> SP:
    deadline = time.monotonic() + timeout_s
    while True:
        got = s.ingest.GetStreamProcessor(
            I.GetStreamProcessorRequest(name=name), metadata=s.metadata(), timeout=CALL_TIMEOUT_S
        ).stream_processor
        if {src.state for src in got.sources} <= states:
            return got
        assert time.monotonic() < deadline, got
        time.sleep(0.5)


def _run_clip(s: IngestStack, processor_id: str, collection: str) -> list[I.MatchEvent]:
    """Create, start, play the clip to its end; the events it made."""
    md = s.metadata()
    created = s.ingest.CreateStreamProcessor(
        I.CreateStreamProcessorRequest(
            stream_processor_id=processor_id,
            stream_processor=_processor(collection, _file_source()),
        ),
        metadata=md,
        timeout=CALL_TIMEOUT_S,
    ).stream_processor
    assert created.state == SP.STATE_STOPPED
    name = created.name
    events: list[I.MatchEvent] = []
    thread, call = _collect(
        s,
        I.StreamMatchEventsRequest(
            stream_processor=name, start_position=I.StreamMatchEventsRequest.START_POSITION_EARLIEST
        ),
        events,
    )
    started = s.ingest.StartStreamProcessor(
        I.StartStreamProcessorRequest(name=name), metadata=md, timeout=CALL_TIMEOUT_S
    ).stream_processor
    assert started.state in (SP.STATE_STARTING, SP.STATE_RUNNING)
    ended = _wait_state(s, name, {I.VideoSource.STATE_ENDED}, timeout_s=90)
    counters = ended.sources[0].counters
    assert counters.frames_received > 200  # the 10 s clip has 275 frames
    assert 14 <= counters.frames_sampled <= 24  # 2 per second
    assert counters.tracks >= 1
    time.sleep(2.0)  # the last batch
    call.cancel()
    thread.join(10)
    stopped = s.ingest.StopStreamProcessor(
        I.StopStreamProcessorRequest(name=name), metadata=md, timeout=CALL_TIMEOUT_S
    ).stream_processor
    assert stopped.state == SP.STATE_STOPPED
    return events


def test_the_clip_makes_one_event_per_track_for_the_enrolled_person(
    stack: IngestStack, watchlist: str
) -> None:
    s = stack
    md = s.metadata()
    events = _run_clip(s, "hamilton", watchlist)
    assert events, "no match event for the enrolled person"
    keys = [(e.track_id, e.matches[0].face.subject_id) for e in events]
    assert len(keys) == len(set(keys)), "a track made more than one event per subject"
    assert len({e.event_id for e in events}) == len(events)
    for event in events:
        assert event.matches[0].face.subject_id == "lin-manuel-miranda"
        assert event.stream_processor == "streamProcessors/hamilton"
        assert event.source_id == "cam-1"
        assert event.model_version == "dlib_resnet_v1+mirror"
        # Watch-list monitoring: the stricter default, 90 (FMR at most 1e-5).
        assert event.threshold.applied >= 90
        assert event.matches[0].similarity >= event.threshold.applied
        assert event.threshold.compared_face_count == 1
        assert event.cursor
        assert event.audit_record.startswith("auditRecords/")
        assert not event.face.HasField("chip")
        assert event.context.case_id == "CASE-INGEST"
    # Stored: listed, and fetched with the chip for review.
    listed = s.ingest.ListMatchEvents(
        I.ListMatchEventsRequest(parent="streamProcessors/hamilton"), metadata=md, timeout=30
    ).match_events
    assert [e.event_id for e in listed] == [e.event_id for e in events]
    by_subject = s.ingest.ListMatchEvents(
        I.ListMatchEventsRequest(parent="streamProcessors/-", subject_id="nobody"),
        metadata=md,
        timeout=30,
    ).match_events
    assert list(by_subject) == []
    one = s.ingest.GetMatchEvent(
        I.GetMatchEventRequest(name=events[0].name, include_chip=True), metadata=md, timeout=30
    ).match_event
    assert one.face.chip.width == 150
    assert len(one.face.chip.rgb) == 150 * 150 * 3
    # Every event has its audit record, in the one chain the gateway verifies.
    records = s.faces.ListAuditRecords(
        F.ListAuditRecordsRequest(page_size=1000), metadata=md, timeout=30
    ).audit_records
    audited = {r.target: r for r in records if r.method.endswith("IngestService/MatchEvent")}
    for event in events:
        record = audited[event.name]
        assert event.audit_record == record.name
        assert record.context.purpose == Purpose.PURPOSE_WATCHLIST_MONITORING
        assert list(record.result_resources) == [m.face.name for m in event.matches]
    assert verify_chain(records).intact


def test_a_gallery_without_him_makes_no_event(stack: IngestStack, watchlist: str) -> None:
    s = stack
    parent = enrol(s, "others", {p.stem.replace("_", "-"): p for p in OTHERS})
    events = _run_clip(s, "hamilton-others", parent)
    assert events == []


def test_bad_processors_are_refused_with_the_field(stack: IngestStack, watchlist: str) -> None:
    s = stack
    md = s.metadata()

    def create(processor_id: str, processor: SP) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as caught:
            s.ingest.CreateStreamProcessor(
                I.CreateStreamProcessorRequest(
                    stream_processor_id=processor_id, stream_processor=processor
                ),
                metadata=md,
                timeout=CALL_TIMEOUT_S,
            )
        return caught.value

    error = create("Bad_Id", _processor("collections/watchlist", _file_source()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    outside = I.VideoSource(source_id="x", pull=I.PullSource(url="file:///etc/passwd"))
    error = create("outside", _processor("collections/watchlist", outside))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    remote = I.VideoSource(
        source_id="x", pull=I.PullSource(url="rtsp://admin:secret@10.1.2.3/stream")
    )
    error = create("remote", _processor("collections/watchlist", remote))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "secret" not in (error.details() or "")
    error = create("nocoll", _processor("collections/missing", _file_source()))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    no_context = _processor("collections/watchlist", _file_source())
    no_context.ClearField("context")
    error = create("nocontext", no_context)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    twice = _processor("collections/watchlist", _file_source("a"), _file_source("a"))
    assert create("twice", twice).code() == grpc.StatusCode.INVALID_ARGUMENT
    fps = _processor("collections/watchlist", _file_source(), frames_per_second=100)
    assert create("fps", fps).code() == grpc.StatusCode.INVALID_ARGUMENT
    # No test watch-list on a production collection.
    s.faces.CreateCollection(
        F.CreateCollectionRequest(
            collection_id="production", collection=resources_pb2.Collection(production=True)
        ),
        metadata=md,
        timeout=CALL_TIMEOUT_S,
    )
    testing = _processor("collections/production", _file_source())
    testing.context.purpose = Purpose.PURPOSE_TESTING
    error = create("testing", testing)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "production collection" in (error.details() or "")
    with pytest.raises(grpc.RpcError) as caught:
        s.ingest.GetStreamProcessor(
            I.GetStreamProcessorRequest(name="streamProcessors/nothing"), metadata=md, timeout=30
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as caught:
        s.ingest.GetStreamProcessor(
            I.GetStreamProcessorRequest(name="streamProcessors/x"), timeout=30
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    tokens = s.stack.tokens
    with pytest.raises(grpc.RpcError) as caught:
        s.ingest.GetStreamProcessor(
            I.GetStreamProcessorRequest(name="streamProcessors/x"),
            metadata=s.stack.metadata(tokens["facegrid.ingest.watch"]),
            timeout=30,
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # The service is still up.
    s.ingest.ListStreamProcessors(I.ListStreamProcessorsRequest(), metadata=md, timeout=30)


def test_pushed_frames_make_events_and_a_subscriber_resumes_from_its_cursor(
    stack: IngestStack, watchlist: str
) -> None:
    s = stack
    md = s.metadata()
    name = _create_push_processor(
        s, "pushed", "door:1", suppression_window=duration_pb2.Duration(seconds=0)
    )
    s.ingest.StartStreamProcessor(I.StartStreamProcessorRequest(name=name), metadata=md, timeout=30)
    frames = clip_jpegs()
    live: list[I.MatchEvent] = []
    thread, call = _collect(s, I.StreamMatchEventsRequest(stream_processor=name), live)
    time.sleep(1.0)
    base = time.time()
    first = push_visit(s, name, "door:1", frames, base, 1)
    assert first.frames_received == len(frames)
    assert first.frames_received == (
        first.frames_accepted + first.frames_skipped + first.frames_dropped + first.frames_rejected
    )
    assert first.frames_accepted >= 3
    wait_events(live, 1)
    assert len(live) == 1, "one visit, one track, one event"
    cursor = live[0].cursor
    call.cancel()  # the subscriber goes away (a network failure) ...
    thread.join(10)
    # ... while he comes back twice: two more tracks (10 s apart), two more events.
    push_visit(s, name, "door:1", frames, base + 10, 100)
    push_visit(s, name, "door:1", frames, base + 20, 200)
    time.sleep(2.0)
    resumed: list[I.MatchEvent] = []
    thread, call = _collect(
        s,
        I.StreamMatchEventsRequest(
            stream_processor=name,
            start_position=I.StreamMatchEventsRequest.START_POSITION_AFTER_CURSOR,
            after_cursor=cursor,
        ),
        resumed,
    )
    wait_events(resumed, 2)
    time.sleep(2.0)  # nothing more comes
    call.cancel()
    thread.join(10)
    stored = s.ingest.ListMatchEvents(
        I.ListMatchEventsRequest(parent=name), metadata=md, timeout=30
    ).match_events
    assert len(stored) == 3
    assert [e.event_id for e in resumed] == [e.event_id for e in stored[1:]]
    assert all(e.matches[0].face.subject_id == "lin-manuel-miranda" for e in stored)
    assert len({e.track_id for e in stored}) == 3


def test_bad_pushed_frames_are_counted_and_the_stream_goes_on(
    stack: IngestStack, watchlist: str
) -> None:
    s = stack
    md = s.metadata()
    name = _create_push_processor(s, "pushed-bad", "door-2")
    frame = clip_jpegs(1)[0]
    stopped = I.PushFramesRequest(
        stream_processor=name, source_id="door-2", frame=frame, sequence_number=1
    )
    with pytest.raises(grpc.RpcError) as caught:
        s.ingest.PushFrames(iter([stopped]), metadata=md, timeout=30)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # not running
    s.ingest.StartStreamProcessor(I.StartStreamProcessorRequest(name=name), metadata=md, timeout=30)
    oversized = b"\xff\xd8" + os.urandom(5 * 1024 * 1024)
    messages = [
        I.PushFramesRequest(
            stream_processor=name, source_id="door-2", frame=frame, sequence_number=5
        ),
        I.PushFramesRequest(frame=b"not an image", sequence_number=6),
        I.PushFramesRequest(frame=frame, sequence_number=6),  # not after the previous
        I.PushFramesRequest(frame=oversized, sequence_number=7),
        I.PushFramesRequest(frame=frame, sequence_number=8),
    ]
    response = s.ingest.PushFrames(iter(messages), metadata=md, timeout=60)
    assert response.frames_received == 5
    assert response.frames_rejected == 3
    with pytest.raises(grpc.RpcError) as caught:
        s.ingest.PushFrames(
            iter([I.PushFramesRequest(stream_processor=name, source_id="nope", frame=frame)]),
            metadata=md,
            timeout=30,
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    # A second stream for the source replaces the first, which ends ABORTED.
    release = threading.Event()
    older = s.ingest.PushFrames.future(
        _held_open(name, "door-2", frame, release), metadata=md, timeout=60
    )
    time.sleep(1.5)
    newer = s.ingest.PushFrames(
        iter([I.PushFramesRequest(stream_processor=name, source_id="door-2", frame=frame)]),
        metadata=md,
        timeout=30,
    )
    assert newer.frames_received == 1
    assert older.exception(timeout=30).code() == grpc.StatusCode.ABORTED
    release.set()


def test_a_replica_asked_for_its_stacks_shows_where_an_open_stream_waits(
    stack: IngestStack, watchlist: str
) -> None:
    """What an operator (or a failed test's report) gets from SIGUSR1: the line a
    PushFrames call is waiting on while its camera sends nothing; the call goes on."""
    s = stack
    md = s.metadata()
    name = _create_push_processor(s, "pushed-stacks", "door-3")
    s.ingest.StartStreamProcessor(I.StartStreamProcessorRequest(name=name), metadata=md, timeout=30)
    release = threading.Event()
    call = s.ingest.PushFrames.future(
        _held_open(name, "door-3", clip_jpegs(1)[0], release), metadata=md, timeout=60
    )
    try:
        time.sleep(1.0)
        stacks = s.stack.group.stacks()
    finally:
        release.set()
    assert call.result(timeout=30).frames_received == 1
    assert set(stacks) >= {"detection", "embedding", "search", "gateway", "ingest"}
    assert all(" asyncio tasks\n" in dump for dump in stacks.values())
    ingest = stacks["ingest"]
    assert 'facegrid_ingest/app.py", line' in ingest
    assert "in _push\n" in ingest
    assert "done, _ = await asyncio.wait(" in ingest
    assert "ingest-control: Replica._control_loop" in ingest
    # What a failed test's report shows first: the call, and the line it waits on.
    calls = diagnostics.waiting_calls(ingest)
    assert any(c.startswith("PushFrames waits in _push (app.py:") for c in calls), calls


def test_two_replicas_share_sources_and_take_over_a_killed_ones(
    stack: IngestStack, watchlist: str
) -> None:
    s = stack
    md = s.metadata()
    second = s.stack.group.start(
        "ingest", port=0, instance="ingest-2", extra=["ingest.replica_id=replica-b"]
    )
    sources = [_file_source(f"cam-{n}") for n in range(4)]
    name = s.ingest.CreateStreamProcessor(
        I.CreateStreamProcessorRequest(
            stream_processor_id="shared",
            stream_processor=_processor("collections/watchlist", *sources),
        ),
        metadata=md,
        timeout=CALL_TIMEOUT_S,
    ).stream_processor.name
    s.ingest.StartStreamProcessor(I.StartStreamProcessorRequest(name=name), metadata=md, timeout=30)

    def owners() -> dict[str, str]:
        got = s.ingest.GetStreamProcessor(
            I.GetStreamProcessorRequest(name=name), metadata=md, timeout=30
        ).stream_processor
        return {src.source_id: src.owner for src in got.sources}

    deadline = time.monotonic() + 30
    while sorted(owners().values()) != ["replica-a"] * 2 + ["replica-b"] * 2:
        assert time.monotonic() < deadline, owners()
        time.sleep(0.5)
    killed_at = time.monotonic()
    second.process.send_signal(signal.SIGKILL)
    second.process.wait(10)
    del s.stack.group.services["ingest-2"]
    while set(owners().values()) != {"replica-a"}:
        assert time.monotonic() - killed_at < 15, owners()
        time.sleep(0.5)
    taken_over_s = time.monotonic() - killed_at
    assert taken_over_s < 15
    _wait_state(s, name, {I.VideoSource.STATE_ENDED}, timeout_s=60)
    time.sleep(2.0)
    stored = s.ingest.ListMatchEvents(
        I.ListMatchEventsRequest(parent=name, page_size=1000), metadata=md, timeout=30
    ).match_events
    ids = [e.event_id for e in stored]
    assert len(ids) == len(set(ids)), "an event id was stored twice"
    assert {e.source_id for e in stored} == {f"cam-{n}" for n in range(4)}
    for event in stored:
        got = s.ingest.GetMatchEvent(
            I.GetMatchEventRequest(name=event.name), metadata=md, timeout=30
        ).match_event
        assert got.event_id == event.event_id


needs_rtsp = pytest.mark.skipif(
    shutil.which("rtsp-server-perl") is None,
    reason="rtsp-server-perl is not installed (apt-get install rtsp-server-perl)",
)


@needs_rtsp
def test_a_camera_over_rtsp_alerts_suppresses_repeats_and_survives_an_outage(
    stack: IngestStack, watchlist: str
) -> None:
    s = stack
    md = s.metadata()
    with RtspServer() as rtsp:
        rtsp.start_pusher(CLIP, "cam0", loop=True)
        # Credentials in the URL: accepted, never shown.
        url = rtsp.url("cam0").replace("rtsp://", "rtsp://viewer:s3cret-pw@")
        created = s.ingest.CreateStreamProcessor(
            I.CreateStreamProcessorRequest(
                stream_processor_id="camera",
                stream_processor=_processor(
                    watchlist, I.VideoSource(source_id="gate-1", pull=I.PullSource(url=url))
                ),
            ),
            metadata=md,
            timeout=CALL_TIMEOUT_S,
        ).stream_processor
        assert "s3cret-pw" not in str(created)
        assert created.sources[0].pull.url.startswith("rtsp://viewer:***@")
        name = created.name
        events: list[I.MatchEvent] = []
        thread, call = _collect(s, I.StreamMatchEventsRequest(stream_processor=name), events)
        s.ingest.StartStreamProcessor(
            I.StartStreamProcessorRequest(name=name), metadata=md, timeout=30
        )
        _wait_state(s, name, {I.VideoSource.STATE_STREAMING}, timeout_s=30)
        wait_events(events, 1, timeout_s=40)
        assert len(events) == 1
        event = events[0]
        assert event.matches[0].face.subject_id == "lin-manuel-miranda"
        assert event.source_id == "gate-1"
        # Capture time from the stream: close to now, not in the future.
        captured = event.capture_time.ToNanoseconds() / 1e9
        assert time.time() - 30 < captured <= event.create_time.ToNanoseconds() / 1e9 + 0.5
        # The clip loops every 10 s: he comes back within the suppression window (60 s),
        # which makes no new event but is counted.
        deadline = time.monotonic() + 40
        while True:
            got = s.ingest.GetStreamProcessor(
                I.GetStreamProcessorRequest(name=name), metadata=md, timeout=30
            ).stream_processor
            if got.sources[0].counters.suppressed_repeats >= 1:
                break
            assert time.monotonic() < deadline, got
            time.sleep(1.0)
        assert len(events) == 1
        assert got.state == SP.STATE_RUNNING
        assert got.sources[0].owner == "replica-a"
        # The camera goes away: the source reports it reconnects; then streams again.
        rtsp.stop_pusher("cam0")
        outage = _wait_state(s, name, {I.VideoSource.STATE_RECONNECTING}, timeout_s=20)
        assert outage.sources[0].status_message
        assert "s3cret-pw" not in outage.sources[0].status_message
        rtsp.start_pusher(CLIP, "cam0", loop=True)
        back = _wait_state(s, name, {I.VideoSource.STATE_STREAMING}, timeout_s=40)
        assert back.sources[0].counters.reconnects >= 1
        s.ingest.StopStreamProcessor(
            I.StopStreamProcessorRequest(name=name), metadata=md, timeout=30
        )
        call.cancel()
        thread.join(10)
    logs = (s.stack.work_dir / "logs" / "ingest.log").read_text(errors="replace")
    assert "s3cret-pw" not in logs


def test_many_people_walking_make_tracks_and_no_false_event(
    stack: IngestStack, watchlist: str
) -> None:
    s = stack
    md = s.metadata()
    parent = "collections/others"
    with contextlib.suppress(grpc.RpcError):
        enrol(s, "others", {p.stem.replace("_", "-"): p for p in OTHERS})
    name = s.ingest.CreateStreamProcessor(
        I.CreateStreamProcessorRequest(
            stream_processor_id="arcade",
            stream_processor=_processor(
                parent, I.VideoSource(source_id="arcade", pull=I.PullSource(url=ARCADE.as_uri()))
            ),
        ),
        metadata=md,
        timeout=CALL_TIMEOUT_S,
    ).stream_processor.name
    s.ingest.StartStreamProcessor(I.StartStreamProcessorRequest(name=name), metadata=md, timeout=30)
    ended = _wait_state(s, name, {I.VideoSource.STATE_ENDED}, timeout_s=90)
    time.sleep(3.0)  # the last batches
    got = s.ingest.GetStreamProcessor(
        I.GetStreamProcessorRequest(name=name), metadata=md, timeout=30
    ).stream_processor
    assert got.sources[0].counters.tracks >= 3, got
    assert ended.sources[0].counters.frames_sampled >= 6
    events = s.ingest.ListMatchEvents(
        I.ListMatchEventsRequest(parent=name), metadata=md, timeout=30
    ).match_events
    assert list(events) == []
    s.ingest.StopStreamProcessor(I.StopStreamProcessorRequest(name=name), metadata=md, timeout=30)


def test_sources_that_cannot_be_read_say_why(stack: IngestStack, watchlist: str) -> None:
    s = stack
    md = s.metadata()
    with HttpFileServer(Path(__file__).parent) as http:
        sources = [
            I.VideoSource(source_id="text", pull=I.PullSource(url=http.url("ingest_helpers.py"))),
            I.VideoSource(source_id="closed", pull=I.PullSource(url="rtsp://127.0.0.1:1/cam")),
        ]
        name = s.ingest.CreateStreamProcessor(
            I.CreateStreamProcessorRequest(
                stream_processor_id="unreadable", stream_processor=_processor(watchlist, *sources)
            ),
            metadata=md,
            timeout=CALL_TIMEOUT_S,
        ).stream_processor.name
        s.ingest.StartStreamProcessor(
            I.StartStreamProcessorRequest(name=name), metadata=md, timeout=30
        )
        deadline = time.monotonic() + 30
        while True:
            got = s.ingest.GetStreamProcessor(
                I.GetStreamProcessorRequest(name=name), metadata=md, timeout=30
            ).stream_processor
            states = {src.source_id: src for src in got.sources}
            if (
                states["text"].state == I.VideoSource.STATE_FAILED
                and states["closed"].state == I.VideoSource.STATE_RECONNECTING
            ):
                break
            assert time.monotonic() < deadline, got
            time.sleep(0.5)
        assert "video" in states["text"].status_message
        assert states["closed"].status_message
        # Sources and collection cannot change while it runs; other fields can.
        with pytest.raises(grpc.RpcError) as caught:
            s.ingest.UpdateStreamProcessor(
                I.UpdateStreamProcessorRequest(
                    stream_processor=SP(name=name, sources=sources[:1]),
                    update_mask=field_mask_pb2.FieldMask(paths=["sources"]),
                ),
                metadata=md,
                timeout=30,
            )
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        for paths in (["state"], ["no_such_field"], []):
            with pytest.raises(grpc.RpcError) as caught:
                s.ingest.UpdateStreamProcessor(
                    I.UpdateStreamProcessorRequest(
                        stream_processor=SP(name=name, display_name="x"),
                        update_mask=field_mask_pb2.FieldMask(paths=paths),
                    ),
                    metadata=md,
                    timeout=30,
                )
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, paths
        updated = s.ingest.UpdateStreamProcessor(
            I.UpdateStreamProcessorRequest(
                stream_processor=SP(name=name, display_name="renamed", match_threshold=95),
                update_mask=field_mask_pb2.FieldMask(paths=["display_name", "match_threshold"]),
            ),
            metadata=md,
            timeout=30,
        ).stream_processor
        assert updated.display_name == "renamed"
        assert updated.match_threshold == 95
        assert len(updated.sources) == 2  # untouched
        s.ingest.DeleteStreamProcessor(
            I.DeleteStreamProcessorRequest(name=name), metadata=md, timeout=30
        )
        with pytest.raises(grpc.RpcError) as caught:
            s.ingest.DeleteStreamProcessor(
                I.DeleteStreamProcessorRequest(name=name), metadata=md, timeout=30
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    many = [_file_source(f"cam-{n}") for n in range(257)]
    with pytest.raises(grpc.RpcError) as caught:
        s.ingest.CreateStreamProcessor(
            I.CreateStreamProcessorRequest(
                stream_processor_id="too-many", stream_processor=_processor(watchlist, *many)
            ),
            metadata=md,
            timeout=30,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_deleting_a_processor_deletes_its_events_and_ends_its_subscribers(
    stack: IngestStack, watchlist: str
) -> None:
    s = stack
    md = s.metadata()
    name = "streamProcessors/pushed"
    stored = s.ingest.ListMatchEvents(
        I.ListMatchEventsRequest(parent=name), metadata=md, timeout=30
    ).match_events
    assert stored, "the push test stored events"
    events: list[I.MatchEvent] = []
    thread, call = _collect(s, I.StreamMatchEventsRequest(stream_processor=name), events)
    time.sleep(1.0)
    s.ingest.DeleteStreamProcessor(
        I.DeleteStreamProcessorRequest(name=name), metadata=md, timeout=30
    )
    with pytest.raises(grpc.RpcError) as caught:
        s.ingest.GetMatchEvent(I.GetMatchEventRequest(name=stored[0].name), metadata=md, timeout=30)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    listed = s.ingest.ListMatchEvents(
        I.ListMatchEventsRequest(parent=name), metadata=md, timeout=30
    ).match_events
    assert list(listed) == []
    thread.join(45)  # ends at its next heartbeat check at the latest
    assert not thread.is_alive()
    assert call.code() == grpc.StatusCode.NOT_FOUND


def _lease_holders(s: IngestStack, processor_id: str, source_ids: list[str]) -> dict[str, str]:
    """Who holds each source's lease right now, read from NATS KV itself."""

    async def read() -> dict[str, str]:
        nc = await nats.connect(s.nats.url)
        try:
            bucket = await nc.jetstream().key_value(DEFAULT_LEASES_BUCKET)
            holders: dict[str, str] = {}
            for source_id in source_ids:
                key = lease_key(processor_id, source_token(source_id))
                try:
                    entry = await bucket.get(key)
                except nats.js.errors.KeyNotFoundError:
                    continue
                holders[source_id] = (entry.value or b"").decode()
            return holders
        finally:
            await nc.close()

    return asyncio.run(read())


def test_a_replica_stopped_with_sigterm_hands_its_sources_over_first(
    stack: IngestStack, watchlist: str
) -> None:
    s = stack
    md = s.metadata()
    third = s.stack.group.start(
        "ingest", port=0, instance="ingest-3", extra=["ingest.replica_id=replica-c"]
    )
    source_ids = [f"cam-{n}" for n in range(4)]
    deadline = time.monotonic() + 60  # a bound, not a target: rebalancing on a busy machine
    while sorted(_lease_holders(s, "shared", source_ids).values()) != (
        ["replica-a"] * 2 + ["replica-c"] * 2
    ):
        assert time.monotonic() < deadline, _lease_holders(s, "shared", source_ids)
        time.sleep(0.5)
    third.process.send_signal(signal.SIGTERM)
    assert third.process.wait(30) == 0
    del s.stack.group.services["ingest-3"]
    # At exit its leases are already given back: none is left for others to wait out.
    assert "replica-c" not in _lease_holders(s, "shared", source_ids).values()
    deadline = time.monotonic() + 15
    while set(_lease_holders(s, "shared", source_ids).values()) != {"replica-a"} or len(
        _lease_holders(s, "shared", source_ids)
    ) != len(source_ids):
        assert time.monotonic() < deadline, _lease_holders(s, "shared", source_ids)
        time.sleep(0.5)
    stored = s.ingest.ListMatchEvents(
        I.ListMatchEventsRequest(parent="streamProcessors/shared", page_size=1000),
        metadata=md,
        timeout=30,
    ).match_events
    ids = [e.event_id for e in stored]
    assert len(ids) == len(set(ids))


def test_a_push_stream_moved_to_another_replica_takes_the_source_over(
    stack: IngestStack, watchlist: str
) -> None:
    """A camera's pusher reconnects through the load balancer to another replica: the
    newest stream wins there too; the old one ends ABORTED once its replica finds its
    lease taken, and the source's lease moves."""
    s = stack
    md = s.metadata()
    other = s.stack.group.start(
        "ingest", port=0, instance="ingest-4", extra=["ingest.replica_id=replica-d"]
    )
    channel = grpc.insecure_channel(other.address)
    stop = threading.Event()
    try:
        on_other = ingest_pb2_grpc.IngestServiceStub(channel)
        name = _create_push_processor(s, "pushed-moving", "gate")
        s.ingest.StartStreamProcessor(
            I.StartStreamProcessorRequest(name=name), metadata=md, timeout=30
        )
        frames = clip_jpegs()

        def endless(first_seq: int) -> Iterator[I.PushFramesRequest]:
            for index in itertools.count():
                if stop.is_set():
                    return
                message = I.PushFramesRequest(
                    stream_processor=name if index == 0 else "",
                    source_id="gate" if index == 0 else "",
                    frame=frames[index % len(frames)],
                    sequence_number=first_seq + index,
                )
                message.capture_time.GetCurrentTime()
                yield message
                time.sleep(0.3)

        outcome: dict[str, Any] = {}

        def push_to_first() -> None:
            try:
                s.ingest.PushFrames(endless(1), metadata=md, timeout=120)
                outcome["code"] = grpc.StatusCode.OK
            except grpc.RpcError as error:
                outcome["code"] = error.code()
                outcome["details"] = error.details()

        first = threading.Thread(target=push_to_first)
        first.start()
        deadline = time.monotonic() + 20
        while _lease_holders(s, "pushed-moving", ["gate"]).get("gate") != "replica-a":
            assert time.monotonic() < deadline, "the first stream never held the source"
            time.sleep(0.2)
        # The pusher reconnects elsewhere: a stream to the other replica is accepted.
        second_done: dict[str, Any] = {}

        def push_to_other() -> None:
            try:
                second_done["reply"] = on_other.PushFrames(
                    endless(10_000), metadata=md, timeout=120
                )
            except grpc.RpcError as error:
                second_done["code"] = error.code()

        second = threading.Thread(target=push_to_other)
        second.start()
        first.join(LEASE_S + 10)  # the old replica notices at its next renewal
        assert not first.is_alive(), "the first stream was never ended"
        assert outcome["code"] == grpc.StatusCode.ABORTED, outcome
        assert _lease_holders(s, "pushed-moving", ["gate"]).get("gate") == "replica-d"
        stop.set()
        second.join(30)
        assert "reply" in second_done, second_done
        assert second_done["reply"].frames_accepted >= 1
        s.ingest.StopStreamProcessor(
            I.StopStreamProcessorRequest(name=name), metadata=md, timeout=30
        )
    finally:
        stop.set()
        channel.close()
        other.process.send_signal(signal.SIGTERM)
        assert other.process.wait(30) == 0
        del s.stack.group.services["ingest-4"]
