"""Pull sources against real media: files, a real RTSP relay, a real HTTP server.

The RTSP tests run Debian's rtsp-server-perl with the Hamilton clip pushed into it in real
time (tests/e2e/media_servers.py), unplug the "camera" and plug it back in. The URL policy
tests at the end are plain unit tests.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import av
import numpy as np
import pytest
from facegrid_harness.processes import free_port
from facegrid_ingest.sources import Frame, PullReader, SourceState
from facegrid_ingest.urls import PullUrl, UrlRejected, masked, parse_pull_url
from media_servers import HttpFileServer, RtspServer, make_hls, pid_alive

pytestmark = pytest.mark.timeout(60)

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
CLIP = SHARED_DATA / "faces" / "video" / "short_hamilton_clip.mp4"  # 640x360, 29.97 fps, 10 s
ARCADE = SHARED_DATA / "video" / "arcade-walking.mp4"  # 1920x1080, 25 fps, 4.2 s

needs_clip = pytest.mark.skipif(
    not CLIP.is_file(), reason=f"test clip not found ({CLIP}: ../shared/data is absent)"
)
needs_rtsp = pytest.mark.skipif(
    shutil.which("rtsp-server-perl") is None,
    reason="rtsp-server-perl is not installed (Debian package rtsp-server-perl)",
)

T = TypeVar("T")


@pytest.fixture(autouse=True)
def no_reader_thread_left() -> Iterator[None]:
    """Every test must let its readers' threads finish (they are named "pull <url>")."""
    yield
    deadline = time.monotonic() + 6.0
    while True:
        left = [t.name for t in threading.enumerate() if t.name.startswith("pull ")]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not left, f"reader threads still running: {left}"


