"""The container image, started as Kubernetes would start it (run by hand: `make test-image`).

Not in `make test`: it needs podman (or buildah's runtime) and an image built by
`make image`, which takes minutes. The container runs as the manifests run it: user
10001, a read-only root filesystem with /tmp the only writable place, every capability
dropped, no privilege escalation, TLS from mounted files (the service refuses plaintext
on a non-loopback address), and health on its own plaintext port, as kubelet's gRPC
probes ask it. The test gets SERVING from grpc.health.v1, then stops the container with
SIGTERM and expects a clean exit within the drain and grace periods; the console, the
same over HTTPS and its /healthz.
"""

from __future__ import annotations

import os
import ssl
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import trustme
from cryptography.fernet import Fernet
from facegrid_harness.processes import free_port
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.image.conftest import RUN_FLAGS, container_logs, podman

HEALTH_DEADLINE_S = 90.0


@pytest.fixture
def tls_folder(tmp_path: Path) -> Path:
    """A CA and a server certificate for the service's name, readable by user 10001."""
    ca = trustme.CA()
    leaf = ca.issue_cert("search", "localhost", "127.0.0.1")
    folder = tmp_path / "tls"
    folder.mkdir()
    leaf.private_key_pem.write_to_path(str(folder / "tls.key"))
    leaf.cert_chain_pems[0].write_to_path(str(folder / "tls.crt"))
    ca.cert_pem.write_to_path(str(folder / "ca.crt"))
    for path in [folder, *folder.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    tmp_path.chmod(0o755)
    return folder


def run_as_kubernetes_would(
    image: str,
    name: str,
    volumes: dict[str, str],
    published: tuple[int, int],
    env: dict[str, str],
    args: list[str],
) -> None:
    """Start ``image`` detached as the manifests run a pod: user 10001, read-only root
    with /tmp the only writable place, every capability dropped, no privilege
    escalation; ``volumes`` (host folder -> mount point) read-only; one port published
    on 127.0.0.1 (host, container)."""
    host_port, container_port = published
    podman(
        "run", "--detach", "--name", name, *RUN_FLAGS,
        "--user", "10001:10001", "--read-only", "--tmpfs", "/tmp",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        *[f"--volume={source}:{target}:ro" for source, target in volumes.items()],
        "--publish", f"127.0.0.1:{host_port}:{container_port}",
        *[f"--env={key}={value}" for key, value in env.items()],
        image, *args,
    )  # fmt: skip


@pytest.fixture
def search_container(image: str, tls_folder: Path) -> Iterator[tuple[str, int]]:
    health_port = free_port()
    name = f"facegrid-image-test-{os.getpid()}"
    tls = "/etc/facegrid/tls"
    env = {
        "FACEGRID_SERVER__HOST": "0.0.0.0",
        "FACEGRID_SERVER__HEALTH_PORT": "8086",
        "FACEGRID_SERVER__DRAIN_S": "1",
        "FACEGRID_TLS__CERT_FILE": f"{tls}/tls.crt",
        "FACEGRID_TLS__KEY_FILE": f"{tls}/tls.key",
        "FACEGRID_TLS__CLIENT_CA_FILE": f"{tls}/ca.crt",
        "FACEGRID_STORE__URI": "/tmp/facegrid.db",
        "GRPC_VERBOSITY": "ERROR",
    }
    run_as_kubernetes_would(
        image, name, {str(tls_folder): tls}, (health_port, 8086), env,
        ["serve", "search", "--port", "50053"],
    )  # fmt: skip
    try:
        yield name, health_port
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)


def _health_status(port: int) -> int | None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            )
        except grpc.RpcError:
            return None
    return int(reply.status)


def test_the_image_serves_health_and_stops_cleanly(search_container: tuple[str, int]) -> None:
    name, port = search_container
    deadline = time.monotonic() + HEALTH_DEADLINE_S
    status = None
    while time.monotonic() < deadline:
        status = _health_status(port)
        if status == health_pb2.HealthCheckResponse.SERVING:
            break
        if podman("inspect", "--format", "{{.State.Running}}", name).stdout.strip() != "true":
            break
        time.sleep(1)
    logs = container_logs(name)
    assert status == health_pb2.HealthCheckResponse.SERVING, logs[-4000:]

    podman("stop", "--time", "30", name)
    exit_code = podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
    logs = container_logs(name)
    assert exit_code == "0", logs[-4000:]
    assert "Traceback" not in logs, logs[-4000:]


def test_the_image_serves_the_console_over_https(image: str, tls_folder: Path) -> None:
    """The console as k8s/base/console.yaml runs it: HTTPS with the mounted certificate,
    the session key from a mounted file, /healthz for the probes, a clean stop."""
    key_folder = tls_folder.parent / "console-session"
    key_folder.mkdir()
    (key_folder / "session.key").write_bytes(Fernet.generate_key())
    for path in (key_folder, key_folder / "session.key"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    port = free_port()
    name = f"facegrid-console-image-test-{os.getpid()}"
    env = {
        "FACEGRID_SERVER__HOST": "0.0.0.0",
        "FACEGRID_SERVER__DRAIN_S": "1",
        "FACEGRID_TLS__CERT_FILE": "/etc/facegrid/public-tls/tls.crt",
        "FACEGRID_TLS__KEY_FILE": "/etc/facegrid/public-tls/tls.key",
        "FACEGRID_TLS__CA_FILE": "/etc/facegrid/public-tls/ca.crt",
        "FACEGRID_CONSOLE__SESSION_KEY_FILE": "/etc/facegrid/console-session/session.key",
        "FACEGRID_CONSOLE__METRICS_PORT": "0",
    }
    volumes = {
        str(tls_folder): "/etc/facegrid/public-tls",
        str(key_folder): "/etc/facegrid/console-session",
    }
    run_as_kubernetes_would(
        image, name, volumes, (port, 8443), env, ["serve", "console", "--port", "8443"]
    )
    try:
        context = ssl.create_default_context(cafile=str(tls_folder / "ca.crt"))
        deadline = time.monotonic() + HEALTH_DEADLINE_S
        status = None
        while time.monotonic() < deadline and status != 200:
            try:
                with urllib.request.urlopen(
                    f"https://localhost:{port}/healthz", context=context, timeout=2
                ) as reply:
                    status = reply.status
            except OSError:
                time.sleep(1)
        assert status == 200, container_logs(name)[-4000:]
        podman("stop", "--time", "30", name)
        exit_code = podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
        logs = container_logs(name)
        assert exit_code == "0", logs[-4000:]
        assert "Traceback" not in logs, logs[-4000:]
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)
