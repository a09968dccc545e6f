"""Helpers for the servers that tests and `facegrid` start as child processes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess


def free_ports(count: int) -> list[int]:
    """Distinct free ports on 127.0.0.1 (all held open together so none repeats)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def free_port() -> int:
    return free_ports(1)[0]


def signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Signal a child started with ``start_new_session=True`` and everything it started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