def run(make: Callable[[], Awaitable[T]], timeout_s: float = 50.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(make(), timeout_s)

    return asyncio.run(bounded())


@dataclass
class Consumer:
    """Iterates a reader in a task, keeping what the tests look at (not the pixels)."""

    reader: PullReader
    delay_s: float = 0.0
    frames: list[tuple[int, float, tuple[int, ...]]] = field(default_factory=list)
    states: list[tuple[SourceState, str]] = field(default_factory=list)
    callback_threads: set[int] = field(default_factory=set)
    task: asyncio.Task[None] | None = None

    def start(self) -> Consumer:
        self.task = asyncio.create_task(self._consume())
        return self

    async def _consume(self) -> None:
        async for frame in self.reader.frames():
            self.frames.append((frame.index, frame.capture_time, frame.image.shape))
            assert frame.image.dtype.name == "uint8"
            assert frame.image.flags.c_contiguous
            if self.delay_s:
                await asyncio.sleep(self.delay_s)

    async def until(self, condition: Callable[[], bool], timeout_s: float, what: str) -> float:
        """Wait until ``condition()``; return the seconds it took."""
        start = time.monotonic()
        while not condition():
            if self.task is not None and self.task.done():
                self.task.result()  # raise what the consumer raised
                if not condition():
                    raise AssertionError(f"the reader ended before {what}: {self.reader.message}")
            if time.monotonic() - start > timeout_s:
                raise AssertionError(
                    f"no {what} after {timeout_s} s; state {self.reader.state.name}: "
                    f"{self.reader.message}"
                )
            await asyncio.sleep(0.02)
        return time.monotonic() - start

    async def finish(self, timeout_s: float = 30.0) -> None:
        assert self.task is not None
        await asyncio.wait_for(self.task, timeout_s)


def make_reader(url: str, consumer_delay_s: float = 0.0, **options: Any) -> Consumer:
    """A reader whose on_state reports land in the returned Consumer."""
    states: list[tuple[SourceState, str]] = []
    threads: set[int] = set()

    def on_state(state: SourceState, message: str) -> None:
        states.append((state, message))
        threads.add(threading.get_ident())

    reader = PullReader(url, on_state=on_state, **options)
    return Consumer(reader, consumer_delay_s, states=states, callback_threads=threads)


def assert_increasing(values: list[float]) -> None:
    assert all(b > a for a, b in itertools.pairwise(values)), values


# ------------------------------------------------------------------ files


@needs_clip
def test_file_plays_in_real_time_at_the_sample_rate() -> None:
    async def body() -> tuple[Consumer, float]:
        consumer = make_reader(CLIP.as_uri(), sample_fps=2.0).start()
        started = time.monotonic()
        await consumer.finish()
        return consumer, time.monotonic() - started

    consumer, elapsed = run(body)
    reader = consumer.reader
    assert 15 <= len(consumer.frames) <= 25, len(consumer.frames)
    assert {shape for _, _, shape in consumer.frames} == {(360, 640, 3)}
    captures = [capture for _, capture, _ in consumer.frames]
    assert_increasing(captures)
    assert_increasing([float(index) for index, _, _ in consumer.frames])
    gaps = [b - a for a, b in itertools.pairwise(captures)]
    assert all(0.45 <= gap <= 0.6 for gap in gaps), gaps
    # Paced like a camera: 9.2 s of video take about that long, and capture times track
    # the wall clock.
    assert 8.0 <= elapsed <= 12.0, elapsed
    assert abs(captures[-1] - time.time()) < 2.0
    assert reader.frames_received == 275
    assert reader.frames_sampled == len(consumer.frames)
    assert reader.frames_dropped == 0
    assert reader.reconnects == 0
    assert reader.state is SourceState.ENDED
    assert [state for state, _ in consumer.states] == [
        SourceState.CONNECTING,
        SourceState.STREAMING,
        SourceState.ENDED,
    ]
    assert consumer.callback_threads == {threading.get_ident()}  # on the loop's thread
    assert reader.join(5.0)


@needs_clip
def test_file_without_realtime_waits_for_the_consumer() -> None:
    async def body() -> Consumer:
        consumer = make_reader(CLIP.as_uri(), sample_fps=1000.0, realtime=False)
        consumer.delay_s = 0.001
        consumer.start()
        await consumer.finish()
        return consumer

    consumer = run(body)
    reader = consumer.reader
    assert [index for index, _, _ in consumer.frames] == list(range(275))
    assert reader.frames_dropped == 0
    assert reader.state is SourceState.ENDED
    assert_increasing([capture for _, capture, _ in consumer.frames])
    assert reader.join(5.0)


@needs_clip
def test_file_loop_restarts_and_keeps_time_increasing() -> None:
    async def body() -> Consumer:
        consumer = make_reader(CLIP.as_uri(), sample_fps=1000.0, realtime=False, loop=True)
        consumer.start()
        await consumer.until(lambda: len(consumer.frames) >= 600, 30.0, "second loop")
        consumer.reader.stop()
        await consumer.finish(5.0)
        return consumer

    consumer = run(body)
    indices = [index for index, _, _ in consumer.frames]
    assert indices[:600] == list(range(600))
    captures = [capture for _, capture, _ in consumer.frames]
    assert_increasing(captures)
    # The seam is one frame interval, as if the file went on.
    assert captures[275] - captures[274] == pytest.approx(1 / 29.97, abs=0.005)
    assert consumer.reader.reconnects == 0
    assert consumer.reader.join(5.0)  # the reading thread reports its end as it leaves
    assert consumer.reader.state is SourceState.ENDED
    assert consumer.reader.message == "stopped"


def test_audio_only_file_fails_as_not_a_video(tmp_path: Path) -> None:
    path = tmp_path / "tone.m4a"  # an mp4 container, so only the missing video is wrong
    with av.open(str(path), "w", format="mp4") as output:
        stream = output.add_stream("aac", rate=8000)
        silence = np.zeros((1, 8000), dtype=np.float32)
        frame = av.AudioFrame.from_ndarray(silence, format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            output.mux(packet)

    async def body() -> Consumer:
        consumer = make_reader(path.as_uri(), sample_fps=2.0).start()
        await consumer.finish(10.0)
        return consumer

    consumer = run(body)
    assert consumer.frames == []
    assert consumer.reader.state is SourceState.FAILED
    assert "not a video" in consumer.reader.message
    assert "no video stream" in consumer.reader.message


def test_missing_file_fails(tmp_path: Path) -> None:
    async def body() -> Consumer:
        consumer = make_reader((tmp_path / "absent.mp4").as_uri(), sample_fps=2.0).start()
        await consumer.finish(10.0)
        return consumer

    consumer = run(body)
    assert consumer.reader.state is SourceState.FAILED
    assert "No such file" in consumer.reader.message
    assert consumer.reader.reconnects == 0


@pytest.mark.skipif(not ARCADE.is_file(), reason=f"{ARCADE} not found")
def test_slow_consumer_gets_the_newest_frame_and_nothing_queues() -> None:
    """1080p at 25 fps into a consumer taking 0.25 s a frame: the slot holds one frame."""

    def rss_bytes() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    live_frames: list[int] = []

    async def body() -> Consumer:
        consumer = make_reader(ARCADE.as_uri(), consumer_delay_s=0.25, sample_fps=25.0)
        consumer.start()
        await consumer.until(lambda: len(consumer.frames) >= 2, 10.0, "first frames")
        baseline = rss_bytes()
        assert consumer.task is not None
        while not consumer.task.done():
            live_frames.append(sum(isinstance(o, Frame) for o in gc.get_objects()))
            await asyncio.sleep(0.3)
        await consumer.finish()
        growth = rss_bytes() - baseline
        # ~80 sampled 1080p frames are 6.2 MB each: 500 MB if they queued.
        assert growth < 150 * 2**20, growth
        return consumer

    consumer = run(body)
    reader = consumer.reader
    assert reader.frames_received == 105  # every frame of the 4.2 s decoded ...
    assert reader.frames_sampled >= 90  # ... nearly all sampled at 25 fps ...
    assert reader.frames_dropped > 50  # ... most overwritten before the consumer came
    assert len(consumer.frames) + reader.frames_dropped == reader.frames_sampled
    assert max(live_frames) <= 3, live_frames  # the slot, the consumer's, one in hand
    indices = [index for index, _, _ in consumer.frames]
    assert_increasing([float(index) for index in indices])
    assert max(b - a for a, b in itertools.pairwise(indices)) >= 4


# ------------------------------------------------------------------- HTTP


@needs_clip
def test_http_mp4_yields_frames() -> None:
    async def body(url: str) -> Consumer:
        consumer = make_reader(url, sample_fps=5.0).start()
        await consumer.until(lambda: len(consumer.frames) >= 5, 15.0, "five frames")
        assert consumer.reader.state is SourceState.STREAMING
        await consumer.reader.aclose(10.0)
        await consumer.finish(5.0)
        return consumer

    with HttpFileServer(CLIP.parent) as server:
        consumer = run(lambda: body(server.url(CLIP.name)))
    assert {shape for _, _, shape in consumer.frames} == {(360, 640, 3)}
    captures = [capture for _, capture, _ in consumer.frames]
    assert_increasing(captures)
    # A finite HTTP resource is paced like a file: 5 frames at 5 fps take about 1 s.
    assert 0.6 <= captures[4] - captures[0] <= 1.2
    assert consumer.reader.reconnects == 0


@pytest.mark.parametrize("name", ["notes.txt", "notes.nfo", "index.html"])
def test_http_text_fails_as_not_a_video(tmp_path: Path, name: str) -> None:
    # .nfo is the trap: FFmpeg's "tty" demuxer would render it as ANSI-art video.
    (tmp_path / name).write_text("This is not a video.\n" * 50)

    async def body(url: str) -> Consumer:
        consumer = make_reader(url, sample_fps=2.0).start()
        await consumer.finish(10.0)
        return consumer

    with HttpFileServer(tmp_path) as server:
        consumer = run(lambda: body(server.url(name)))
    assert consumer.frames == []
    assert consumer.reader.state is SourceState.FAILED
    assert "not a video" in consumer.reader.message
    assert consumer.reader.reconnects == 0


@needs_clip
def test_hls_playlist_yields_frames_through_checked_fetches(tmp_path: Path) -> None:
    make_hls(CLIP, tmp_path / "hls")

    async def body(url: str) -> Consumer:
        consumer = make_reader(url, sample_fps=5.0, allowed_hosts=["127.0.0.1"]).start()
        await consumer.until(lambda: len(consumer.frames) >= 12, 20.0, "twelve frames")
        assert consumer.reader.state is SourceState.STREAMING
        await consumer.reader.aclose(10.0)
        await consumer.finish(5.0)
        return consumer

    with HttpFileServer(tmp_path / "hls") as server:
        consumer = run(lambda: body(server.url("index.m3u8")))
        requested = list(server.requests)
    assert {shape for _, _, shape in consumer.frames} == {(360, 640, 3)}
    assert_increasing([capture for _, capture, _ in consumer.frames])
    # 12 frames at 5 fps span more than one 2 s segment: the playlist, then segments.
    assert requested[0] == "/index.m3u8"
    assert "/index0.ts" in requested
    assert "/index1.ts" in requested


@needs_clip
def test_hls_segment_on_a_host_not_allowed_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "hls"
    playlist = make_hls(CLIP, folder)
    # The playlist names its segments on another host, which the policy does not allow.
    text = playlist.read_text()
    playlist.write_text(text.replace("index", "http://127.0.0.2:9/index"))

    async def body(url: str) -> Consumer:
        consumer = make_reader(url, sample_fps=2.0, allowed_hosts=["127.0.0.1"]).start()
        await consumer.finish(15.0)
        return consumer

    with HttpFileServer(folder) as server:
        consumer = run(lambda: body(server.url("index.m3u8")))
    assert consumer.frames == []
    assert consumer.reader.state is SourceState.FAILED
    assert "127.0.0.2" in consumer.reader.message
    assert "not in the allowed host list" in consumer.reader.message


# ------------------------------------------------------------ unreachable


def test_unreachable_rtsp_retries_with_backoff_and_stops_promptly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"rtsp://viewer:hunter2@127.0.0.1:{free_port()}/cam0"  # nothing listens there

    async def body() -> tuple[Consumer, float, float]:
        consumer = make_reader(url, sample_fps=2.0, backoff_initial_s=0.2, backoff_max_s=0.4)
        consumer.start()
        await consumer.until(
            lambda: consumer.reader.state is SourceState.RECONNECTING, 5.0, "RECONNECTING"
        )
        await consumer.until(lambda: consumer.reader.reconnects >= 2, 5.0, "retries")
        started = time.monotonic()
        consumer.reader.stop()
        stop_s = time.monotonic() - started
        await consumer.finish(2.0)
        return consumer, stop_s, time.monotonic() - started

    with caplog.at_level(logging.DEBUG, logger="facegrid_ingest"):
        consumer, stop_s, end_s = run(body)
    assert stop_s < 0.05
    assert end_s < 0.5
    assert consumer.reader.join(2.0)
    retrying = [message for state, message in consumer.states if state is SourceState.RECONNECTING]
    assert retrying
    assert "Connection refused" in retrying[0]
    # Credentials never reach a message or a log line; the user name does.
    everything = " ".join(retrying) + caplog.text + consumer.reader.message
    assert "hunter2" not in everything
    assert "viewer:***@" in retrying[0]


@pytest.mark.parametrize("scheme", ["rtsp", "http"])
def test_silent_server_times_out_instead_of_hanging(scheme: str) -> None:
    """A server that accepts and never answers: the open gives up, the reader retries."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    url = f"{scheme}://127.0.0.1:{listener.getsockname()[1]}/cam0"

    async def body() -> tuple[Consumer, float]:
        consumer = make_reader(url, sample_fps=2.0, open_timeout_s=1.0, read_timeout_s=1.0)
        consumer.start()
        took = await consumer.until(
            lambda: consumer.reader.state is SourceState.RECONNECTING, 5.0, "a timeout"
        )
        await consumer.reader.aclose(3.0)
        await consumer.finish(2.0)
        return consumer, took

    try:
        consumer, took = run(body)
    finally:
        listener.close()
    assert took < 2.5
    assert consumer.reader.join(0.1)
    assert consumer.frames == []


# ------------------------------------------------------------------- RTSP


@pytest.fixture
def rtsp_server() -> Iterator[RtspServer]:
    server = RtspServer()
    try:
        with server:
            yield server
    finally:
        pids = server.pids()
        server.stop()
    time.sleep(0.1)
    assert not [pid for pid in pids if pid_alive(pid)], "a media server process was left behind"


@needs_rtsp
@needs_clip
def test_rtsp_frames_arrive(rtsp_server: RtspServer) -> None:
    rtsp_server.start_pusher(CLIP)

    async def body() -> Consumer:
        consumer = make_reader(rtsp_server.url(), sample_fps=5.0, read_timeout_s=3.0).start()
        await consumer.until(lambda: len(consumer.frames) >= 10, 15.0, "ten frames")
        assert consumer.reader.state is SourceState.STREAMING
        await consumer.reader.aclose(5.0)
        await consumer.finish(5.0)
        return consumer

    consumer = run(body)
    assert {shape for _, _, shape in consumer.frames} == {(360, 640, 3)}
    captures = [capture for _, capture, _ in consumer.frames]
    assert_increasing(captures)
    assert abs(captures[-1] - time.time()) < 2.0  # live: capture times are about now
    gaps = [b - a for a, b in itertools.pairwise(captures[2:])]
    assert all(0.1 <= gap <= 0.5 for gap in gaps), gaps  # about 5 fps
    assert consumer.states[0][0] is SourceState.CONNECTING
    assert consumer.states[1][0] is SourceState.STREAMING


@needs_rtsp
@needs_clip
def test_rtsp_outage_reconnects(rtsp_server: RtspServer) -> None:
    rtsp_server.start_pusher(CLIP)
    timings: dict[str, float] = {}

    async def body() -> Consumer:
        consumer = make_reader(
            rtsp_server.url(),
            sample_fps=5.0,
            read_timeout_s=3.0,
            backoff_initial_s=0.25,
            backoff_max_s=1.0,
        ).start()
        reader = consumer.reader
        await consumer.until(lambda: len(consumer.frames) >= 5, 15.0, "frames")

        await asyncio.to_thread(rtsp_server.stop_pusher)  # the camera goes away
        timings["outage detected"] = await consumer.until(
            lambda: reader.state is SourceState.RECONNECTING, 10.0, "RECONNECTING"
        )
        before = len(consumer.frames)
        await asyncio.sleep(1.0)  # a few failed attempts against the relay's 404
        started = time.monotonic()
        rtsp_server.start_pusher(CLIP)  # ... and comes back
        timings["pusher ready"] = time.monotonic() - started
        await consumer.until(lambda: reader.state is SourceState.STREAMING, 15.0, "STREAMING")
        await consumer.until(lambda: len(consumer.frames) >= before + 5, 10.0, "new frames")
        timings["streaming again"] = time.monotonic() - started
        await reader.aclose(5.0)
        await consumer.finish(5.0)
        return consumer

    consumer = run(body)
    print("rtsp outage timings (s):", {k: round(v, 2) for k, v in timings.items()})
    reader = consumer.reader
    assert timings["outage detected"] < 10.0
    assert reader.reconnects >= 1
    states = [state for state, _ in consumer.states]
    first_reconnecting = states.index(SourceState.RECONNECTING)
    assert SourceState.STREAMING in states[first_reconnecting:]
    message = consumer.states[first_reconnecting][1]
    assert "timed out" in message.lower(), message
    captures = [capture for _, capture, _ in consumer.frames]
    assert_increasing(captures)
    indices = [index for index, _, _ in consumer.frames]
    assert_increasing([float(index) for index in indices])


# -------------------------------------------------------------- URL policy

HOSTS = ["cam1.example.net", "*.cams.example.org", "10.0.0.0/8", "192.168.1.20", "fd00::/8"]
DIRS: list[str | Path] = []


@pytest.fixture
def media_dir(tmp_path: Path) -> Path:
    media = tmp_path / "media"
    media.mkdir()
    (media / "clip.mp4").write_bytes(b"")
    (tmp_path / "secret.txt").write_text("secret")
    (media / "escape.mp4").symlink_to(tmp_path / "secret.txt")
    (media / "inner.mp4").symlink_to(media / "clip.mp4")
    return media


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("rtsp://cam1.example.net:554/stream1", "cam1.example.net"),
        ("rtsp://CAM1.Example.NET./stream1", "cam1.example.net"),
        ("rtsps://a.cams.example.org/live", "a.cams.example.org"),
        ("http://x.y.cams.example.org/video.mjpg", "x.y.cams.example.org"),
        ("rtsp://10.20.30.40/ch0", "10.20.30.40"),
        ("https://192.168.1.20:8443/stream", "192.168.1.20"),
        ("rtsp://[fd00::12]:554/ch0", "fd00::12"),
        ("rtsp://[::ffff:10.1.2.3]/ch0", "::ffff:10.1.2.3"),
        ("rtsp://admin:p%40ss@10.0.0.9/ch0", "10.0.0.9"),
    ],
)
def test_allowed_hosts(url: str, host: str) -> None:
    pull = parse_pull_url(url, HOSTS, DIRS)
    assert pull.host == host
    assert pull.url == url
    assert pull.target == url
    assert pull.scheme == url.split(":", 1)[0]
    assert pull.path is None


@pytest.mark.parametrize(
    "url",
    [
        "rtsp://cam2.example.net/stream",  # not listed
        "rtsp://cams.example.org/live",  # *.suffix means below it, not the apex
        "rtsp://evilcams.example.org/live",  # a suffix match needs the dot
        "rtsp://cams.example.org.evil.com/live",
        "rtsp://11.0.0.1/ch0",  # outside 10.0.0.0/8
        "rtsp://192.168.1.21/ch0",
        "rtsp://10.0.0.1.nip.io/ch0",  # a name, not an address: CIDR does not match it
        "http://169.254.169.254/latest/meta-data/",
        "http://cam1.example.net@169.254.169.254/",  # userinfo, then the real host
        "http://169.254.169.254#@cam1.example.net/",
        "rtsp://[::1]/ch0",
    ],
)
def test_hosts_not_allowed(url: str) -> None:
    with pytest.raises(UrlRejected) as caught:
        parse_pull_url(url, HOSTS, DIRS)
    assert caught.value.permission is True
    assert caught.value.reason == "host_not_allowed"


def test_empty_host_list_allows_no_network_source_and_star_allows_all() -> None:
    with pytest.raises(UrlRejected) as caught:
        parse_pull_url("rtsp://10.0.0.1/ch0", [], ["/"])
    assert caught.value.permission is True
    assert "empty" in caught.value.message
    assert parse_pull_url("rtsp://anything.example/ch0", ["*"], []).host == "anything.example"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://cam1.example.net/video.mp4", "scheme"),
        ("concat:/etc/passwd|/etc/group", "malformed"),
        ("subfile,,start,0,end,0,,:/etc/passwd", "malformed"),
        ("rtmp://cam1.example.net/live", "scheme"),
        ("rtsp:///stream", "no_host"),
        ("http://", "no_host"),
        ("rtsp://cam1.example.net:99999/x", "malformed"),
        ("rtsp://cam1.example.net:port/x", "malformed"),
        ("rtsp://cam1.example.net/a b", "malformed"),
        ("rtsp://cam1.example.net/\x00", "malformed"),
        ("rtsp://cam1.example.net/x\r\nInjected: 1", "malformed"),
        ("", "malformed"),
        ("cam1.example.net/stream", "malformed"),
        ("file://otherhost/etc/passwd", "malformed"),
        ("file:relative.mp4", "malformed"),
        ("rtsp://[fe80::1%25eth0]/x", "malformed"),
    ],
)
def test_malformed_urls_are_invalid_arguments(url: str, reason: str) -> None:
    with pytest.raises(UrlRejected) as caught:
        parse_pull_url(url, ["*"], ["/"])
    assert caught.value.permission is False
    assert caught.value.reason == reason


def test_files_under_allowed_dirs(media_dir: Path) -> None:
    pull = parse_pull_url((media_dir / "clip.mp4").as_uri(), [], [media_dir])
    assert isinstance(pull, PullUrl)
    assert pull.path == (media_dir / "clip.mp4").resolve()
    assert pull.scheme == "file"
    assert pull.host is None
    assert pull.target == pull.path.as_uri()
    # A link that stays inside is fine, and the target is where it leads.
    inner = parse_pull_url((media_dir / "inner.mp4").as_uri(), [], [str(media_dir)])
    assert inner.path == (media_dir / "clip.mp4").resolve()
    # "file://localhost/..." is a local path too.
    local = parse_pull_url(f"file://localhost{media_dir}/clip.mp4", [], [media_dir])
    assert local.path == pull.path


@pytest.mark.parametrize(
    "relative",
    [
        "media/../secret.txt",
        "media/%2e%2e/secret.txt",
        "media/./../secret.txt",
        "media/escape.mp4",  # a symlink pointing out of the allowed directory
        "media-other/clip.mp4",  # a sibling that merely starts with the same name
    ],
)
def test_file_escapes_are_refused(media_dir: Path, relative: str) -> None:
    (media_dir.parent / "media-other").mkdir(exist_ok=True)
    url = f"file://{media_dir.parent}/{relative}"
    with pytest.raises(UrlRejected) as caught:
        parse_pull_url(url, ["*"], [media_dir])
    assert caught.value.permission is True
    assert caught.value.reason == "path_not_allowed"


def test_no_dirs_means_no_files(media_dir: Path) -> None:
    with pytest.raises(UrlRejected) as caught:
        parse_pull_url((media_dir / "clip.mp4").as_uri(), ["*"], [])
    assert caught.value.permission is True
    assert "empty" in caught.value.message


def test_file_query_is_malformed(media_dir: Path) -> None:
    with pytest.raises(UrlRejected) as caught:
        parse_pull_url((media_dir / "clip.mp4").as_uri() + "?x=1", [], [media_dir])
    assert caught.value.permission is False


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("rtsp://admin:secret@10.0.0.5:554/ch0", "rtsp://admin:***@10.0.0.5:554/ch0"),
        ("rtsp://admin@10.0.0.5/ch0", "rtsp://admin@10.0.0.5/ch0"),
        ("rtsp://admin:p@ss@10.0.0.5/ch0", "rtsp://admin:***@10.0.0.5/ch0"),
        ("rtsp://admin:pa/ss@10.0.0.5/ch0", "rtsp://admin:***@10.0.0.5/ch0"),
        ("rtsp://admin:@10.0.0.5/ch0", "rtsp://admin:***@10.0.0.5/ch0"),
        (
            "http://cam/video.cgi?user=admin&pwd=s3cret&res=hd",
            "http://cam/video.cgi?user=admin&pwd=***&res=hd",
        ),
        ("https://cam:8443/stream", "https://cam:8443/stream"),
        ("http://u:p@h/?email=a@b.c", "http://u:***@h/?email=a@b.c"),
        ("not a url", "not a url"),
        ("", ""),
        (
            "[Errno 111] Connection refused: 'rtsp://u:pw@127.0.0.1:9/x'",
            "[Errno 111] Connection refused: 'rtsp://u:***@127.0.0.1:9/x'",
        ),
    ],
)
def test_masked(url: str, shown: str) -> None:
    assert masked(url) == shown


def test_rejections_never_show_the_password() -> None:
    for url in ["rtsp://admin:topsecret@11.0.0.1/ch0", "ftp://admin:topsecret@host/x"]:
        with pytest.raises(UrlRejected) as caught:
            parse_pull_url(url, HOSTS, DIRS)
        assert "topsecret" not in caught.value.message
    pull = parse_pull_url("rtsp://admin:topsecret@10.0.0.1/ch0", HOSTS, DIRS)
    assert pull.masked == "rtsp://admin:***@10.0.0.1/ch0"
