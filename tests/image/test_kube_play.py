"""A Deployment of the rendered manifests, run by podman as a pod (by hand: `make
test-image`, after `make image`).

`kustomize build k8s/overlays/small` gives the search Deployment and the ConfigMap;
`podman kube play` runs them with the pod's own securityContext, env from the ConfigMap
and the TLS Secret as a volume. The test asks health inside the pod, checks what the
manifests promise of the process (user 10001, read-only root, no capabilities, no new
privileges, a seccomp filter), then stops the pod and expects a clean exit.

Three departures from the manifests, all for podman 4.3 and this machine, none in the
manifests themselves: the store is Milvus Lite in /tmp (no Milvus server here); secret
volumes get ``optional: false`` (podman 4.3 dereferences a missing one and panics); and
the test Secret's ``data`` holds the PEM text itself, since podman 4.3 writes ``data``
to the files without base64-decoding it.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from tests.image.conftest import container_logs, podman
from tests.k8s.rendering import named

RUNTIME_CONF = """[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
[engine]
runtime = "runc"
"""
CONTAINER = "search-pod-0-search"  # podman's name: <deployment>-pod-<n>-<container>
INSIDE = """
import grpc, os
from grpc_health.v1 import health_pb2, health_pb2_grpc
with grpc.insecure_channel("127.0.0.1:8086") as channel:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
print("health", health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
print("uid", os.getuid(), os.getgid())
try:
    open("/etc/written", "w")
except OSError as error:
    print("rootfs", error.strerror)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print("caps", status["CapEff"].strip(), "nnp", status["NoNewPrivs"].strip(),
      "seccomp", status["Seccomp"].strip())
"""


def tls_secret() -> dict[str, Any]:
    ca = trustme.CA()
    leaf = ca.issue_cert("search", "search.facegrid.svc", "localhost")
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "facegrid-internal-tls"},
        "data": {
            "tls.crt": leaf.cert_chain_pems[0].bytes().decode(),
            "tls.key": leaf.private_key_pem.bytes().decode(),
            "ca.crt": ca.cert_pem.bytes().decode(),
        },
    }


@pytest.fixture
def search_pod(image: str, tmp_path: Path) -> Iterator[None]:
    config = dict(named("small", "ConfigMap", "facegrid"))
    config["data"] = {**config["data"], "FACEGRID_STORE__URI": "/tmp/facegrid.db"}
    deployment = copy.deepcopy(named("small", "Deployment", "search"))
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == image
    for volume in deployment["spec"]["template"]["spec"]["volumes"]:
        if "secret" in volume:
            volume["secret"]["optional"] = False
    (tmp_path / "configmap.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "deployment.yaml").write_text(yaml.safe_dump(deployment))
    (tmp_path / "secret.yaml").write_text(yaml.safe_dump(tls_secret()))
    (tmp_path / "containers.conf").write_text(RUNTIME_CONF)
    env = {**os.environ, "CONTAINERS_CONF": str(tmp_path / "containers.conf")}
    podman("secret", "rm", "facegrid-internal-tls", check=False)
    podman("secret", "create", "facegrid-internal-tls", str(tmp_path / "secret.yaml"))
    deployment_file = str(tmp_path / "deployment.yaml")
    try:
        configmap = str(tmp_path / "configmap.yaml")
        podman("kube", "play", "--configmap", configmap, deployment_file, env=env)
        yield
    finally:
        podman("kube", "down", deployment_file, check=False)
        podman("volume", "rm", "--force", "facegrid-internal-tls", "tmp", check=False)
        podman("secret", "rm", "facegrid-internal-tls", check=False)


def test_the_rendered_deployment_runs_as_its_manifest_says(search_pod: None) -> None:
    lines: dict[str, list[str]] = {}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        inside = podman("exec", CONTAINER, "/opt/facegrid/bin/python", "-c", INSIDE, check=False)
        if inside.returncode == 0:
            lines = {line.split()[0]: line.split()[1:] for line in inside.stdout.splitlines()}
            break
        time.sleep(2)
    assert lines.get("health") == ["SERVING"], container_logs(CONTAINER)[-3000:]
    assert lines["uid"] == ["10001", "10001"]
    assert lines["rootfs"] == ["Read-only", "file", "system"]
    assert lines["caps"] == ["0000000000000000", "nnp", "1", "seccomp", "2"]

    # SIGTERM, as kubelet sends it, within the pod's grace period: a drained, clean exit.
    pod = named("small", "Deployment", "search")["spec"]["template"]["spec"]
    podman("pod", "stop", "--time", str(pod["terminationGracePeriodSeconds"]), "search-pod-0")
    state = podman("inspect", CONTAINER, "--format", "{{.State.ExitCode}}").stdout.strip()
    logs = container_logs(CONTAINER)
    assert state == "0", logs[-3000:]
    assert "search stopped" in logs
    assert "Traceback" not in logs
