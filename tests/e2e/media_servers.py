"""Real media servers for tests: an RTSP relay fed by a pushed clip, and a plain HTTP server.

:class:`RtspServer` runs Debian's ``rtsp-server-perl`` (a relay: a source pushes a stream
with ANNOUNCE/RECORD, clients pull it with DESCRIBE/SETUP/PLAY, RTP over UDP both ways) on
free ports, and :meth:`RtspServer.start_pusher` plays a video file into it in real time with
PyAV (``rtsp_pusher.py``), which makes a camera that can be unplugged and plugged back in.

Every process is started in its own process group (so the whole group can be signalled)
and, where util-linux's ``setpriv`` exists, with a parent-death signal, so that even a test
run killed outright leaves no relay or pusher behind. Start them from the main thread: the
parent-death signal fires when the *thread* that started the process ends.

:class:`HttpFileServer` serves one directory read-only over HTTP/1.1 with byte ranges
(FFmpeg seeks to an mp4's index, which this clip keeps at its end).
"""

from __future__ import annotations

import contextlib
import http.server
import io
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Self
from urllib.parse import quote

from facegrid_harness.processes import free_ports, stop_group

PUSHER = Path(__file__).resolve().with_name("rtsp_pusher.py")
RTSP_SERVER = "rtsp-server-perl"

# rtsp-server-perl resets its RTP port counter to the module's constant 20000 whenever its
# last mount goes away (RTSP::Server::housekeeping), ignoring --rtp_start_port. Two test
# runs at once would then fight over UDP 20000, so the constant is set too, by running the
# same script in a perl that has the module loaded and the constant changed.
_PERL_WRAPPER = (
    "use RTSP::Server; $RTSP::Server::RTP_START_PORT = shift @ARGV; "
    "my $script = shift @ARGV; $0 = $script; do $script; die $@ if $@;"
)


