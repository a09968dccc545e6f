"""The model repository's layout and the models' tensor contract, as the services read them.

Layout (Triton's): ``<repo>/<model>/config.pbtxt`` and ``<repo>/<model>/1/model.onnx``.
The same ONNX files are what the in-process (local) backend runs, so both backends
serve identical models. :mod:`facegrid_models.build` writes the repository (the
``models`` extra, with onnx); the services only read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

DETECTOR_MODEL = "face_detector"
EMBEDDER_MODEL = "face_embedder"
MODEL_VERSION_DIR = "1"
MANIFEST_NAME = "facegrid_models.json"
# config.pbtxt parameter that carries the model version to Triton clients.
MODEL_VERSION_PARAMETER = "facegrid_model_version"


class TritonBackend(StrEnum):
    ONNXRUNTIME = "onnxruntime"
    PYTHON = "python"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # Triton's TYPE_* name
    dims: tuple[int, ...]  # without the batch dimension when max_batch_size > 0


@dataclass(frozen=True)
class ModelSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    dynamic_batching: bool


# The contract between the services and the model server. Clients (local or Triton)
# use exactly these names, dtypes and shapes.
DETECTOR_SPEC = ModelSpec(
    name=DETECTOR_MODEL,
    inputs=(TensorSpec("image", "TYPE_FP32", (-1, -1, -1, 3)),),  # float pixels, 0-255
    outputs=(TensorSpec("scores", "TYPE_FP32", (-1, 1, -1, -1)),),
    max_batch_size=0,  # one tiled pyramid image per request; sizes differ
    dynamic_batching=False,
)
EMBEDDER_SPEC = ModelSpec(
    name=EMBEDDER_MODEL,
    inputs=(TensorSpec("chips", "TYPE_UINT8", (150, 150, 3)),),
    outputs=(TensorSpec("descriptors", "TYPE_FP32", (128,)),),
    max_batch_size=64,
    dynamic_batching=True,
)
# Bounded queue in Triton's dynamic batcher: beyond it Triton rejects (UNAVAILABLE).
EMBEDDER_MAX_QUEUE = 1024
EMBEDDER_MAX_QUEUE_DELAY_US = 2000


def onnx_path(repo: Path, model_name: str) -> Path:
    return repo / model_name / MODEL_VERSION_DIR / "model.onnx"
