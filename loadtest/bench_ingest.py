"""Video ingest on this machine: how many RTSP cameras one ingest replica keeps up with, and
what it costs against calling SearchFacesByImage on every frame.

Run by hand (not part of the test suite), with rtsp-server-perl installed:

    .venv/bin/python loadtest/bench_ingest.py --sources 1,2,4,6 --seconds 40 \
        --json var/bench_ingest.json

One run starts detection, embedding, search and the gateway (in-process onnxruntime,
``model_repository/`` or one built with ``facegrid models build``), a nats-server with
JetStream and one ingest replica, each as its own process, and enrols
misc/lin-manuel-miranda.png as subject ``lin-manuel-miranda`` in collection ``watchlist``.
The Hamilton clip (faces/video/short_hamilton_clip.mp4, 640x360, 9.2 s a loop; he is in
view for one stretch of each loop) is the camera. Then, in this order:

1. **Detection alone.** The clip decoded with PyAV, sampled at 2 fps, JPEG-encoded (q90,
   as ingest does), sent to DetectionService.DetectFaces (chips included, as ingest asks)
   back to back for --detect-seconds by one caller, then by two at once: frames/s, median
   and p99 ms. Frames/s of two callers / 2 fps is how many cameras detection alone could
   serve on this machine: an upper bound for the next part.
2. **Ingest, N cameras** (each N of --sources). An rtsp-server-perl relay with N paths,
   each pushed the clip looped in real time (started 9.2 s / N apart, so that he walks
   past the cameras at different times); a stream processor with N RTSP pull sources at
   2 fps, PURPOSE_WATCHLIST_MONITORING, suppression window 0 s (every visit of his is
   an event); a StreamMatchEvents subscriber (LATEST) opened before it starts. Once every
   source streams, --seconds are measured: the per-source counters of GetStreamProcessor
   (differences over the window), the events that arrived in it, and the CPU time of the
   ingest, detection, embedding and search processes (with their children, from
   /proc/PID/stat). Read:

   - *processed fps*: sampled - dropped frames per second, all sources together;
   - *drop rate*: dropped / sampled. N is **sustained** if it is under 1 %; the largest
     sustained N is the answer;
   - *events / source / loop*: each loop of the clip is meant as a new visit, so a new
     track: about 1 is right, more means a visit split into several tracks, fewer a missed
     visit or one track over several loops. At 2 fps the clip has no gap without a face
     longer than about 2 s (the tracker's max_gap_s), so a track can run on into the next
     loop (its event is sent once): compare *tracks / source / loop*;
   - *latency*: event create_time - capture_time of its best shot (the server's view) and
     arrival at the subscriber - capture_time (the reviewer's). The event is sent at the
     latest 2 s (max_event_delay) after the track begins, or when the track ends;
   - *CPU ms / frame*: CPU of those four processes / processed frames. Ingest's includes
     decoding every frame of every stream (30 fps of H.264) and the lease and NATS work.

3. **The naive way.** The same 2 fps frames of one camera, paced in real time (already
   decoded and encoded, so the caller's decoding is not counted), each sent to
   FaceService.SearchFacesByImage through the gateway (watch-list purpose, a case id),
   one call at a time for --seconds; a frame without a face (INVALID_ARGUMENT NO_FACE)
   counts as a call. A frame whose time slot passed while a call was running is skipped
   (counted). *events* here are calls that returned him: one per frame he is in, where
   ingest makes one per visit. CPU is that of the gateway, detection, embedding and search.

The summary compares the two per person who walks past (per loop of one camera): frames
processed, calls, events; and CPU per processed frame naive / ingest. The load average
before and after is recorded, since other work on the machine changes every figure.

Prints tables; writes every figure to --json PATH as well. Everything started here is
stopped on the way out, on errors and Ctrl-C too.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import grpc
from facegrid.auth import ALL_SCOPES, bearer_metadata, create_token
from facegrid.internal.v1 import detection_pb2, detection_pb2_grpc
from facegrid.v1 import (
    common_pb2,
    face_service_pb2,
    face_service_pb2_grpc,
    ingest_pb2,
    ingest_pb2_grpc,
    resources_pb2,
)
from facegrid_harness.launcher import FACE_SERVICES, ServiceGroup
from facegrid_harness.nats_server import NatsServer
from google.protobuf import duration_pb2
from PIL import Image
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.e2e.media_servers import RtspServer  # noqa: E402

FACES = Path(os.environ.get("FACEGRID_TEST_FACES", ROOT.parent / "shared" / "data" / "faces"))
CLIP = FACES / "video" / "short_hamilton_clip.mp4"
MIRANDA = FACES / "misc" / "lin-manuel-miranda.png"
SUBJECT = "lin-manuel-miranda"
COLLECTION_ID = "watchlist"
PARENT = f"collections/{COLLECTION_ID}"
SAMPLE_FPS = 2.0
JPEG_QUALITY = 90  # facegrid_ingest.pipeline.JPEG_QUALITY
DETECT_MAX_FACES = 100  # what ingest and the gateway ask detection for
CASE_ID = "BENCH-INGEST"
CALL_TIMEOUT_S = 30.0
STREAMING_TIMEOUT_S = 60.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
Purpose = common_pb2.IdentificationContext.Purpose
I = ingest_pb2  # noqa: E741


# ---------------------------------------------------------------- small helpers


def percentiles(values_ms: list[float]) -> dict[str, float | int | None]:
    """p50 and p99 (the rank rule of bench_search.py) of milliseconds; None when empty."""
    ordered = sorted(values_ms)
    if not ordered:
        return {"p50_ms": None, "p99_ms": None, "n": 0}
    return {
        "p50_ms": statistics.median(ordered),
        "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "n": len(ordered),
    }


def seconds_of(stamp: Any) -> float:
    """A google.protobuf.Timestamp as unix seconds."""
    return float(stamp.ToNanoseconds()) / 1e9


def identification_context() -> common_pb2.IdentificationContext:
    return common_pb2.IdentificationContext(
        purpose=Purpose.PURPOSE_WATCHLIST_MONITORING, case_id=CASE_ID, justification="benchmark"
    )


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, of every process visible in /proc."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(parent, []).append(int(entry.name))
    return tree


def _cpu_of(pid: int) -> float:
    """utime + stime of one process, in seconds (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of stat


def cpu_by_service(stack: Stack, services: tuple[str, ...]) -> dict[str, float]:
    """CPU seconds used so far by each of these services (with their children)."""
    return {name: cpu_seconds(stack.pids(name)) for name in services}


def cpu_difference(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {name: round(after[name] - before[name], 3) for name in after}


def cpu_seconds(pids: list[int]) -> float:
    """CPU seconds used so far by these processes and all their descendants."""
    tree = _children()
    total, todo, seen = 0.0, list(pids), set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += _cpu_of(pid)
        todo.extend(tree.get(pid, []))
    return total


# ---------------------------------------------------------------- the clip


@dataclass(frozen=True)
class Clip:
    jpegs: list[bytes]  # the 2 fps sample of one loop, JPEG q90
    loop_s: float  # how long one loop lasts when pushed (frames / frame rate)
    # CPU of decoding the whole clip and encoding its sample, per sampled frame: what a
    # naive integration pays too before its first call (the naive loop below starts from
    # these JPEGs, so this is added to its figure in the comparison).
    decode_cpu_ms_per_sampled_frame: float


def load_clip() -> Clip:
    """Decode the clip, keep a frame every 1 / SAMPLE_FPS s, JPEG-encode them."""
    jpegs: list[bytes] = []
    started = time.process_time()
    with av.open(str(CLIP)) as container:
        stream = container.streams.video[0]
        loop_s = float((stream.frames or 0) / stream.average_rate) if stream.average_rate else 0.0
        next_time: float | None = None
        for frame in container.decode(stream):
            when = float(frame.time or 0.0)
            if next_time is not None and when < next_time - 1e-6:
                continue
            next_time = when + 1 / SAMPLE_FPS
            out = io.BytesIO()
            Image.fromarray(frame.to_ndarray(format="rgb24")).save(
                out, format="JPEG", quality=JPEG_QUALITY
            )
            jpegs.append(out.getvalue())
    decode_ms = (time.process_time() - started) * 1000 / max(1, len(jpegs))
    return Clip(jpegs, loop_s or len(jpegs) / SAMPLE_FPS, decode_ms)


# ---------------------------------------------------------------- the stack


@dataclass
class Stack:
    group: ServiceGroup
    token: str
    channels: list[grpc.Channel] = field(default_factory=list)

    def metadata(self) -> tuple[tuple[str, str]]:
        return bearer_metadata(self.token)

    def channel(self, service: str) -> grpc.Channel:
        channel = grpc.insecure_channel(self.group.services[service].address)
        self.channels.append(channel)
        return channel

    def pids(self, *services: str) -> list[int]:
        return [self.group.services[name].process.pid for name in services]

    def close(self) -> None:
        for channel in self.channels:
            channel.close()


def model_repository(work: Path) -> Path:
    """``model_repository/`` if built, else one built now with ``facegrid models build``."""
    repo = ROOT / "model_repository"
    if (repo / "facegrid_models.json").is_file():
        return repo
    repo = work / "model_repository"
    print(f"building the models into {repo} ...", flush=True)
    facegrid = Path(sys.executable).with_name("facegrid")
    subprocess.run([str(facegrid), "models", "build", "--repo", str(repo)], check=True)
    return repo


@contextmanager
def running_stack(work: Path, full_frame_interval_s: float) -> Iterator[Stack]:
    """nats-server, the four services and one ingest replica; all stopped afterwards."""
    credentials = work / "credentials.json"
    token = create_token(credentials, "bench", ALL_SCOPES)
    repo = model_repository(work)
    with NatsServer(work / "nats") as nats:
        group = ServiceGroup(
            [
                "inference.backend=local",
                f"inference.model_repository={repo}",
                f"store.uri={work / 'facegrid.db'}",
                f"gateway.credentials_file={credentials}",
                f"gateway.audit_path={work / 'audit.db'}",
                f"ingest.nats_url={nats.url}",
                'ingest.allowed_hosts=["127.0.0.1"]',
                f"ingest.full_frame_interval_s={full_frame_interval_s}",
            ],
            log_dir=work / "logs",
        )
        stack = Stack(group, token)
        try:
            for name in FACE_SERVICES:
                started = time.perf_counter()
                group.start(name, port=0)
                print(f"  {name:10} healthy in {time.perf_counter() - started:5.1f} s", flush=True)
            group.start("ingest", port=0, instance="ingest", extra=["ingest.replica_id=bench"])
            print("  ingest     healthy", flush=True)
            yield stack
        finally:
            stack.close()
            group.stop()


def enrol(stack: Stack) -> None:
    """Collection ``watchlist`` with him alone, from lin-manuel-miranda.png."""
    faces = face_service_pb2_grpc.FaceServiceStub(stack.channel("gateway"))
    md = stack.metadata()
    faces.CreateCollection(
        face_service_pb2.CreateCollectionRequest(
            collection_id=COLLECTION_ID, collection=resources_pb2.Collection()
        ),
        metadata=md,
        timeout=CALL_TIMEOUT_S,
    )
    faces.CreateSubject(
        face_service_pb2.CreateSubjectRequest(
            parent=PARENT, subject_id=SUBJECT, subject=resources_pb2.Subject()
        ),
        metadata=md,
        timeout=CALL_TIMEOUT_S,
    )
    indexed = faces.IndexFaces(
        face_service_pb2.IndexFacesRequest(
            parent=PARENT, image=MIRANDA.read_bytes(), subject_id=SUBJECT
        ),
        metadata=md,
        timeout=CALL_TIMEOUT_S,
    )
    if len(indexed.face_records) != 1:
        raise RuntimeError(f"expected one face indexed from {MIRANDA}: {indexed}")


# ---------------------------------------------------------------- 1. detection alone


def bench_detection(stack: Stack, clip: Clip, seconds: float, callers: int) -> dict[str, Any]:
    """DetectFaces on the sampled frames, back to back, by ``callers`` threads at once."""
    detect = detection_pb2_grpc.DetectionServiceStub(stack.channel("detection"))
    requests = [
        detection_pb2.DetectFacesRequest(image=jpeg, max_faces=DETECT_MAX_FACES, include_chips=True)
        for jpeg in clip.jpegs
    ]
    for request in requests[:3]:  # warm-up
        detect.DetectFaces(request, timeout=CALL_TIMEOUT_S)

    def caller(offset: int, until: float) -> list[float]:
        times: list[float] = []
        index = offset
        while time.perf_counter() < until:
            started = time.perf_counter()
            detect.DetectFaces(requests[index % len(requests)], timeout=CALL_TIMEOUT_S)
            times.append((time.perf_counter() - started) * 1000)
            index += 1
        return times

    pids = stack.pids("detection")
    cpu_before = cpu_seconds(pids)
    started = time.perf_counter()
    until = started + seconds
    with ThreadPoolExecutor(callers) as pool:
        results = list(pool.map(lambda i: caller(i * 7, until), range(callers)))
    elapsed = time.perf_counter() - started
    times = [t for result in results for t in result]
    return {
        "callers": callers,
        "seconds": elapsed,
        "frames": len(times),
        "frames_per_s": len(times) / elapsed,
        "cpu_ms_per_frame": (cpu_seconds(pids) - cpu_before) * 1000 / max(1, len(times)),
        **percentiles(times),
    }


# ---------------------------------------------------------------- 2. ingest, N cameras


class Subscriber:
    """StreamMatchEvents in a thread: every event with the wall time it arrived."""

    def __init__(self, stack: Stack, processor: str) -> None:
        ingest = ingest_pb2_grpc.IngestServiceStub(stack.channel("ingest"))
        self.events: list[tuple[float, ingest_pb2.MatchEvent]] = []
        self._call = ingest.StreamMatchEvents(
            I.StreamMatchEventsRequest(
                stream_processor=processor,
                start_position=I.StreamMatchEventsRequest.START_POSITION_LATEST,
            ),
            metadata=stack.metadata(),
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for message in self._call:
                if message.HasField("event"):
                    self.events.append((time.time(), message.event))
        except grpc.RpcError:
            pass  # cancelled

    def close(self) -> None:
        self._call.cancel()
        self._thread.join(timeout=10)


def counters(ingest: ingest_pb2_grpc.IngestServiceStub, name: str, md: Any) -> dict[str, Any]:
    """source_id -> its counters, and the processor's state."""
    got = ingest.GetStreamProcessor(
        I.GetStreamProcessorRequest(name=name), metadata=md, timeout=CALL_TIMEOUT_S
    ).stream_processor
    return {
        "state": got.state,
        "sources": {
            s.source_id: {
                "state": s.state,
                "status_message": s.status_message,
                **{
                    key: getattr(s.counters, key)
                    for key in (
                        "frames_received",
                        "frames_sampled",
                        "frames_dropped",
                        "frames_rejected",
                        "reconnects",
                        "tracks",
                        "events",
                        "full_frame_detections",
                        "region_detections",
                        "detections_skipped",
                    )
                },
            }
            for s in got.sources
        },
    }


def wait_streaming(ingest: ingest_pb2_grpc.IngestServiceStub, name: str, md: Any) -> None:
    """Until every source streams and has sampled a frame."""
    deadline = time.monotonic() + STREAMING_TIMEOUT_S
    while True:
        now = counters(ingest, name, md)["sources"]
        if all(
            s["state"] == I.VideoSource.STATE_STREAMING and s["frames_sampled"] > 0
            for s in now.values()
        ):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"sources not streaming after {STREAMING_TIMEOUT_S} s: {now}")
        time.sleep(0.5)


@contextmanager
def cameras(clip: Clip, n: int) -> Iterator[RtspServer]:
    """A relay with paths cam0..cam{n-1}, each pushed the looped clip, started staggered."""
    with RtspServer(udp_ports=max(64, 16 * n)) as rtsp:
        for index in range(n):
            if index:
                time.sleep(clip.loop_s / n)
            rtsp.start_pusher(CLIP, f"cam{index}", loop=True)
        yield rtsp


def create_processor(
    ingest: ingest_pb2_grpc.IngestServiceStub, processor_id: str, urls: list[str], md: Any
) -> str:
    processor = I.StreamProcessor(
        display_name=processor_id,
        sources=[
            I.VideoSource(source_id=f"cam{i}", pull=I.PullSource(url=url))
            for i, url in enumerate(urls)
        ],
        collection=PARENT,
        frames_per_second=SAMPLE_FPS,
        context=identification_context(),
        suppression_window=duration_pb2.Duration(seconds=0),
    )
    created = ingest.CreateStreamProcessor(
        I.CreateStreamProcessorRequest(
            stream_processor_id=processor_id, stream_processor=processor
        ),
        metadata=md,
        timeout=CALL_TIMEOUT_S,
    )
    return str(created.stream_processor.name)


def summarise_ingest(
    n: int,
    clip: Clip,
    window: tuple[float, float],
    before: dict[str, Any],
    after: dict[str, Any],
    events: list[tuple[float, ingest_pb2.MatchEvent]],
    cpu_s: float,
) -> dict[str, Any]:
    """The figures of one N from counters before/after, events and CPU."""
    start, end = window
    seconds = end - start
    keys = (
        "frames_received",
        "frames_sampled",
        "frames_dropped",
        "tracks",
        "events",
        "full_frame_detections",
        "region_detections",
        "detections_skipped",
    )
    per_source = {
        source: {key: after["sources"][source][key] - old[key] for key in keys}
        for source, old in before["sources"].items()
    }
    for source, figures in per_source.items():
        figures["reconnects"] = after["sources"][source]["reconnects"]
    total = {key: sum(s[key] for s in per_source.values()) for key in keys}
    processed = total["frames_sampled"] - total["frames_dropped"]
    in_window = [(arrived, e) for arrived, e in events if start <= arrived <= end]
    loops = seconds / clip.loop_s
    drop_rate = total["frames_dropped"] / total["frames_sampled"] if total["frames_sampled"] else 0
    return {
        "sources": n,
        "seconds": seconds,
        "per_source": per_source,
        "totals": total,
        "processed_frames": processed,
        "processed_fps": processed / seconds,
        "sampled_fps": total["frames_sampled"] / seconds,
        "drop_rate": drop_rate,
        "sustained": drop_rate < 0.01,
        "clip_loops_per_source": loops,
        "events_received": len(in_window),
        "events_of_subject": sum(
            1 for _, e in in_window if e.matches[0].face.subject_id == SUBJECT
        ),
        "events_per_source_per_loop": len(in_window) / (n * loops),
        "tracks_per_source_per_loop": total["tracks"] / (n * loops),
        "events_by_source": {
            s: sum(1 for _, e in in_window if e.source_id == s) for s in per_source
        },
        "create_minus_capture": percentiles(
            [(seconds_of(e.create_time) - seconds_of(e.capture_time)) * 1000 for _, e in in_window]
        ),
        "arrival_minus_capture": percentiles(
            [(arrived - seconds_of(e.capture_time)) * 1000 for arrived, e in in_window]
        ),
        "cpu_s": cpu_s,
        "cpu_ms_per_processed_frame": cpu_s * 1000 / processed if processed else None,
        "cpu_cores_busy": cpu_s / seconds,
    }


def bench_ingest(stack: Stack, clip: Clip, n: int, seconds: float) -> dict[str, Any]:
    """N cameras through one stream processor for ``seconds``; its figures."""
    ingest = ingest_pb2_grpc.IngestServiceStub(stack.channel("ingest"))
    md = stack.metadata()
    services = ("ingest", "detection", "embedding", "search")
    pids = stack.pids(*services)
    with ExitStack() as cleanup:
        rtsp = cleanup.enter_context(cameras(clip, n))
        name = create_processor(
            ingest, f"bench-{n}-cameras", [rtsp.url(f"cam{i}") for i in range(n)], md
        )
        cleanup.callback(
            ingest.DeleteStreamProcessor,
            I.DeleteStreamProcessorRequest(name=name),
            metadata=md,
            timeout=CALL_TIMEOUT_S,
        )
        subscriber = Subscriber(stack, name)
        cleanup.callback(subscriber.close)
        time.sleep(0.5)  # the subscription is in place before anything can happen
        ingest.StartStreamProcessor(
            I.StartStreamProcessorRequest(name=name), metadata=md, timeout=CALL_TIMEOUT_S
        )
        wait_streaming(ingest, name, md)
        split_before = cpu_by_service(stack, services)
        before, cpu_before, start = counters(ingest, name, md), cpu_seconds(pids), time.time()
        time.sleep(seconds)
        after, cpu_after, end = counters(ingest, name, md), cpu_seconds(pids), time.time()
        split = cpu_difference(cpu_by_service(stack, services), split_before)
        time.sleep(1.0)  # events of the window still on their way
        ingest.StopStreamProcessor(
            I.StopStreamProcessorRequest(name=name), metadata=md, timeout=CALL_TIMEOUT_S
        )
        figures = summarise_ingest(
            n, clip, (start, end), before, after, list(subscriber.events), cpu_after - cpu_before
        )
        figures["processor_state_at_end"] = I.StreamProcessor.State.Name(after["state"])
        figures["cpu_s_by_service"] = split
        return figures


# ---------------------------------------------------------------- 3. the naive way


def bench_naive(stack: Stack, clip: Clip, seconds: float) -> dict[str, Any]:
    """SearchFacesByImage on every 2 fps frame of one camera, paced in real time."""
    faces = face_service_pb2_grpc.FaceServiceStub(stack.channel("gateway"))
    md = stack.metadata()
    services = ("gateway", "detection", "embedding", "search")
    pids = stack.pids(*services)

    def request(jpeg: bytes) -> face_service_pb2.SearchFacesByImageRequest:
        return face_service_pb2.SearchFacesByImageRequest(
            parent=PARENT, image=jpeg, max_faces=5, context=identification_context()
        )

    requests = [request(jpeg) for jpeg in clip.jpegs]
    times: list[float] = []
    outcome = {"calls": 0, "matches_of_subject": 0, "no_face": 0, "errors": 0, "skipped": 0}
    split_before = cpu_by_service(stack, services)
    cpu_before, start = cpu_seconds(pids), time.perf_counter()
    slot = 0
    while True:
        due = start + slot / SAMPLE_FPS
        if due >= start + seconds:
            break
        time.sleep(max(0.0, due - time.perf_counter()))
        called = time.perf_counter()
        try:
            reply = faces.SearchFacesByImage(
                requests[slot % len(requests)], metadata=md, timeout=CALL_TIMEOUT_S
            )
            matches = reply.face_matches
            if matches and matches[0].face.subject_id == SUBJECT:
                outcome["matches_of_subject"] += 1
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                outcome["no_face"] += 1
            else:
                outcome["errors"] += 1
        times.append((time.perf_counter() - called) * 1000)
        outcome["calls"] += 1
        # The next frame is the one due now: slots that passed during the call are skipped.
        next_slot = max(slot + 1, int((time.perf_counter() - start) * SAMPLE_FPS))
        outcome["skipped"] += next_slot - slot - 1
        slot = next_slot
    elapsed = time.perf_counter() - start
    cpu_s = cpu_seconds(pids) - cpu_before
    split = cpu_difference(cpu_by_service(stack, services), split_before)
    loops = elapsed / clip.loop_s
    return {
        "seconds": elapsed,
        **outcome,
        "calls_per_s": outcome["calls"] / elapsed,
        "latency": percentiles(times),
        "clip_loops": loops,
        "calls_per_loop": outcome["calls"] / loops,
        "events_per_loop": outcome["matches_of_subject"] / loops,
        "cpu_s": cpu_s,
        "cpu_ms_per_processed_frame": cpu_s * 1000 / max(1, outcome["calls"]),
        "cpu_s_by_service": split,
    }


# ---------------------------------------------------------------- report


def compare(figures: dict[str, Any]) -> dict[str, Any]:
    """Largest sustained N, and naive against ingest per person who walks past."""
    runs = figures["ingest"]
    sustained = [r["sources"] for r in runs if r["sustained"]]
    one = min(runs, key=lambda r: r["sources"])  # the fairest match for one naive camera
    naive = figures["naive"]
    ingest_cpu = one["cpu_ms_per_processed_frame"]
    return {
        "sustained_sources": max(sustained) if sustained else 0,
        "detection_bound_sources": figures["detection"]["2_callers"]["frames_per_s"] / SAMPLE_FPS,
        "per_person_walking_past": {
            "ingest": {
                "frames_processed": one["processed_frames"]
                / (one["sources"] * one["clip_loops_per_source"]),
                "events": one["events_per_source_per_loop"],
                "from_sources": one["sources"],
            },
            "naive": {"calls": naive["calls_per_loop"], "events": naive["events_per_loop"]},
        },
        "cpu_per_frame_naive_over_ingest": (
            naive["cpu_ms_per_processed_frame"] / ingest_cpu if ingest_cpu else None
        ),
        "naive_decode_cpu_ms_per_frame": figures["clip"]["decode_cpu_ms_per_sampled_frame"],
        "cpu_per_frame_naive_with_decoding_over_ingest": (
            (
                naive["cpu_ms_per_processed_frame"]
                + figures["clip"]["decode_cpu_ms_per_sampled_frame"]
            )
            / ingest_cpu
            if ingest_cpu
            else None
        ),
    }


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def print_tables(figures: dict[str, Any]) -> None:
    console = Console() if sys.stdout.isatty() else Console(width=160)  # no wrapping in logs
    detection = Table(title="DetectionService.DetectFaces, 640x360 JPEG frames of the clip")
    for column in ("callers", "frames/s", "p50 ms", "p99 ms", "CPU ms/frame"):
        detection.add_column(column, justify="right")
    for run in figures["detection"].values():
        detection.add_row(
            str(run["callers"]),
            fmt(run["frames_per_s"], ".2f"),
            fmt(run["p50_ms"]),
            fmt(run["p99_ms"]),
            fmt(run["cpu_ms_per_frame"], ".0f"),
        )
    console.print(detection)

    ingest = Table(title=f"Ingest, N RTSP cameras at {SAMPLE_FPS:g} fps, one replica")
    columns = (
        "N",
        "processed fps",
        "drop rate",
        "tracks/source/loop",
        "events/source/loop",
        "create-capture ms p50/p99",
        "arrival-capture ms p50/p99",
        "CPU ms/frame",
        "cores busy",
        "sustained",
    )
    for column in columns:
        ingest.add_column(column, justify="right")
    for run in figures["ingest"]:
        created, arrived = run["create_minus_capture"], run["arrival_minus_capture"]
        ingest.add_row(
            str(run["sources"]),
            fmt(run["processed_fps"], ".2f"),
            f"{run['drop_rate']:.1%}",
            fmt(run["tracks_per_source_per_loop"], ".2f"),
            fmt(run["events_per_source_per_loop"], ".2f"),
            f"{fmt(created['p50_ms'], '.0f')} / {fmt(created['p99_ms'], '.0f')}",
            f"{fmt(arrived['p50_ms'], '.0f')} / {fmt(arrived['p99_ms'], '.0f')}",
            fmt(run["cpu_ms_per_processed_frame"], ".0f"),
            fmt(run["cpu_cores_busy"], ".2f"),
            "yes" if run["sustained"] else "no",
        )
    console.print(ingest)

    naive = figures["naive"]
    console.print(
        f"naive, one camera, SearchFacesByImage per frame: {naive['calls']} calls "
        f"({naive['calls_per_s']:.2f}/s, {naive['skipped']} frames skipped while busy), "
        f"{naive['no_face']} NO_FACE, {naive['errors']} other errors, "
        f"{naive['matches_of_subject']} returned him; latency p50 "
        f"{fmt(naive['latency']['p50_ms'], '.0f')} ms, p99 "
        f"{fmt(naive['latency']['p99_ms'], '.0f')} ms; "
        f"CPU {naive['cpu_ms_per_processed_frame']:.0f} ms/frame"
    )
    summary = figures["summary"]
    per = summary["per_person_walking_past"]
    table = Table(title="Per person who walks past one camera (one loop of the clip)")
    for column in ("way", "frames processed / calls", "events"):
        table.add_column(column, justify="right")
    table.add_row(
        f"ingest (N={per['ingest']['from_sources']})",
        fmt(per["ingest"]["frames_processed"]),
        fmt(per["ingest"]["events"], ".2f"),
    )
    table.add_row("naive", fmt(per["naive"]["calls"]), fmt(per["naive"]["events"], ".2f"))
    console.print(table)
    console.print(
        f"sustained: {summary['sustained_sources']} camera(s) (detection alone bounds it at "
        f"{summary['detection_bound_sources']:.1f}); CPU per processed frame naive / ingest: "
        f"{fmt(summary['cpu_per_frame_naive_over_ingest'], '.2f')}x (with the naive "
        "integration's own decoding, "
        f"{fmt(summary['cpu_per_frame_naive_with_decoding_over_ingest'], '.2f')}x); "
        "load average before "
        f"{figures['load_average_before']}, after {figures['load_average_after']}"
    )


def run_all(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    clip = load_clip()
    figures: dict[str, Any] = {
        "machine_cores": os.cpu_count(),
        "clip": {
            "path": str(CLIP),
            "loop_s": clip.loop_s,
            "sampled_frames": len(clip.jpegs),
            "decode_cpu_ms_per_sampled_frame": clip.decode_cpu_ms_per_sampled_frame,
        },
        "sample_fps": SAMPLE_FPS,
        "seconds": args.seconds,
        "load_average_before": os.getloadavg(),
    }
    print(f"work folder {work}", flush=True)
    figures["full_frame_interval_s"] = args.full_frame_interval
    with running_stack(work, args.full_frame_interval) as stack:
        try:
            enrol(stack)
            figures["detection"] = {}
            for callers in (1, 2):
                print(f"detection alone, {callers} caller(s) ...", flush=True)
                figures["detection"][f"{callers}_callers"] = bench_detection(
                    stack, clip, args.detect_seconds, callers
                )
            figures["ingest"] = []
            for n in args.sources:
                print(f"ingest, {n} camera(s) ...", flush=True)
                figures["ingest"].append(bench_ingest(stack, clip, n, args.seconds))
            print("naive, SearchFacesByImage per frame ...", flush=True)
            figures["naive"] = bench_naive(stack, clip, args.seconds)
        except Exception:  # not on Ctrl-C: the work folder goes
            print(f"service logs in {work / 'logs'} (kept)", file=sys.stderr)
            args.keep_dir = True
            raise
    figures["load_average_after"] = os.getloadavg()
    figures["summary"] = compare(figures)
    return figures


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sources",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[1, 2, 4, 6],
        help="camera counts to run, comma-separated",
    )
    parser.add_argument("--seconds", type=float, default=40.0, help="measured time of each run")
    parser.add_argument(
        "--detect-seconds", type=float, default=30.0, help="time of each detection-alone run"
    )
    parser.add_argument(
        "--full-frame-interval",
        type=float,
        default=1.5,
        help="ingest.full_frame_interval_s (default: its default, 1.5; 0: every frame in full)",
    )
    parser.add_argument("--keep-dir", action="store_true", help="keep the work folder")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args()


def stop_on_signals() -> None:
    """Ctrl-C and SIGTERM unwind through the finally blocks that stop every process (SIGINT
    too when a non-interactive shell started this in the background, which ignores it)."""

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, terminate)


def main() -> None:
    args = parse_args()
    stop_on_signals()
    for needed in (CLIP, MIRANDA):
        if not needed.is_file():
            raise SystemExit(f"{needed} is missing")
    if shutil.which("rtsp-server-perl") is None:
        raise SystemExit("rtsp-server-perl is not installed (apt-get install rtsp-server-perl)")
    work = Path(tempfile.mkdtemp(prefix="facegrid-ingest-bench-"))
    try:
        figures = run_all(args, work)
    finally:
        if not args.keep_dir:
            shutil.rmtree(work, ignore_errors=True)
    print_tables(figures)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
