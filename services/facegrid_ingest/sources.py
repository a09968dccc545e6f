"""Reading one pull source (RTSP camera, HTTP stream or file) with PyAV, for asyncio code.

Why it is built this way:

- **A worker thread per source.** FFmpeg's demuxing and decoding are blocking calls; PyAV
  releases the GIL inside them, so a plain thread per source reads in parallel with the
  event loop and with other sources. The thread hands frames to :meth:`PullReader.frames`,
  an async iterator.
- **A slot of one frame, newest wins.** Detection is slower than a camera is fast. Queueing
  frames would only add latency (and memory) until the queue is full; a single slot that a
  newer frame overwrites keeps the consumer on the newest picture. Overwritten frames are
  counted in ``frames_dropped``. The one exception is finite media read with
  ``realtime=False`` (benchmarks): nothing there is live, so the reader waits for the
  consumer instead of dropping.
- **Sampling before conversion.** Every packet must be decoded (H.264 frames depend on each
  other), but converting a frame to an RGB numpy array is the expensive part, so only the
  frames kept by the ``sample_fps`` sampler are converted. A frame is kept when at least
  ``1/sample_fps`` seconds of capture time have passed since the last kept one.
- **Timeouts instead of hangs.** OpenCV's ``read()`` can block for ever when an RTSP
  stream drops. Here every blocking FFmpeg call is bounded: PyAV arms FFmpeg's interrupt
  callback with ``open_timeout_s`` while opening and with ``read_timeout_s`` for each packet
  read, and the RTSP/HTTP ``timeout`` options bound socket waits. On top of that, a
  watchdog in the reading loop raises ``TimeoutError`` when packets keep coming but no
  video frame has been decoded for ``read_timeout_s`` (audio only, undecodable video). The
  container is then closed by the thread that owns it and the source is reopened. (Closing
  a container from another thread while FFmpeg is inside it would be a use-after-free, so
  the watchdog lives in the reading thread, and the interrupt callback does the rest.)
- **Reconnecting.** Network sources are reopened after any error or end of stream, after a
  capped exponential backoff with full jitter (``uniform(0, min(max, initial * 2**n))``, so
  that many cameras behind one switch that reboots do not reconnect in lockstep); ``n``
  resets once a connection has streamed for ``stable_after_s``. Files are not retried: an
  error is FAILED, the end is ENDED (or, with ``loop=True``, the file starts again).
- **Permanent failures are not retried.** A source that opens but is not a video (no
  video stream, an HTML page, a text file, an unsupported codec) is FAILED with a message
  saying so; retrying would never help.

Capture times (``Frame.capture_time``, unix seconds):

- **RTSP:** once the sender's first RTCP sender report has arrived, FFmpeg exposes the
  NTP wall time of the stream's timestamp 0 as ``InputContainer.start_time_realtime``;
  the capture time is then that plus the frame's stream time: the camera's own clock,
  without network or decoding delay. It is used only while it agrees with ours (no more
  than ``_NTP_TRUST_S`` in the past, ``_MAX_AHEAD_S`` in the future), since camera clocks
  are often wrong. Until the first report (RTCP comes every few seconds) and when it is
  not trusted, the arrival estimate below is used.
- **Live streams** (network sources without a duration): the earliest-arrival estimate
  ``min(arrival - stream_time)`` over the frames so far, plus the frame's stream time. The
  min discards the delays of frames that arrived late (such as those FFmpeg buffered while
  probing the stream on open), so capture times never lie in the future.
- **Finite media** (``file://``, and HTTP URLs whose container has a duration): the wall
  time when the first frame was read plus ``frame.time - first frame.time``; with
  ``realtime=True`` the reader waits until that moment before handing the frame over, so a
  file plays like a camera.
- Capture times strictly increase over the reader's life (a clock that would go back is
  held just above the last value), and a jump in the stream's timestamps (a camera that
  restarted its counters) re-anchors the clock instead of producing times hours away.

Credentials never reach a log or a state message: every URL and every FFmpeg error text
(which quotes the URL) goes through :func:`facegrid_ingest.urls.masked` first.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import io
import logging
import math
import random
import threading
import time
import traceback
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any
from urllib.parse import unquote, urlsplit

import av
import numpy as np
import numpy.typing as npt
from av.container import InputContainer
from av.video.frame import VideoFrame
from av.video.stream import VideoStream

from facegrid_ingest.urls import UrlRejected, masked, parse_pull_url

logger = logging.getLogger(__name__)

# Capture-time clock limits (seconds); see the module docstring.
_MAX_AHEAD_S = 2.0  # a frame timed further in the future than this is a timestamp jump
_MAX_BACKWARD_S = 1.0  # a frame timed this far before the previous one is a jump back
_NTP_TRUST_S = 10.0  # the sender's clock may be this far behind ours and still be used
_SAMPLE_SLACK_S = 0.002  # timestamps rounded to the stream's time base still sample evenly
_MIN_STEP_S = 1e-6  # the least step between capture times, to keep them increasing

# Demuxers a camera or a recording plausibly needs. A whitelist, because FFmpeg's others
# include playlist formats (hls, concat, dash manifests, sdp) that open further URLs the
# host policy never saw, and "tty", which renders any .txt/.nfo file as video.
FORMAT_WHITELIST = ",".join(
    (
        "mov",  # mp4, mov, m4v, 3gp
        "matroska",  # mkv, webm
        "mpegts",
        "flv",
        "live_flv",
        "avi",
        "asf",
        "mpeg",
        "mpjpeg",  # MJPEG over HTTP (multipart), common on IP cameras
        "mjpeg",
        "h264",
        "hevc",
        "ivf",
        "nut",
        "rtsp",
    )
)
# Protocols each scheme may use underneath (RTSP opens rtp/udp/tcp itself): a file URL can
# never reach the network, and a network URL never a local file.
_PROTOCOLS = {
    "file": "file",
    "http": "http,tcp",
    "https": "https,http,tls,tcp",
    "rtsp": "rtsp,rtp,udp,tcp",
    "rtsps": "rtsps,rtsp,rtp,srtp,udp,tcp,tls",
}


# HLS (an http(s) URL ending in .m3u8 or .m3u): the playlist demuxer and what its
# segments are. Every URL it opens (playlists, segments, keys) goes through the reader's
# own fetch, which checks it against the allowed hosts first, follows no redirect and
# bounds its size; FFmpeg never opens a URL itself.
HLS_FORMATS = "hls,mpegts,mov"
HLS_SUFFIXES = (".m3u8", ".m3u")
MAX_HLS_OBJECT_BYTES = 64 * 1024 * 1024


class HlsUrlRejected(Exception):  # noqa: N818
    """A playlist named a URL the host policy does not allow (or one too large)."""


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a redirect target never passed the host policy


_HLS_OPENER = urllib.request.build_opener(_NoRedirects)


class SourceState(enum.Enum):
    """Where a reader is; reported through ``on_state`` with a human-readable message."""

    CONNECTING = "connecting"
    STREAMING = "streaming"
    RECONNECTING = "reconnecting"
    ENDED = "ended"
    FAILED = "failed"


@dataclass(frozen=True)
class Frame:
    """A sampled picture.

    ``index`` counts every decoded frame since the reader started (over reconnects too), so
    gaps between consecutive indices show how many frames the sampler skipped; ``image`` is
    HxWx3 RGB, C-contiguous.
    """

    index: int
    capture_time: float
    image: npt.NDArray[np.uint8]


class NotAVideoError(Exception):
    """The source opened but carries no decodable video: retrying will not help."""


class _StoppedError(Exception):
    """stop() was called while the reading thread waited."""


class _Clock:
    """Maps one connection's stream time (``frame.time``) to unix capture times.

    ``mode`` is "live" (earliest-arrival estimate, optionally the sender's NTP clock),
    "paced" or "free" (finite media: first-frame anchor; "paced" means the caller waits for
    each frame's moment, so frames far ahead of the wall clock are timestamp jumps).
    ``not_before`` carries the previous connection's last capture time, so that times keep
    increasing over reconnects and loops.
    """

    def __init__(self, mode: str, *, use_ntp: bool, not_before: float | None) -> None:
        self.mode = mode
        self.use_ntp = use_ntp
        self.ntp_decided = not use_ntp
        self.using_ntp = False
        self.base: float | None = None
        self.last = not_before

    def capture_time(self, stream_time: float | None, container: InputContainer) -> float:
        now = time.time()
        if stream_time is None or not math.isfinite(stream_time):
            candidate = now
        else:
            if self.base is None:
                start = now if self.last is None else max(now, self.last)
                self.base = start - stream_time
            adopted = self._maybe_adopt_ntp(stream_time, container, now)
            if self.mode == "live" and not self.using_ntp:
                self.base = min(self.base, now - stream_time)
            candidate = self.base + stream_time
            jumped_ahead = self.mode != "free" and candidate > now + _MAX_AHEAD_S
            jumped_back = (
                not adopted and self.last is not None and candidate < self.last - _MAX_BACKWARD_S
            )
            if jumped_ahead or jumped_back:
                logger.info(
                    "stream timestamps jumped by %.1f s; re-anchoring the capture clock",
                    candidate - now,
                )
                self.using_ntp = False
                self.ntp_decided = True
                self.base = now - stream_time
                candidate = now
        if self.last is not None and candidate < self.last + _MIN_STEP_S:
            candidate = self.last + _MIN_STEP_S
        self.last = candidate
        return candidate

    def _maybe_adopt_ntp(self, stream_time: float, container: InputContainer, now: float) -> bool:
        if self.ntp_decided:
            return False
        realtime_us = container.start_time_realtime
        if not realtime_us or realtime_us <= 0:
            return False
        self.ntp_decided = True
        ntp_base = realtime_us / 1e6
        skew = ntp_base + stream_time - now
        if -_NTP_TRUST_S <= skew <= _MAX_AHEAD_S:
            self.base = ntp_base
            self.using_ntp = True
            logger.debug("using the sender's RTCP clock (%.3f s from arrival)", skew)
            return True
        logger.info("ignoring the sender's RTCP clock: it is %.1f s off ours", skew)
        return False


class PullReader:
    """Reads one source in a worker thread and yields sampled frames to asyncio code.

    ``url`` may carry credentials; it is only ever logged masked. Check it with
    :func:`facegrid_ingest.urls.parse_pull_url` first (and pass ``PullUrl.target``): the
    reader enforces no host or directory policy, only the per-scheme protocol and container
    format whitelists.

    ``on_state(state, message)`` is called on the event loop's thread (the one iterating
    :meth:`frames`), in order, for every change of state, and for every new error while
    RECONNECTING. ``state`` and ``message`` hold the latest values at any time.

    Counters: ``frames_received`` (decoded), ``frames_sampled`` (kept by the sampler and
    converted), ``frames_dropped`` (sampled but overwritten in the slot before the consumer
    took them), ``reconnects`` (times the source was reopened after the first open),
    ``decode_errors`` (packets the decoder rejected, e.g. after UDP loss).
    """

    def __init__(
        self,
        url: str,
        *,
        sample_fps: float,
        open_timeout_s: float = 5.0,
        read_timeout_s: float = 5.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 10.0,
        realtime: bool = True,
        loop: bool = False,
        on_state: Callable[[SourceState, str], None] | None = None,
        rtsp_transport: str = "udp",
        stable_after_s: float = 5.0,
        allowed_hosts: Sequence[str] = (),
    ) -> None:
        if not sample_fps > 0 or not math.isfinite(sample_fps):
            raise ValueError(f"sample_fps must be a positive number, not {sample_fps!r}")
        if open_timeout_s <= 0 or read_timeout_s <= 0:
            raise ValueError("open_timeout_s and read_timeout_s must be positive")
        if backoff_initial_s < 0 or backoff_max_s < backoff_initial_s:
            raise ValueError("need 0 <= backoff_initial_s <= backoff_max_s")
        parts = urlsplit(url)
        self._scheme = parts.scheme.lower()
        if self._scheme not in _PROTOCOLS:
            raise ValueError(f"unsupported source scheme in {masked(url)!r}")
        self._url = url
        self.masked_url = masked(url)
        self._is_file = self._scheme == "file"
        self._target = "file:" + unquote(parts.path) if self._is_file else url
        self._is_hls = self._scheme in ("http", "https") and parts.path.lower().endswith(
            HLS_SUFFIXES
        )
        # The playlist's own host is allowed (it was checked before the reader was made).
        self._allowed_hosts = [*allowed_hosts, parts.hostname or ""]
        self._hls_rejection: str | None = None
        self._rtsp_socket_timeout_s = read_timeout_s / 2
        self._options = self._container_options(rtsp_transport, read_timeout_s)
        self._interval_s = 1.0 / sample_fps
        self._open_timeout_s = open_timeout_s
        self._read_timeout_s = read_timeout_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._stable_after_s = stable_after_s
        self._realtime = realtime
        self._loop_file = loop
        self._on_state = on_state

        self.state = SourceState.CONNECTING
        self.message = "not started"
        self.frames_received = 0
        self.frames_sampled = 0
        self.frames_dropped = 0
        self.reconnects = 0
        self.decode_errors = 0

        self._stop_requested = threading.Event()
        self._lock = threading.Lock()
        self._slot_taken = threading.Condition(self._lock)
        self._slot: Frame | None = None
        self._done = False
        self._thread: threading.Thread | None = None
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._streaming_since: float | None = None
        self._last_capture: float | None = None
        self._last_kept: float | None = None
        self._backpressure = False

    # ----------------------------------------------------------------- public API

    async def frames(self) -> AsyncIterator[Frame]:
        """Sampled frames until the source ends or fails, or stop() is called.

        Starts the reading thread on first use; can be iterated once. Leaving the loop
        early (break, cancellation) stops the reader.
        """
        if self._thread is not None:
            raise RuntimeError("PullReader.frames() can be iterated only once")
        self._event_loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"pull {self.masked_url}", daemon=True
        )
        if self._stop_requested.is_set():
            return
        self._thread.start()
        try:
            while True:
                with self._lock:
                    frame, self._slot = self._slot, None
                    done = self._done
                    if frame is not None:
                        self._slot_taken.notify_all()
                if frame is not None:
                    yield frame
                    continue
                if done or self._stop_requested.is_set():
                    return
                await self._wakeup.wait()
                self._wakeup.clear()
        finally:
            self.stop()

    def stop(self) -> None:
        """Ask the reader to stop; returns at once and may be called from any thread.

        :meth:`frames` ends at its next step. The reading thread leaves at its next check:
        at once when it is waiting (backoff, pacing, the consumer), at the latest after the
        open or read timeout when FFmpeg is inside a blocking call. :meth:`join` waits.
        """
        self._stop_requested.set()
        with self._lock:
            self._slot_taken.notify_all()
        self._wake()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the reading thread to finish; True if it has (or never started)."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return True
        thread.join(timeout)
        return not thread.is_alive()

    async def aclose(self, timeout: float | None = None) -> bool:
        """stop(), then wait (without blocking the loop) for the reading thread to end."""
        self.stop()
        return await asyncio.to_thread(self.join, timeout)

    # ------------------------------------------------------------ reading thread

    def _container_options(self, rtsp_transport: str, read_timeout_s: float) -> dict[str, str]:
        timeout_us = str(round(read_timeout_s * 1_000_000))
        options = {
            "protocol_whitelist": _PROTOCOLS[self._scheme],
            "format_whitelist": HLS_FORMATS if self._is_hls else FORMAT_WHITELIST,
        }
        if self._is_hls:
            # Our fetch is not FFmpeg's HTTP context: no connection reuse, no parallel
            # requests (either would call HTTP internals on it and abort the process).
            return options | {"http_persistent": "0", "http_multiple": "0"}
        if self._scheme in ("rtsp", "rtsps"):
            # FFmpeg 5+ calls the socket I/O timeout "timeout" (microseconds; the old
            # "stimeout" is gone). Over UDP it bounds each wait for a packet, but the first
            # time it expires the demuxer hands out the packet it was holding back (the end
            # of the last frame) and only the second time it fails. Half the read timeout
            # makes a dead stream fail after read_timeout_s, not twice that (measured with
            # rtsp-server-perl: 6.0 s instead of 3.0 s for read_timeout_s=3).
            half_us = str(round(self._rtsp_socket_timeout_s * 1_000_000))
            options |= {"rtsp_transport": rtsp_transport, "timeout": half_us}
        elif self._scheme in ("http", "https"):
            options |= {
                "timeout": timeout_us,
                # We reconnect ourselves, with backoff, state and counters; FFmpeg's own
                # reconnection would hide outages and retry without bound.
                "reconnect": "0",
                "reconnect_streamed": "0",
                "reconnect_at_eof": "0",
                "reconnect_on_network_error": "0",
                # A redirect could lead to a host that the allowed-host policy never saw.
                "max_redirects": "0",
            }
        return options

    def _run(self) -> None:
        failures = 0
        retrying = False
        try:
            while not self._stop_requested.is_set():
                if retrying:
                    self.reconnects += 1
                self._streaming_since = None
                error: str | None = None
                try:
                    self._read_once()
                except _StoppedError:
                    break
                except NotAVideoError as not_video:
                    self._set_state(SourceState.FAILED, self._scrub(str(not_video)))
                    return
                except Exception as exc:
                    error = self._describe(exc)
                    # No exc_info: FFmpeg's messages quote the URL, password and all.
                    logger.debug("%s: %s: %s", self.masked_url, type(exc).__name__, error)
                if self._hls_rejection is not None:
                    # FFmpeg skips a segment it cannot open; a refused URL is a policy
                    # matter, not an outage: retrying would not change the answer.
                    self._set_state(SourceState.FAILED, self._scrub(self._hls_rejection))
                    return
                if self._stop_requested.is_set():
                    break
                if self._is_file:
                    if error is not None:
                        self._set_state(SourceState.FAILED, error)
                        return
                    if self._loop_file and self._streaming_since is not None:
                        continue  # play it again (a file without frames ends instead)
                    self._set_state(SourceState.ENDED, "end of file")
                    return
                retrying = True
                streamed_for = 0.0
                if self._streaming_since is not None:
                    streamed_for = time.monotonic() - self._streaming_since
                if streamed_for >= self._stable_after_s:
                    failures = 0
                ceiling = min(self._backoff_max_s, self._backoff_initial_s * 2 ** min(failures, 32))
                delay = random.uniform(0, ceiling)
                failures += 1
                reason = error if error is not None else "the stream ended"
                self._set_state(
                    SourceState.RECONNECTING, f"{reason}; reconnecting in {delay:.1f} s"
                )
                if self._stop_requested.wait(delay):
                    break
        except Exception as exc:
            trace = "".join(traceback.format_exception(exc))
            logger.error("%s: reader failed:\n%s", self.masked_url, self._scrub(trace))
            self._set_state(SourceState.FAILED, f"internal error: {self._describe(exc)}")
        finally:
            if self.state not in (SourceState.ENDED, SourceState.FAILED):
                self._set_state(SourceState.ENDED, "stopped")
            with self._lock:
                self._done = True
            self._wake()

    def _read_once(self) -> None:
        """Open the source, stream until it ends or fails (raises), close it."""
        if self.state is SourceState.CONNECTING:
            self._set_state(SourceState.CONNECTING, f"opening {self.masked_url}")
        started = time.monotonic()
        self._hls_rejection = None
        try:
            if self._is_hls:
                container = av.open(
                    self._target,
                    mode="r",
                    format="hls",
                    options=self._options,
                    timeout=(self._open_timeout_s, self._read_timeout_s),
                    io_open=self._hls_open,
                )
            else:
                container = av.open(
                    self._target,
                    mode="r",
                    container_options=self._options,
                    timeout=(self._open_timeout_s, self._read_timeout_s),
                )
        except av.ExitError as exc:
            # PyAV's interrupt callback fired: the open timeout, nothing else.
            raise TimeoutError(
                f"timed out opening {self.masked_url}: no answer within {self._open_timeout_s:g} s"
            ) from exc
        except (av.InvalidDataError, av.ArgumentError, av.FFmpegError) as exc:
            if self._hls_rejection is not None:
                raise NotAVideoError(self._hls_rejection) from exc
            if not isinstance(exc, av.InvalidDataError | av.ArgumentError):
                raise
            if self._scheme in ("rtsp", "rtsps"):
                # A camera that answers oddly may be rebooting: retry it. An RTSP server
                # that does not answer at all looks the same to FFmpeg once the socket
                # timeout expires, so say so.
                waited = time.monotonic() - started
                if waited >= 0.9 * self._rtsp_socket_timeout_s:
                    raise TimeoutError(
                        f"timed out opening {self.masked_url}: no valid answer within "
                        f"{waited:.1f} s ({self._describe(exc)})"
                    ) from exc
                raise
            raise NotAVideoError(
                f"not a video: FFmpeg found no supported video container in "
                f"{self.masked_url} ({self._describe(exc)}); accepted formats: "
                f"{FORMAT_WHITELIST}"
            ) from exc
        try:
            self._stream(container)
        except av.FFmpegError as exc:
            if self._hls_rejection is not None:
                raise NotAVideoError(self._hls_rejection) from exc
            raise
        finally:
            container.close()

    def _hls_open(self, url: str, flags: int, options: dict[str, str]) -> io.BytesIO:
        """FFmpeg's HLS demuxer asks for a playlist, segment or key: check, then fetch."""
        shown = masked(url)
        try:
            parsed = parse_pull_url(url, self._allowed_hosts, ())
        except UrlRejected as rejected:
            self._hls_rejection = f"the playlist names {shown}, which is refused: {rejected}"
            raise HlsUrlRejected(self._hls_rejection) from None
        if parsed.scheme not in ("http", "https"):
            self._hls_rejection = f"the playlist names {shown}: only http(s) is followed"
            raise HlsUrlRejected(self._hls_rejection)
        if self._stop_requested.is_set():
            raise _StoppedError
        request = urllib.request.Request(url, headers={"User-Agent": "facegrid-ingest"})
        with _HLS_OPENER.open(request, timeout=self._read_timeout_s) as response:
            if response.status != 200:
                raise OSError(f"{shown}: HTTP {response.status}")
            body = response.read(MAX_HLS_OBJECT_BYTES + 1)
        if len(body) > MAX_HLS_OBJECT_BYTES:
            self._hls_rejection = f"{shown} is larger than {MAX_HLS_OBJECT_BYTES} bytes"
            raise HlsUrlRejected(self._hls_rejection)
        return io.BytesIO(body)

    def _stream(self, container: InputContainer) -> None:
        if not container.streams.video:
            kinds = ", ".join(s.type for s in container.streams) or "no streams"
            raise NotAVideoError(f"not a video: {self.masked_url} has no video stream ({kinds})")
        video = container.streams.video[0]
        finite = self._is_file or (container.duration is not None and container.duration > 0)
        if not finite:
            mode = "live"
        elif self._realtime:
            mode = "paced"
        else:
            mode = "free"
        with self._lock:
            self._backpressure = mode == "free"
        clock = _Clock(
            mode,
            use_ntp=self._scheme in ("rtsp", "rtsps"),
            not_before=self._next_not_before(video.average_rate),
        )
        try:
            self._demux(container, video, clock)
        except av.ExitError as exc:
            # PyAV's interrupt callback: one packet read took longer than the read timeout.
            raise TimeoutError(f"no data for {self._read_timeout_s:g} s") from exc

    def _demux(self, container: InputContainer, video: VideoStream, clock: _Clock) -> None:
        last_frame = time.monotonic()
        for packet in container.demux():
            if self._stop_requested.is_set():
                raise _StoppedError
            if packet.stream.index == video.index:
                try:
                    decoded = video.decode(packet)
                except av.InvalidDataError:
                    self.decode_errors += 1  # a damaged packet (UDP loss): skip it
                    decoded = []
                except av.DecoderNotFoundError as exc:
                    raise NotAVideoError(
                        f"not a video: no decoder for {video.codec_context.name!r} "
                        f"in {self.masked_url}"
                    ) from exc
                for frame in decoded:
                    last_frame = time.monotonic()
                    self._take_frame(frame, clock, container)
            if time.monotonic() - last_frame > self._read_timeout_s:
                raise TimeoutError(f"no video frame for {self._read_timeout_s:g} s")

    def _next_not_before(self, rate: Fraction | None) -> float | None:
        """Where the next connection's capture clock may start (after the last frame).

        A looping file restarts one frame interval after its last frame, as if the file
        went on; anything else only has to stay after the last capture time.
        """
        if self._last_capture is None:
            return None
        step = _MIN_STEP_S
        if self._is_file and self._loop_file:
            step = 1.0 / float(rate) if rate else 1.0 / 25
        return self._last_capture + step

    def _take_frame(self, frame: VideoFrame, clock: _Clock, container: InputContainer) -> None:
        self.frames_received += 1
        index = self.frames_received - 1
        if self._streaming_since is None:
            self._streaming_since = time.monotonic()
            self._set_state(
                SourceState.STREAMING,
                f"streaming {frame.width}x{frame.height} from {self.masked_url}",
            )
        capture = clock.capture_time(frame.time, container)
        self._last_capture = capture
        if clock.mode == "paced":
            delay = capture - time.time()
            if delay > 0 and self._stop_requested.wait(delay):
                raise _StoppedError
        if self._last_kept is not None and capture - self._last_kept < (
            self._interval_s - _SAMPLE_SLACK_S
        ):
            return
        self._last_kept = capture
        # The expensive step, done only for kept frames.
        image = np.ascontiguousarray(frame.to_ndarray(format="rgb24"), dtype=np.uint8)
        self.frames_sampled += 1
        self._hand_over(Frame(index=index, capture_time=capture, image=image))

    def _hand_over(self, frame: Frame) -> None:
        with self._lock:
            if self._backpressure:
                while self._slot is not None and not self._stop_requested.is_set():
                    self._slot_taken.wait()
                if self._stop_requested.is_set():
                    raise _StoppedError
            if self._slot is not None:
                self.frames_dropped += 1
            self._slot = frame
        self._wake()

    # ------------------------------------------------------------------ helpers

    def _wake(self) -> None:
        loop, wakeup = self._event_loop, self._wakeup
        if loop is None or wakeup is None:
            return
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(wakeup.set)

    def _set_state(self, state: SourceState, message: str) -> None:
        if state is self.state and message == self.message:
            return
        self.state, self.message = state, message
        troubled = state in (SourceState.RECONNECTING, SourceState.FAILED)
        level = logging.WARNING if troubled else logging.INFO
        logger.log(level, "%s: %s (%s)", self.masked_url, state.value, message)
        callback, loop = self._on_state, self._event_loop
        if callback is None or loop is None:
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._notify, callback, state, message)

    def _notify(
        self, callback: Callable[[SourceState, str], None], state: SourceState, message: str
    ) -> None:
        try:
            callback(state, message)
        except Exception:
            logger.exception("%s: on_state callback failed", self.masked_url)

    def _describe(self, exc: BaseException) -> str:
        text = str(exc) or type(exc).__name__
        if isinstance(exc, TimeoutError) and "timed out" not in text.lower():
            text = f"timed out: {text}"
        return self._scrub(text)

    def _scrub(self, text: str) -> str:
        """``text`` without credentials: the URL itself, then anything URL-like, masked."""
        return masked(text.replace(self._url, self.masked_url))
