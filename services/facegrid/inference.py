"""Model inference behind one interface: in-process onnxruntime or a Triton server.

Both backends serve the same ONNX files with the same tensor names, dtypes and shapes
(see :mod:`facegrid.models.repository`), selected by ``inference.backend``. Callers
await :meth:`InferenceBackend.infer`; the local backend runs onnxruntime in a thread
pool (it releases the GIL), the Triton backend uses tritonclient's asyncio gRPC client
with a deadline on every call.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray
from opentelemetry.trace import SpanKind

from facegrid import errors, telemetry, tls
from facegrid.config import InferenceBackendKind, InferenceSettings, TlsSettings
from facegrid.metrics import INFERENCE_BATCH, INFERENCE_LATENCY
from facegrid.models.repository import MODEL_VERSION_PARAMETER, onnx_path

Tensors = dict[str, NDArray[np.generic]]

_NUMPY_TO_TRITON = {np.dtype(np.uint8): "UINT8", np.dtype(np.float32): "FP32"}


class InferenceBackend(Protocol):
    """Runs a named model on named input tensors and returns the named outputs."""

    async def infer(self, model: str, inputs: Tensors, outputs: list[str]) -> Tensors: ...

    async def model_version(self, model: str) -> str: ...

    async def ready(self) -> bool: ...

    async def close(self) -> None: ...


class LocalBackend:
    """onnxruntime in this process, on the ONNX files of a model repository."""

    def __init__(self, settings: InferenceSettings, models: list[str]) -> None:
        self._sessions: dict[str, ort.InferenceSession] = {}
        self._versions: dict[str, str] = {}
        options = ort.SessionOptions()
        options.intra_op_num_threads = settings.intra_op_threads
        spinning = "1" if settings.allow_spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        for name in models:
            path = onnx_path(settings.model_repository, name)
            if not path.exists():
                raise FileNotFoundError(
                    f"{path} is missing: run `facegrid models build --repo "
                    f"{settings.model_repository}` first"
                )
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self._sessions[name] = session
            meta = session.get_modelmeta().custom_metadata_map
            self._versions[name] = meta.get("facegrid_model_version", "unknown")
        # One thread per concurrent inference; onnxruntime parallelises inside each.
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="onnxruntime")

    def run_sync(self, model: str, inputs: Tensors, outputs: list[str]) -> Tensors:
        session = self._session(model)
        results = session.run(outputs, inputs)
        return dict(zip(outputs, results, strict=True))

    async def infer(self, model: str, inputs: Tensors, outputs: list[str]) -> Tensors:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.run_sync, model, inputs, outputs)

    async def model_version(self, model: str) -> str:
        self._session(model)
        return self._versions[model]

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _session(self, model: str) -> ort.InferenceSession:
        try:
            return self._sessions[model]
        except KeyError:
            raise errors.internal(f"model {model!r} is not loaded") from None


class TritonBackend:
    """A Triton Inference Server over gRPC (tritonclient.grpc.aio)."""

    def __init__(self, settings: InferenceSettings, tls_settings: TlsSettings) -> None:
        import tritonclient.grpc.aio as triton_aio

        self._settings = settings
        # Over TLS when tls.ca_file is set (presenting tls.client_cert_file if set, for a
        # Triton started with --grpc-use-ssl-mutual); plaintext only to loopback.
        credentials = tls.channel_credentials(tls_settings)
        if credentials is None:
            tls.check_plaintext_client_allowed("triton", f"grpc://{settings.triton_url}")
        self._client = triton_aio.InferenceServerClient(settings.triton_url, creds=credentials)
        self._versions: dict[str, str] = {}

    async def infer(self, model: str, inputs: Tensors, outputs: list[str]) -> Tensors:
        import tritonclient.grpc as triton_grpc
        from tritonclient.utils import InferenceServerException

        request_inputs = []
        for name, array in inputs.items():
            tensor = triton_grpc.InferInput(name, list(array.shape), _triton_dtype(array))
            tensor.set_data_from_numpy(np.ascontiguousarray(array))
            request_inputs.append(tensor)
        requested = [triton_grpc.InferRequestedOutput(name) for name in outputs]
        try:
            result = await self._client.infer(
                model,
                request_inputs,
                outputs=requested,
                client_timeout=self._settings.triton_timeout_s,
                # W3C trace context: Triton joins the caller's trace when it traces.
                headers=telemetry.trace_headers(),
            )
        except InferenceServerException as exc:
            raise _map_triton_error(model, exc) from exc
        return {name: result.as_numpy(name) for name in outputs}

    async def model_version(self, model: str) -> str:
        if model not in self._versions:
            from tritonclient.utils import InferenceServerException

            try:
                config = await self._client.get_model_config(
                    model, as_json=True, client_timeout=self._settings.triton_timeout_s
                )
            except InferenceServerException as exc:
                raise _map_triton_error(model, exc) from exc
            parameters = config.get("config", {}).get("parameters", {})
            entry = parameters.get(MODEL_VERSION_PARAMETER, {})
            self._versions[model] = str(entry.get("string_value", "unknown"))
        return self._versions[model]

    async def ready(self) -> bool:
        try:
            return bool(
                await self._client.is_server_ready(client_timeout=self._settings.triton_timeout_s)
            )
        except Exception:
            return False

    async def close(self) -> None:
        await self._client.close()


class InstrumentedBackend:
    """A backend whose inference calls are spans and Prometheus observations."""

    def __init__(self, inner: InferenceBackend, kind: str) -> None:
        self._inner = inner
        self._kind = kind

    async def infer(self, model: str, inputs: Tensors, outputs: list[str]) -> Tensors:
        batch = int(next(iter(inputs.values())).shape[0]) if inputs else 0
        kind = SpanKind.CLIENT if self._kind == "triton" else SpanKind.INTERNAL
        started = time.perf_counter()
        with telemetry.span(
            f"inference {model}", kind, model=model, backend=self._kind, batch_size=batch
        ):
            result = await self._inner.infer(model, inputs, outputs)
        INFERENCE_LATENCY.labels(model, self._kind).observe(time.perf_counter() - started)
        INFERENCE_BATCH.labels(model, self._kind).observe(batch)
        return result

    async def model_version(self, model: str) -> str:
        return await self._inner.model_version(model)

    async def ready(self) -> bool:
        return await self._inner.ready()

    async def close(self) -> None:
        await self._inner.close()


def create_backend(
    settings: InferenceSettings, models: list[str], tls_settings: TlsSettings
) -> InferenceBackend:
    if settings.backend is InferenceBackendKind.TRITON:
        return InstrumentedBackend(TritonBackend(settings, tls_settings), "triton")
    return InstrumentedBackend(LocalBackend(settings, models), "onnxruntime")


def _triton_dtype(array: NDArray[np.generic]) -> str:
    try:
        return _NUMPY_TO_TRITON[array.dtype]
    except KeyError:
        raise errors.internal(f"no Triton dtype for {array.dtype}") from None


def _map_triton_error(model: str, exc: Exception) -> errors.ServiceError:
    status = str(getattr(exc, "status", lambda: "")() or "")
    text = str(exc)
    if "DEADLINE_EXCEEDED" in status or "Deadline" in text:
        return errors.deadline_exceeded(f"inference on {model} timed out")
    if "queue" in text.lower():
        return errors.resource_exhausted(model, f"Triton queue is full: {text}", "MODEL_QUEUE_FULL")
    return errors.unavailable(f"inference on {model} failed: {text}", "INFERENCE_UNAVAILABLE")


def load_manifest(repo: Path) -> dict[str, object]:
    """The manifest `facegrid models build` writes beside the models."""
    path = repo / "facegrid_models.json"
    return dict(json.loads(path.read_text())) if path.exists() else {}
