"""`facegrid up`: the services and a local nats-server as processes, healthy, seeded,
stopped by Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
from facegrid.auth import bearer_metadata
from facegrid.v1 import common_pb2, face_service_pb2, face_service_pb2_grpc
from facegrid_harness.processes import free_ports
from grpc_helpers import png_bytes
from skimage import data

SERVICES = ("detection", "embedding", "search", "gateway", "ingest", "console")


def test_up_starts_seeds_and_stops_everything(model_repo: Path, tmp_path: Path) -> None:
    free = free_ports(2 * len(SERVICES) + 1)
    ports = dict(zip(SERVICES, free[: len(SERVICES)], strict=True))
    metrics_ports = dict(zip(SERVICES, free[len(SERVICES) : 2 * len(SERVICES)], strict=True))
    command = [sys.executable, "-m", "facegrid.cli", "up"]
    command += ["--set", f"inference.model_repository={model_repo}"]
    nats_port = free[-1]
    command += ["--set", f"ingest.nats_url=nats://127.0.0.1:{nats_port}"]
    for name, port in ports.items():
        command += [
            "--set",
            f"{name}.port={port}",
            "--set",
            f"{name}.metrics_port={metrics_ports[name]}",
        ]
    # The demo collection is seeded by default, from the manifest inside the package.
    # Run where a user would: var/ (database, audit log, credentials) is created here.
    up = subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    try:
        assert up.stdout is not None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = up.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "facegrid is up" in line:
                break
        output = "".join(lines)
        assert "facegrid is up" in output, _tail(output)
        for name, port in ports.items():
            scheme = "http://" if name == "console" else ""  # the console's pages
            assert f"{name:10} healthy on {scheme}127.0.0.1:{port}" in output
        assert f"{'nats':10} healthy on 127.0.0.1:{nats_port}" in output
        assert "seeded" in output

        # The demo collection answers at once, with the token `up` left for the client.
        token = (tmp_path / "var" / "admin.token").read_text().strip()
        assert (tmp_path / "var" / "admin.token").stat().st_mode & 0o077 == 0
        with grpc.insecure_channel(f"127.0.0.1:{ports['gateway']}") as channel:
            stub = face_service_pb2_grpc.FaceServiceStub(channel)
            reply = stub.SearchSubjectsByImage(
                face_service_pb2.SearchSubjectsByImageRequest(
                    parent="collections/demo",
                    image=png_bytes(data.astronaut()),
                    context=common_pb2.IdentificationContext(
                        purpose=common_pb2.IdentificationContext.PURPOSE_TESTING,
                        case_id="demo-1",
                    ),
                ),
                timeout=60,
                metadata=bearer_metadata(token),
            )
        assert [m.subject.subject_id for m in reply.subject_matches] == ["eileen-collins"]
        # The console answers, and its session key was made beside the other secrets.
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['console']}/sign-in") as page:
            assert "Access token" in page.read().decode()
        assert (tmp_path / "var" / "console-session.key").stat().st_mode & 0o077 == 0
    finally:
        up.send_signal(signal.SIGINT)  # Ctrl-C
        rest, _ = up.communicate(timeout=60)
    output = "".join(lines) + rest
    assert up.returncode == 0, _tail(output)
    for name in SERVICES:
        assert f"{name:10} stopped (0)" in output, _tail(output)
    assert f"{'nats':10} stopped" in output
    # A quiet stop: no service prints a traceback (asyncio's CancelledError) on its way out.
    noise = _around(output, ("Traceback", "CancelledError"))
    assert not noise, "a traceback in what `facegrid up` printed:\n" + noise
    assert (tmp_path / "var" / "nats" / "jetstream").is_dir()  # JetStream on local disk


def _tail(output: str, count: int = 40) -> str:
    """The end of what `facegrid up` printed (all of it would bury the failure)."""
    return "\n".join(output.splitlines()[-count:])


def _around(output: str, words: tuple[str, ...], before: int = 3, after: int = 25) -> str:
    """The lines around each line holding one of ``words``, at most 80 lines."""
    lines = output.splitlines()
    keep: set[int] = set()
    for index, line in enumerate(lines):
        if any(word in line for word in words):
            keep.update(range(max(0, index - before), min(len(lines), index + after + 1)))
    return "\n".join(lines[index] for index in sorted(keep)[:80])
