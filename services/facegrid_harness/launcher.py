"""Starting services: one in the foreground, or all of them on one machine."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import grpc
from facegrid import diagnostics, tls
from facegrid.config import Settings, load_settings
from grpc_health.v1 import health_pb2, health_pb2_grpc

from facegrid_harness.processes import free_ports, wait_or_kill

if TYPE_CHECKING:
    from facegrid_harness.nats_server import NatsServer

# Order of `facegrid up`: dependencies first.
UP_ORDER = ("detection", "embedding", "search", "gateway", "ingest", "console")
# The services behind the gateway's FaceService (ingest needs NATS besides).
FACE_SERVICES = ("detection", "embedding", "search", "gateway")
# The setting (of the gateway and of ingest) that names each service they call.
CALLED_SERVICES = {
    "detection": "detection_address",
    "embedding": "embedding_address",
    "search": "search_address",
}
# Each calling service -> the services it calls -> its setting that names each.
CALLS = {
    "gateway": CALLED_SERVICES,
    "ingest": CALLED_SERVICES,
    "console": {"gateway": "gateway_address", "ingest": "ingest_address"},
}
HEALTH_TIMEOUT_S = 120.0


def serve_command(name: str, port: int, overrides: Sequence[str]) -> list[str]:
    """The command line of `facegrid serve NAME` on ``port`` with these settings."""
    command = [sys.executable, "-m", "facegrid.cli", "serve", name, "--port", str(port)]
    for override in overrides:
        command += ["--set", override]
    return command


def service_port(settings: Settings, service: str) -> int:
    section = getattr(settings, service)
    return int(section.port)


def wait_healthy(
    address: str,
    timeout_s: float,
    process: subprocess.Popen[bytes] | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    """Block until the gRPC health service at ``address`` says SERVING."""
    deadline = time.monotonic() + timeout_s
    channel = (
        grpc.insecure_channel(address)
        if credentials is None
        else grpc.secure_channel(address, credentials)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"service at {address} exited with {process.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"service at {address} not healthy after {timeout_s:.0f}s")


def console_url(settings: Settings, address: str) -> str:
    """The console's base URL at ``address``: https when it serves TLS."""
    scheme = "https" if settings.tls.cert_file and settings.tls.key_file else "http"
    return f"{scheme}://{address}"


