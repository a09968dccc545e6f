"""Starting services: one in the foreground, or all of them on one machine."""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from facegrid.config import Settings, load_settings

# service name -> module whose ``serve(settings)`` coroutine runs it until stopped.
SERVICES = {
    "detection": "facegrid_detection.app",
    "embedding": "facegrid_embedding.app",
    "search": "facegrid_search.app",
}
# Order of `facegrid up`: dependencies first.
UP_ORDER = ("detection", "embedding", "search")
HEALTH_TIMEOUT_S = 120.0


def service_port(settings: Settings, service: str) -> int:
    section = getattr(settings, service)
    return int(section.port)


def serve_one(service: str, overrides: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # faiss (under Milvus Lite) logs each CPU-specific build it cannot load, at INFO.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    settings = load_settings(overrides)
    module = importlib.import_module(SERVICES[service])
    asyncio.run(module.serve(settings))
    return 0


def wait_healthy(
    address: str, timeout_s: float, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Block until the gRPC health service at ``address`` says SERVING."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
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


def up(overrides: list[str]) -> int:
    """Run every service as its own process; stop them all on Ctrl-C or SIGTERM."""
    settings = load_settings(overrides)
    processes: dict[str, subprocess.Popen[bytes]] = {}
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        for name in UP_ORDER:
            command = [sys.executable, "-m", "facegrid.cli", "serve", name]
            for override in overrides:
                command += ["--set", override]
            # Own session: Ctrl-C reaches only this launcher, which stops them in order.
            processes[name] = subprocess.Popen(command, start_new_session=True)
            address = f"{settings.server.host}:{service_port(settings, name)}"
            wait_healthy(address, HEALTH_TIMEOUT_S, processes[name])
            print(f"  {name:10} healthy on {address}", flush=True)
        print("facegrid is up. Press Ctrl-C to stop.", flush=True)
        while not stopping:
            for name, process in processes.items():
                if process.poll() is not None:
                    print(f"{name} exited with {process.returncode}; stopping", flush=True)
                    return 1
            time.sleep(0.2)
        return 0
    finally:
        _stop_all(processes, settings.server.grace_period_s + 5)


def _stop_all(processes: dict[str, subprocess.Popen[bytes]], timeout_s: float) -> None:
    for process in reversed(list(processes.values())):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for name, process in processes.items():
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        print(f"  {name:10} stopped ({process.returncode})", flush=True)


def run_triton(repo: Path, venv: Path) -> int:
    from facegrid.triton_server import TritonInstall, TritonServer

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
