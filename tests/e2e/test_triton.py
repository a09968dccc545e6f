"""The real Triton server: model contract, agreement with in-process onnxruntime, cleanup."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import tritonclient.grpc as triton_grpc
from facegrid.config import InferenceBackendKind, InferenceSettings, TlsSettings
from facegrid.inference import LocalBackend, TritonBackend
from facegrid.models.repository import (
    DETECTOR_SPEC,
    EMBEDDER_SPEC,
    ModelSpec,
)
from facegrid.models.repository import (
    TritonBackend as RepoBackend,
)
from facegrid_detection import mmod
from facegrid_harness.triton_server import SHM_DIR, TritonInstall, TritonServer
from facegrid_models.build import render_config

TRITON_TYPES = {"TYPE_UINT8": "UINT8", "TYPE_FP32": "FP32"}


@pytest.mark.parametrize("spec", [DETECTOR_SPEC, EMBEDDER_SPEC], ids=lambda s: s.name)
def test_served_models_have_the_contract_tensors(triton: TritonServer, spec: ModelSpec) -> None:
    client = triton_grpc.InferenceServerClient(triton.grpc_url)
    try:
        assert client.is_model_ready(spec.name)
        metadata = client.get_model_metadata(spec.name, as_json=True)
    finally:
        client.close()
    batch = [-1] if spec.max_batch_size > 0 else []
    inputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in metadata["inputs"]}
    outputs = {
        t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in metadata["outputs"]
    }
    assert inputs == {
        t.name: (TRITON_TYPES[t.data_type], batch + list(t.dims)) for t in spec.inputs
    }
    assert outputs == {
        t.name: (TRITON_TYPES[t.data_type], batch + list(t.dims)) for t in spec.outputs
    }


def test_onnxruntime_backend_config_names_the_same_tensors() -> None:
    text = render_config(EMBEDDER_SPEC, RepoBackend.ONNXRUNTIME, "dlib_resnet_v1")
    assert 'backend: "onnxruntime"' in text
    assert 'name: "chips" data_type: TYPE_UINT8 dims: [ 150, 150, 3 ]' in text
    assert "dynamic_batching" in text
    assert "max_queue_size" in text
    assert "KIND_CPU" not in text  # placement left to Triton (GPUs when present)


def test_triton_and_local_backends_agree(triton: TritonServer, model_repo: Path) -> None:
    """The same tensors through Triton (production path) and in-process onnxruntime."""
    settings = InferenceSettings(model_repository=model_repo)
    pyramid = mmod.build_tiled_pyramid(skimage.data.astronaut())
    rng = np.random.default_rng(7)
    chips = rng.integers(0, 256, (5, 150, 150, 3), dtype=np.uint8)

    async def run() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], str]:
        local = LocalBackend(settings, ["face_detector", "face_embedder"])
        remote = TritonBackend(
            settings.model_copy(
                update={"backend": InferenceBackendKind.TRITON, "triton_url": triton.grpc_url}
            ),
            TlsSettings(),
        )
        try:
            results = {}
            for name, backend in (("local", local), ("triton", remote)):
                scores = await backend.infer(
                    "face_detector", {"image": pyramid.trunk_input(np.float32)}, ["scores"]
                )
                descriptors = await backend.infer(
                    "face_embedder", {"chips": chips}, ["descriptors"]
                )
                results[name] = {**scores, **descriptors}
            version = await remote.model_version("face_embedder")
        finally:
            await local.close()
            await remote.close()
        return results["local"], results["triton"], version

    local, remote, version = asyncio.run(run())
    assert version == "dlib_resnet_v1"
    assert remote["descriptors"].dtype == np.float32
    assert np.abs(local["descriptors"] - remote["descriptors"]).max() <= 1e-5
    assert np.abs(local["scores"] - remote["scores"]).max() <= 1e-5


def test_server_stops_without_leaving_processes_or_shared_memory(
    model_repo: Path, tmp_path: Path
) -> None:
    from conftest import TRITON_VENV

    server = TritonServer(TritonInstall.discover(TRITON_VENV), model_repo, tmp_path)
    with server:
        process = server.process
        assert process is not None
        pid = process.pid
        assert list(SHM_DIR.glob(f"{server.shm_prefix}*"))  # the python backend's regions
        stubs = _children_of(pid)
        assert stubs, "expected python-backend stub processes"
    assert process.poll() is not None
    assert not list(SHM_DIR.glob(f"{server.shm_prefix}*"))
    for child in [pid, *stubs]:
        assert not _alive(child), f"process {child} is still running"


def _children_of(pid: int) -> list[int]:
    children = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(
                line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line
            )
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            children.append(int(status.parent.name))
    return children


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in state  # a zombie has exited