def wait_http_healthy(
    url: str, timeout_s: float, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Block until ``url``/healthz answers 200 (certificates are not checked: this
    only asks whether the server is up)."""
    import ssl
    import urllib.error
    import urllib.request

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"service at {url} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1.0, context=context) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"service at {url} not healthy after {timeout_s:.0f}s")


@dataclass
class RunningService:
    name: str  # the instance: "embedding", or "embedding-2" for a second one
    kind: str  # the service: "embedding"
    address: str
    metrics_port: int
    process: subprocess.Popen[bytes]
    extra: tuple[str, ...] = ()  # its own settings (ServiceGroup.start's ``extra``)


class ServiceGroup:
    """Services started as child processes, stopped together in reverse order."""

    _created: ClassVar[weakref.WeakSet[ServiceGroup]] = weakref.WeakSet()

    def __init__(
        self,
        overrides: list[str],
        log_dir: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.overrides = list(overrides)
        # numpy's OpenBLAS threads spin after every product (the search service's exact
        # index): ~0.1 s of CPU per call that detection on the same machine needs. One
        # thread unless the operator says otherwise; OTEL_* and the like from ``env``.
        # gRPC's C core logs INFO lines of its own (not JSON) to stderr: errors only.
        defaults = {"OPENBLAS_NUM_THREADS": "1", "GRPC_VERBOSITY": "ERROR"}
        self.env = {**defaults, **os.environ, **(env or {})}
        self.settings = load_settings(overrides)
        self.log_dir = log_dir
        self.services: dict[str, RunningService] = {}
        ServiceGroup._created.add(self)

    @classmethod
    def live(cls) -> list[ServiceGroup]:
        """This process's groups with a service still running (what a failed test's
        report asks for the stacks of)."""
        return [group for group in list(cls._created) if group._running()]

    def _running(self) -> dict[str, RunningService]:
        return {n: s for n, s in self.services.items() if s.process.poll() is None}

    def start(
        self,
        name: str,
        port: int | None = None,
        instance: str | None = None,
        metrics_port: int | None = None,
        extra: Sequence[str] = (),
        host: str | None = None,
    ) -> RunningService:
        """Start one service (on its configured ports, or ``port``; 0: free ones).

        ``instance`` names a further instance of the same service (e.g. "embedding-2");
        a gateway started afterwards balances over all instances of each service.
        ``extra``: settings of this instance only. ``host``: the address it binds (its
        gRPC and metrics ports), e.g. a loopback alias 127.0.0.2, so that replicas can
        share one port behind one DNS name.
        """
        own = tuple(extra)
        if host is not None:
            extra = [*extra, f"server.host={host}"]
        key = instance or name
        if key in self.services:
            raise ValueError(f"{key} is running already: name another instance")
        if port == 0:
            port, free_metrics_port = free_ports(2)
            metrics_port = metrics_port or free_metrics_port
        if port is None:
            port = service_port(self.settings, name)
        if metrics_port is None:
            metrics_port = getattr(self.settings, name).metrics_port
        overrides = [*self.overrides, *extra, f"{name}.metrics_port={metrics_port}"]
        # A caller calls the services of this group where they really listen, unless
        # this instance is told otherwise (a DNS name in front of the replicas, say).
        given = {item.split("=", 1)[0] for item in extra}
        overrides += [
            f"{name}.{setting}={self._target(dependency)}"
            for dependency, setting in CALLS.get(name, {}).items()
            if self._target(dependency) and f"{name}.{setting}" not in given
        ]
        command = serve_command(name, port, overrides)
        output = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            output = (self.log_dir / f"{key}.log").open("ab")
        try:
            # Own session: Ctrl-C reaches only the launcher, which stops them in order.
            process = subprocess.Popen(
                command,
                env=self.env,
                start_new_session=True,
                stdout=output,
                stderr=subprocess.STDOUT if output is not None else None,
            )
        finally:
            if output is not None:
                output.close()
        address = f"{host or self.settings.server.host}:{port}"
        service = RunningService(key, name, address, metrics_port, process, own)
        self.services[key] = service
        if name == "console":  # a web server: its /healthz, over HTTPS with tls.cert_file
            url = console_url(self.settings, service.address)
            wait_http_healthy(url, HEALTH_TIMEOUT_S, process)
            return service
        # Over TLS when the configuration calls its services so (tls.ca_file).
        credentials = tls.channel_credentials(self.settings.tls)
        wait_healthy(service.address, HEALTH_TIMEOUT_S, process, credentials)
        return service

    def _target(self, kind: str) -> str:
        """The gRPC target of every running instance of a service ("" if none)."""
        addresses = [s.address for s in self.services.values() if s.kind == kind]
        if len(addresses) > 1:
            return "ipv4:" + ",".join(addresses)  # round-robin over all of them
        return addresses[0] if addresses else ""

    def restart(self, name: str, while_stopped: Callable[[], None] | None = None) -> RunningService:
        """Stop one instance gracefully (SIGTERM) and start it again on the same ports;
        ``while_stopped`` runs in between (what the stopped instance left on disk)."""
        service = self.services.pop(name)
        service.process.send_signal(signal.SIGTERM)
        service.process.wait(timeout=self.settings.server.grace_period_s + 10)
        if service.process.returncode != 0:
            raise RuntimeError(f"{name} exited with {service.process.returncode} on SIGTERM")
        if while_stopped is not None:
            while_stopped()
        host, port = service.address.rsplit(":", 1)
        return self.start(
            service.kind,
            port=int(port),
            instance=name if name != service.kind else None,
            metrics_port=service.metrics_port,
            extra=service.extra,
            host=host if host != self.settings.server.host else None,
        )

    def exited(self) -> RunningService | None:
        """A service that has stopped on its own, if any."""
        for service in self.services.values():
            if service.process.poll() is not None:
                return service
        return None

    def stacks(self, wait_s: float = 1.5) -> dict[str, str]:
        """What each running instance is doing, by name: the stacks of its asyncio tasks
        (SIGUSR1, facegrid.diagnostics), or of its threads where its event loop does not
        answer (SIGUSR2), as the log lines it wrote in reply. Empty without a log_dir."""
        if self.log_dir is None:
            return {}
        running = self._running()
        logs = {name: self.log_dir / f"{name}.log" for name in running}
        offsets = {name: log.stat().st_size if log.exists() else 0 for name, log in logs.items()}
        for service in running.values():
            service.process.send_signal(diagnostics.TASKS_SIGNAL)
        time.sleep(wait_s)
        replies = {name: _log_since(logs[name], offsets[name]) for name in running}
        silent = [name for name, reply in replies.items() if "stacks on SIGUSR1" not in reply]
        for name in silent:
            running[name].process.send_signal(diagnostics.THREADS_SIGNAL)
        if silent:
            time.sleep(0.5)
            replies.update({name: _log_since(logs[name], offsets[name]) for name in silent})
        return replies

    def stop(self, report: bool = False) -> None:
        timeout_s = self.settings.server.grace_period_s + 5
        running = list(reversed(self.services.values()))
        for service in running:
            if service.process.poll() is None:
                service.process.send_signal(signal.SIGTERM)
        for service in running:
            wait_or_kill(service.process, timeout_s)
            if report:
                print(f"  {service.name:10} stopped ({service.process.returncode})", flush=True)
        self.services.clear()

    def __enter__(self) -> ServiceGroup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _log_since(log: Path, offset: int) -> str:
    """What a service's log gained past ``offset``, its JSON lines made readable."""
    with log.open("rb") as stream:
        stream.seek(offset)
        gained = stream.read().decode(errors="replace")
    lines = []
    for line in gained.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            lines.append(line)  # gRPC's C core, or faulthandler's stacks
            continue
        if not isinstance(entry, dict):
            lines.append(line)
            continue
        lines.append(f"{entry.get('time', '')} {entry.get('level', '')} {entry.get('message', '')}")
        if entry.get("exception"):
            lines.append(str(entry["exception"]))
    return "\n".join(lines)


