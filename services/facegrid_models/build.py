"""Writes the Triton model repository from the weights installed by face-recognition-models.

``backend="python"`` wraps each model in Triton's python backend (a ``model.py`` running
onnxruntime) for servers without the onnxruntime backend; the tensor names, dtypes and
shapes (:mod:`facegrid.models.repository`) are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import onnx
from facegrid.models.repository import (
    DETECTOR_SPEC,
    EMBEDDER_MAX_QUEUE,
    EMBEDDER_MAX_QUEUE_DELAY_US,
    EMBEDDER_SPEC,
    MANIFEST_NAME,
    MODEL_VERSION_DIR,
    MODEL_VERSION_PARAMETER,
    ModelSpec,
    TensorSpec,
    TritonBackend,
)


def render_config(spec: ModelSpec, backend: TritonBackend, model_version: str) -> str:
    """config.pbtxt text for one model."""
    lines = [f'name: "{spec.name}"', f'backend: "{backend.value}"']
    lines.append(f"max_batch_size: {spec.max_batch_size}")
    lines += [_tensor_block("input", spec.inputs), _tensor_block("output", spec.outputs)]
    if spec.dynamic_batching:
        lines.append(
            "dynamic_batching {\n"
            "  preferred_batch_size: [ 8, 16, 32, 64 ]\n"
            f"  max_queue_delay_microseconds: {EMBEDDER_MAX_QUEUE_DELAY_US}\n"
            f"  default_queue_policy {{ max_queue_size: {EMBEDDER_MAX_QUEUE} }}\n"
            "}"
        )
    if backend is TritonBackend.PYTHON:
        # The python backend runs onnxruntime on the CPU inside its stub process.
        lines.append("instance_group [ { count: 1, kind: KIND_CPU } ]")
    # The onnxruntime backend is left to place itself: one instance per GPU, else CPU.
    lines.append("version_policy: { latest { num_versions: 1 } }")
    lines.append(
        f'parameters {{ key: "{MODEL_VERSION_PARAMETER}" '
        f'value {{ string_value: "{model_version}" }} }}'
    )
    return "\n".join(lines) + "\n"


def _tensor_block(kind: str, tensors: tuple[TensorSpec, ...]) -> str:
    entries = []
    for tensor in tensors:
        dims = ", ".join(str(d) for d in tensor.dims)
        entries.append(
            f'  {{ name: "{tensor.name}" data_type: {tensor.data_type} dims: [ {dims} ] }}'
        )
    return f"{kind} [\n" + ",\n".join(entries) + "\n]"


@dataclass(frozen=True)
class BuiltModel:
    name: str
    path: Path
    sha256: str
    model_version: str


def build_repository(
    repo: Path, backend: TritonBackend = TritonBackend.ONNXRUNTIME
) -> list[BuiltModel]:
    """Convert both networks and write a complete Triton model repository into ``repo``."""
    from facegrid.models.weights import detector_weights, embedder_weights

    from facegrid_models import onnx_export

    builders: list[tuple[ModelSpec, Callable[[Path], onnx.ModelProto], Path]] = [
        (DETECTOR_SPEC, onnx_export.build_detector_onnx, detector_weights()),
        (EMBEDDER_SPEC, onnx_export.build_embedder_onnx, embedder_weights()),
    ]
    repo.mkdir(parents=True, exist_ok=True)
    built = []
    for spec, build, weights in builders:
        built.append(_write_model(repo, spec, build(weights), backend))
    (repo / MANIFEST_NAME).write_text(
        json.dumps(
            {
                "backend": backend.value,
                "models": [
                    {"name": b.name, "sha256": b.sha256, "model_version": b.model_version}
                    for b in built
                ],
            },
            indent=2,
        )
        + "\n"
    )
    return built


def _write_model(
    repo: Path, spec: ModelSpec, model: onnx.ModelProto, backend: TritonBackend
) -> BuiltModel:
    model_dir = repo / spec.name
    if model_dir.exists():
        shutil.rmtree(model_dir)
    version_dir = model_dir / MODEL_VERSION_DIR
    version_dir.mkdir(parents=True)
    onnx_path = version_dir / "model.onnx"
    data = model.SerializeToString()
    onnx_path.write_bytes(data)
    version = model_version_of(model)
    (model_dir / "config.pbtxt").write_text(render_config(spec, backend, version))
    if backend is TritonBackend.PYTHON:
        template = resources.files("facegrid_models").joinpath(
            "templates/python_backend_model.py.tmpl"
        )
        (version_dir / "model.py").write_text(template.read_text())
    return BuiltModel(
        name=spec.name,
        path=onnx_path,
        sha256=hashlib.sha256(data).hexdigest(),
        model_version=version,
    )


def model_version_of(model: onnx.ModelProto) -> str:
    """The facegrid model version recorded in an ONNX file's metadata."""
    for prop in model.metadata_props:
        if prop.key == MODEL_VERSION_PARAMETER:
            return str(prop.value)
    return "unknown"
