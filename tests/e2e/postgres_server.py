"""A real PostgreSQL server for the tests, on 127.0.0.1 and a free port.

Debian's PostgreSQL server (``apt-get install postgresql``; the Makefile's
``system-packages`` installs it when missing and run as root) is initialised in a fresh
directory and started as a direct child; the tests that need it skip when it is absent.
``initdb`` and the server refuse to run as root, so as root both run as the
``postgres`` user (``runuser``) on a directory that user owns. Stopped with SIGINT (a
fast shutdown), killed if it does not stop; the directory is removed.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from facegrid_harness.processes import free_port

SUPERUSER = "facegrid"
DATABASE = "postgres"


def find_bindir() -> Path | None:
    """The newest Debian PostgreSQL server's bin folder, else one with initdb on PATH."""
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    if versions:
        return Path(versions[-1]).parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


class PostgresServer:
    """A throw-away PostgreSQL server with a trusting superuser ``facegrid``."""

    def __init__(
        self, startup_timeout_s: float = 30.0, tls: tuple[Path, Path] | None = None
    ) -> None:
        """``tls``: (certificate, key) PEM files; then only TLS connections are taken."""
        self.tls = tls
        bindir = find_bindir()
        if bindir is None:
            raise FileNotFoundError("no PostgreSQL server (apt-get install postgresql)")
        self.bindir = bindir
        self.port = free_port()
        self.startup_timeout_s = startup_timeout_s
        self.root = Path(tempfile.mkdtemp(prefix="facegrid-pg-"))
        self.data = self.root / "data"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{DATABASE}"

    def url_for(self, user: str) -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{DATABASE}"

    def _as_owner(self, command: list[str]) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *command]
        return command

    def start(self) -> PostgresServer:
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        subprocess.run(
            self._as_owner(
                [
                    str(self.bindir / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    SUPERUSER,
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-instructions",
                ]
            ),
            check=True,
            capture_output=True,
        )
        tls_options = self._configure_tls() if self.tls is not None else []
        log = open(self.root / "server.log", "wb")  # noqa: SIM115  # closed with the server
        self.process = subprocess.Popen(
            self._as_owner(
                [
                    str(self.bindir / "postgres"),
                    "-D",
                    str(self.data),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.root),
                    *tls_options,
                ]
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self._wait_ready()
        return self

    def _configure_tls(self) -> list[str]:
        """Copy the pair where the server's user alone reads it; refuse plaintext."""
        assert self.tls is not None
        cert, key = self.root / "server.crt", self.root / "server.key"
        shutil.copyfile(self.tls[0], cert)
        shutil.copyfile(self.tls[1], key)
        key.chmod(0o600)
        if os.geteuid() == 0:
            for path in (cert, key):
                shutil.chown(path, "postgres", "postgres")
        hba = self.data / "pg_hba.conf"
        hba.write_text(
            "local all all trust\n"
            "hostssl all all 127.0.0.1/32 trust\n"
            "hostnossl all all 0.0.0.0/0 reject\n"
        )
        return ["-c", "ssl=on", "-c", f"ssl_cert_file={cert}", "-c", f"ssl_key_file={key}"]

    def _wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited: {(self.root / 'server.log').read_text()}")
            try:
                with psycopg.connect(self.url, connect_timeout=2, sslmode="prefer"):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            # runuser passes signals on; the process group holds the postmaster either way.
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.process = None
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()