@contextlib.contextmanager
def running_services(
    names: Sequence[str], overrides: list[str], log_dir: Path | None = None
) -> Iterator[dict[str, str]]:
    """Start ``names`` (dependencies first) on free ports; yield name -> address."""
    with ServiceGroup(overrides, log_dir) as group:
        for name in names:
            group.start(name, port=0)
        yield {name: service.address for name, service in group.services.items()}


def up(overrides: list[str], after_start: Callable[[dict[str, str]], None] | None = None) -> int:
    """Run every service as its own process; stop them all on Ctrl-C or SIGTERM."""
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    group = ServiceGroup(overrides)
    nats = local_nats_server(group.settings)
    try:
        if nats is not None:
            nats.start()
            print(f"  {'nats':10} healthy on {nats.host}:{nats.port} (JetStream)", flush=True)
        for name in UP_ORDER:
            service = group.start(name)
            where = console_url(group.settings, service.address) if name == "console" else ""
            print(f"  {name:10} healthy on {where or service.address}", flush=True)
        if after_start is not None:
            after_start({name: service.address for name, service in group.services.items()})
        print("facegrid is up. Press Ctrl-C to stop.", flush=True)
        while not stopping:
            exited = group.exited()
            if exited is not None:
                print(
                    f"{exited.name} exited with {exited.process.returncode}; stopping", flush=True
                )
                return 1
            time.sleep(0.2)
        return 0
    finally:
        group.stop(report=True)
        if nats is not None:
            nats.stop()
            print(f"  {'nats':10} stopped", flush=True)


def local_nats_server(settings: Settings) -> NatsServer | None:
    """The NATS server `facegrid up` runs itself: when ingest.nats_url names this machine
    (the embedded default), a nats-server with JetStream on its port, storing in
    ingest.nats_store_dir; None for a NATS elsewhere."""
    from facegrid_harness.nats_server import NatsServer

    url = urllib.parse.urlsplit(settings.ingest.nats_url)
    if url.hostname not in ("127.0.0.1", "localhost"):
        return None
    return NatsServer(settings.ingest.nats_store_dir, host="127.0.0.1", port=url.port or 4222)


def run_triton(repo: Path, venv: Path) -> int:
    from facegrid_harness.triton_server import TritonInstall, TritonServer

    server = TritonServer(TritonInstall.discover(venv), repo.resolve(), Path(".cache/triton"))
    stop = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    with server:
        print(
            f"tritonserver ready: gRPC {server.grpc_url}, "
            f"HTTP 127.0.0.1:{server.http_port}, metrics 127.0.0.1:{server.metrics_port}",
            flush=True,
        )
        while not stop and server.process is not None and server.process.poll() is None:
            time.sleep(0.2)
    return 0
