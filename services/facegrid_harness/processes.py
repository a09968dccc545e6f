"""Helpers for the servers that tests and `facegrid` start as child processes."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self


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


def stop_group(
    process: subprocess.Popen[bytes], timeout_s: float, kill_leftovers: bool = True
) -> int:
    """Stop a server started in its own session: SIGTERM to its group, up to
    ``timeout_s`` for a clean shutdown, then SIGKILL. One that had exited already gets
    SIGKILL for anything it left behind (a crashed server's children), unless
    ``kill_leftovers`` is false: for a server that starts no children, whose group id
    could belong to another process once its leader is reaped. Its exit code."""
    if process.poll() is None:
        signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            signal_group(process, signal.SIGKILL)
            process.wait(timeout=30)
    elif kill_leftovers:
        signal_group(process, signal.SIGKILL)
    return int(process.returncode)


def stop_process(process: subprocess.Popen[bytes], timeout_s: float) -> int:
    """SIGTERM to one child, up to ``timeout_s`` to exit, then SIGKILL; its exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    return wait_or_kill(process, timeout_s)


def wait_or_kill(process: subprocess.Popen[bytes], timeout_s: float) -> int:
    """Up to ``timeout_s`` for a child told to stop to exit, then SIGKILL; its exit code.
    (Never a second SIGTERM: a service past its event loop would die of it.)"""
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    return int(process.returncode)


class ManagedProcess:
    """A server run as a child process in a session of its own (Triton, Milvus,
    nats-server): started and waited for until it is ready, stopped with its whole
    process group (SIGTERM, then SIGKILL), killed as a crash would, and stopped at exit
    if its owner forgets (nothing else would: it is in another session).

    Subclasses say what to run (:meth:`command`, :meth:`popen_options`), how to tell it
    is ready (:meth:`ready`, one probe), and what to clean after it (:meth:`after_stop`);
    they hold ``process``, ``startup_timeout_s``, ``stop_timeout_s`` and ``log_path``.
    """

    server_name: ClassVar[str]  # in messages: "nats-server"
    start_error: ClassVar[type[Exception]] = RuntimeError
    truncate_log: ClassVar[bool] = False  # a new log per start, else appended
    poll_interval_s: ClassVar[float] = 0.05  # between readiness probes
    process: subprocess.Popen[bytes] | None
    startup_timeout_s: float
    stop_timeout_s: float

    @property
    def log_path(self) -> Path:
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    def popen_options(self) -> dict[str, Any]:
        """More arguments of ``subprocess.Popen``: ``cwd``, ``env``."""
        return {}

    def before_start(self) -> None:
        """Checks and preparation before the process starts (raise to refuse)."""

    def ready(self) -> bool:
        raise NotImplementedError

    def after_stop(self, pid: int) -> None:
        """Remove what the stopped (or killed) process ``pid`` left behind."""

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> Self:
        if self.process is not None:
            raise self.start_error(f"already running as pid {self.process.pid}")
        self.before_start()
        command = self.command()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb" if self.truncate_log else "ab") as log:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **self.popen_options(),
            )
        atexit.register(self.stop)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise self.start_error(
                    f"{self.server_name} exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            if self.ready():
                return
            time.sleep(self.poll_interval_s)
        raise self.start_error(
            f"{self.server_name} not ready after {self.startup_timeout_s:.0f}s:\n{self.log_tail()}"
        )

    def log_lines(self, text: list[str]) -> list[str]:
        """The part of the log worth showing (all of it, unless a subclass knows better)."""
        return text

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(line[:400] for line in self.log_lines(text)[-lines:])

    def stop(self) -> None:
        """SIGTERM to its group, up to ``stop_timeout_s`` for a clean shutdown, then SIGKILL."""
        process, self.process = self.process, None
        if process is None:
            return
        atexit.unregister(self.stop)
        stop_group(process, self.stop_timeout_s)
        self.after_stop(process.pid)

    def kill(self) -> None:
        """SIGKILL without a shutdown, as a crash would (for recovery tests)."""
        process, self.process = self.process, None
        if process is None:
            return
        atexit.unregister(self.stop)
        signal_group(process, signal.SIGKILL)
        process.wait(timeout=30)
        self.after_stop(process.pid)

    def restart(self) -> Self:
        """Stop, then start again on the same ports and directories."""
        self.stop()
        return self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
