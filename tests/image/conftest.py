"""What the by-hand image tests share: podman, its flags here, and the built image."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

IMAGE = os.environ.get("FACEGRID_IMAGE", "localhost/facegrid:0.1.0")
PODMAN = os.environ.get("PODMAN", "podman")
# This machine's cgroup set-up needs runc and lowered ulimits (README, "Container image").
RUN_FLAGS = os.environ.get(
    "PODMAN_RUN_FLAGS", "--runtime runc --ulimit nofile=1024:1024 --ulimit nproc=4096:4096"
).split()


def podman(
    *args: str, check: bool = True, timeout: float = 180, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PODMAN, *args], capture_output=True, text=True, check=check, timeout=timeout, env=env
    )


def container_logs(name: str) -> str:
    """What the container wrote, stdout and stderr (the services log to stderr)."""
    result = podman("logs", name, check=False)
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def image() -> str:
    if shutil.which(PODMAN) is None:
        pytest.fail(f"{PODMAN} is not installed (apt-get install podman buildah runc)")
    if podman("image", "exists", IMAGE, check=False).returncode != 0:
        pytest.fail(f"no image {IMAGE}: build it with `make image`")
    return IMAGE
