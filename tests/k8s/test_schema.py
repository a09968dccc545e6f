"""Every rendered object against the Kubernetes API's own schemas (kubernetes-validate,
--strict: unknown fields are errors), for the oldest Kubernetes facegrid supports and
the newest the validator knows."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.k8s.rendering import K8S_VENV, TARGETS, rendered, rendered_text, tool

# 1.30: the oldest release facegrid's manifests are written for (README); 1.37: newest.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
# Custom resources: the validator has no schema for them (their operators check them on
# apply); anything else without a schema is a typo in a kind or an apiVersion.
CUSTOM_RESOURCES = {
    "Certificate with api version cert-manager.io/v1",
    "ClusterIssuer with api version cert-manager.io/v1",
    "PodMonitor with api version monitoring.coreos.com/v1",
    "Cluster with api version postgresql.cnpg.io/v1",
}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("target", TARGETS)
def test_manifests_match_the_api_schemas(target: str, version: str, tmp_path: Path) -> None:
    manifests = tmp_path / f"{target}.yaml"
    manifests.write_text(rendered_text(target))
    result = subprocess.run(
        [str(tool(K8S_VENV / "kubernetes-validate")), "--strict", "-k", version, str(manifests)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    unknown = [
        line
        for line in output.splitlines()
        if "Couldn't find schema" in line and not any(kind in line for kind in CUSTOM_RESOURCES)
    ]
    assert not unknown, unknown
    custom = sum(1 for line in output.splitlines() if "Couldn't find schema" in line)
    # Every other object was checked, and passed.
    assert output.count(" passed for resource ") == len(rendered(target)) - custom, output