def _guarded(command: list[str]) -> list[str]:
    """``command`` with a parent-death SIGKILL, where setpriv can set one."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return command
    return [setpriv, "--pdeathsig", "KILL", "--", *command]


def _free_udp_block(count: int) -> int:
    """An even port P such that UDP P..P+count-1 are free on 127.0.0.1 (just now)."""
    for _ in range(200):
        start = random.randrange(30000, 60000 - count, 2)
        with contextlib.ExitStack() as stack:
            try:
                for port in range(start, start + count):
                    sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return start
    raise RuntimeError(f"no block of {count} free UDP ports found")


def _wait_port(port: int, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with status {process.returncode} before listening")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout_s} s")


class RtspServer:
    """rtsp-server-perl on 127.0.0.1: pullers use :meth:`url`, the pusher :meth:`source_url`."""

    def __init__(self, *, udp_ports: int = 64) -> None:
        self.client_port, self.source_port = free_ports(2)
        self.rtp_start_port = _free_udp_block(udp_ports)
        self.work_dir = Path(tempfile.mkdtemp(prefix="rtsp-server-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.pushers: dict[str, subprocess.Popen[bytes]] = {}

    # -------------------------------------------------------------- lifecycle

    def start(self, timeout_s: float = 15.0) -> None:
        binary = shutil.which(RTSP_SERVER)
        if binary is None:
            raise RuntimeError(f"{RTSP_SERVER} is not installed")
        command = [
            "perl",
            "-e",
            _PERL_WRAPPER,
            str(self.rtp_start_port),
            binary,
            "--clientport",
            str(self.client_port),
            "--serverport",
            str(self.source_port),
            "--client_listen_address",
            "127.0.0.1",
            "--source_listen_address",
            "127.0.0.1",
            "--rtp_start_port",
            str(self.rtp_start_port),
        ]
        with (self.work_dir / "server.log").open("wb") as log:
            self.process = subprocess.Popen(
                _guarded(command),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            _wait_port(self.client_port, self.process, timeout_s)
            _wait_port(self.source_port, self.process, timeout_s)
        except BaseException as error:
            log_text = self.log()
            self.stop()
            raise RuntimeError(f"{RTSP_SERVER} did not start: {error}\n{log_text}") from None

    def stop(self) -> None:
        """Stop every pusher and the server; safe to call more than once."""
        for path in list(self.pushers):
            self.stop_pusher(path)
        if self.process is not None:
            # Neither the relay nor the pusher starts children: nothing outlives its leader.
            stop_group(self.process, 3.0, kill_leftovers=False)
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ URLs

    def url(self, path: str = "cam0") -> str:
        """Where clients pull ``path`` from (RTP over UDP)."""
        return f"rtsp://127.0.0.1:{self.client_port}/{path}"

    def source_url(self, path: str = "cam0") -> str:
        """Where a source pushes ``path`` to."""
        return f"rtsp://127.0.0.1:{self.source_port}/{path}"

    # --------------------------------------------------------------- pushers

    def start_pusher(
        self,
        video: Path,
        path: str = "cam0",
        *,
        loop: bool = True,
        wait: bool = True,
        timeout_s: float = 15.0,
    ) -> subprocess.Popen[bytes]:
        """Push ``video`` in real time to ``path`` (H.264 copied, audio dropped).

        With ``wait`` it returns once the relay offers the stream to clients.
        """
        if path in self.pushers:
            raise RuntimeError(f"a pusher for {path!r} is running")
        command = [sys.executable, str(PUSHER), str(video), self.source_url(path)]
        if loop:
            command.append("--loop")
        with (self.work_dir / f"pusher-{path}.log").open("ab") as log:
            process = subprocess.Popen(
                _guarded(command),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.pushers[path] = process
        if wait:
            try:
                self.wait_stream(path, timeout_s, process)
            except BaseException:
                self.stop_pusher(path)
                raise
        return process

    def stop_pusher(self, path: str = "cam0") -> None:
        """Stop pushing ``path`` (the camera goes away); no-op if none runs."""
        process = self.pushers.pop(path, None)
        if process is not None:
            stop_group(process, 3.0, kill_leftovers=False)

    def wait_stream(
        self, path: str, timeout_s: float, process: subprocess.Popen[bytes] | None = None
    ) -> None:
        """Wait until a DESCRIBE of ``path`` succeeds (the relay has the pushed stream)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(
                    f"the pusher exited with status {process.returncode}:\n{self.log(path)}"
                )
            if self.describe(path) == 200:
                return
            time.sleep(0.1)
        raise TimeoutError(f"{self.url(path)} not offered after {timeout_s} s:\n{self.log(path)}")

    def describe(self, path: str = "cam0") -> int | None:
        """The status code of an RTSP DESCRIBE of ``path`` (None if nothing answered)."""
        request = (
            f"DESCRIBE {self.url(path)} RTSP/1.0\r\nCSeq: 1\r\nAccept: application/sdp\r\n\r\n"
        )
        try:
            with socket.create_connection(("127.0.0.1", self.client_port), timeout=2.0) as sock:
                sock.sendall(request.encode())
                reply = sock.recv(4096).decode("latin-1")
        except OSError:
            return None
        match = re.match(r"RTSP/1\.0 (\d{3})", reply)
        return int(match[1]) if match else None

    def log(self, path: str | None = None) -> str:
        """The server's log, or the pusher's for ``path``."""
        name = "server.log" if path is None else f"pusher-{path}.log"
        try:
            return (self.work_dir / name).read_text(errors="replace")
        except OSError:
            return ""

    def pids(self) -> list[int]:
        """Process ids of the server and pushers still running (for leak checks)."""
        processes = [self.process, *self.pushers.values()]
        return [p.pid for p in processes if p is not None and p.poll() is None]


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler (GET/HEAD only) plus single byte ranges, quietly."""

    protocol_version = "HTTP/1.1"
    _range_re = re.compile(r"bytes=(\d*)-(\d*)$")

    def log_message(self, format: str, *args: object) -> None:
        pass

    def send_head(self) -> io.BytesIO | BinaryIO | None:
        header = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        match = self._range_re.match(header.strip()) if header else None
        if match is None or not path.is_file():
            return super().send_head()
        size = path.stat().st_size
        first, last = match[1], match[2]
        if first:
            start, end = int(first), int(last) if last else size - 1
        elif last:
            start, end = max(0, size - int(last)), size - 1
        else:
            return super().send_head()
        end = min(end, size - 1)
        if start >= size or start > end:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        handle: BinaryIO = path.open("rb")
        handle.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", self.guess_type(str(path)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        self._remaining = end - start + 1
        return handle

    def end_headers(self) -> None:
        if not hasattr(self, "_remaining"):
            self.send_header("Accept-Ranges", "bytes")
        super().end_headers()

    def copyfile(self, source: Any, outputfile: Any) -> None:
        remaining = getattr(self, "_remaining", None)
        if remaining is None:
            super().copyfile(source, outputfile)
            return
        del self._remaining
        while remaining > 0:
            chunk = source.read(min(remaining, 64 * 1024))
            if not chunk:
                break
            outputfile.write(chunk)
            remaining -= len(chunk)


class HttpFileServer:
    """A ThreadingHTTPServer on 127.0.0.1 (a free port) serving ``directory`` read-only."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory).resolve()
        self.requests: list[str] = []  # the paths asked for, in order
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the server is not running")
        return int(self._server.server_address[1])

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{quote(name)}"

    def start(self) -> None:
        directory = str(self.directory)
        requests = self.requests

        class Handler(_RangeHandler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=directory, **kwargs)

            def send_head(self) -> Any:
                requests.append(self.path)
                return super().send_head()

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()
        # The socket listens from the constructor on; check that requests are answered.
        with socket.create_connection(("127.0.0.1", self.port), timeout=5.0):
            pass

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (and is not a zombie we reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_hls(clip: Path, folder: Path, segment_s: float = 2.0) -> Path:
    """Cut ``clip`` into an HLS playlist (VOD) with MPEG-TS segments in ``folder``."""
    from fractions import Fraction

    import av

    folder.mkdir(parents=True, exist_ok=True)
    playlist = folder / "index.m3u8"
    with (
        av.open(str(clip)) as source,
        av.open(
            str(playlist),
            "w",
            format="hls",
            options={"hls_time": str(segment_s), "hls_list_size": "0", "hls_playlist_type": "vod"},
        ) as out,
    ):
        video = source.streams.video[0]
        rate = video.average_rate or Fraction(25)
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = video.width, video.height, "yuv420p"
        stream.time_base = Fraction(1, 90000)
        for index, frame in enumerate(source.decode(video)):
            converted = frame.reformat(format="yuv420p")
            converted.pts = int(index / rate / stream.time_base)
            converted.time_base = stream.time_base
            for packet in stream.encode(converted):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return playlist
