"""A policy scan of the rendered manifests (checkov's Kubernetes checks, offline): no
finding but the accepted ones in k8s/policy-exceptions.yaml, each with its reason, and
no stale exception."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s.rendering import K8S, K8S_VENV, TARGETS, rendered_text, tool

EXCEPTIONS = K8S / "policy-exceptions.yaml"


def accepted() -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = yaml.safe_load(EXCEPTIONS.read_text())
    for entry in entries:
        assert entry["why"].strip(), entry
        assert entry["in"], entry
    return entries


@pytest.fixture(scope="module")
def findings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[tuple[str, str]]]:
    """(check id, resource) of every failed check, per target."""
    folder = tmp_path_factory.mktemp("rendered")
    files = []
    for target in TARGETS:
        path = folder / f"{target}.yaml"
        path.write_text(rendered_text(target))
        files += ["--file", str(path)]
    result = subprocess.run(
        [
            str(tool(K8S_VENV / "checkov")),
            *files,
            "--framework", "kubernetes",
            "--output", "json",
            "--compact", "--quiet",
            # Offline: no guidelines or policies fetched from the vendor's platform.
            "--skip-download",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )  # fmt: skip
    assert result.returncode in (0, 1), result.stderr[-4000:]  # 1: some check failed
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    found: dict[str, set[tuple[str, str]]] = {target: set() for target in TARGETS}
    for part in reports:
        assert part["summary"]["parsing_errors"] == 0, part["summary"]
        assert part["summary"]["passed"] > 0
        for check in part["results"]["failed_checks"]:
            target = Path(check["file_path"]).stem
            found[target].add((check["check_id"], check["resource"]))
    return found


@pytest.mark.parametrize("target", TARGETS)
def test_no_finding_but_the_accepted_ones(
    target: str, findings: dict[str, set[tuple[str, str]]]
) -> None:
    allowed = {entry["check"] for entry in accepted() if target in entry["in"]}
    unexpected = sorted(finding for finding in findings[target] if finding[0] not in allowed)
    assert not unexpected, unexpected


def test_every_accepted_finding_still_occurs(findings: dict[str, set[tuple[str, str]]]) -> None:
    for entry in accepted():
        for target in entry["in"]:
            assert any(check == entry["check"] for check, _ in findings[target]), (
                f"{entry['check']} no longer occurs in {target}: drop it from {EXCEPTIONS.name}"
            )
