"""EmbeddingService: aligned chips -> L2-normalised embeddings, batched across calls."""

from __future__ import annotations

import grpc
import numpy as np
from facegrid import telemetry
from facegrid.config import Settings
from facegrid.errors import invalid_argument, invalid_arguments
from facegrid.inference import InferenceBackend, create_backend
from facegrid.internal.v1 import embedding_pb2, embedding_pb2_grpc
from facegrid.metrics import QUEUE_DEPTH
from facegrid.models.repository import EMBEDDER_SPEC
from facegrid.server import FacegridServer, ServiceRegistration, run_until_stopped
from facegrid.similarity import load_calibration
from facegrid.v1 import common_pb2
from numpy.typing import NDArray

from facegrid_embedding.batcher import MicroBatcher

CHIP_SIZE = 150
CHIP_BYTES = CHIP_SIZE * CHIP_SIZE * 3
DIMENSION = 128
MODEL_NAME = "dlib_face_recognition_resnet_model_v1"


# Model versions of the mirrored-chip average carry this suffix: their embeddings differ.
MIRROR_SUFFIX = "+mirror"


class Embedder:
    """The embedding model behind a micro-batcher; results are L2-normalised.

    With ``embedding.mirror_average`` (the default), each chip is embedded twice, as it
    is and mirrored left to right, and the two raw descriptors are summed before
    normalising. Measured on ../shared/data/lfw-dev, it raises the true accept rate at
    a false match rate of 1e-4 from 79.4% to 84.4% for twice the model time (README).
    """

    def __init__(self, settings: Settings, backend: InferenceBackend) -> None:
        self._backend = backend
        self._model = settings.inference.embedder_model
        self._mirror = settings.embedding.mirror_average
        cfg = settings.embedding
        self.batcher = MicroBatcher(
            self._run_batch, cfg.max_batch, cfg.max_batch_delay_ms / 1000.0, cfg.max_queued_chips
        )

    async def _run_batch(self, chips: NDArray[np.uint8]) -> NDArray[np.float32]:
        if not self._mirror:
            return await self._infer(chips)
        both = np.concatenate([chips, chips[:, :, ::-1, :]])
        raw = await self._infer(both)
        return raw[: len(chips)] + raw[len(chips) :]

    async def _infer(self, chips: NDArray[np.uint8]) -> NDArray[np.float32]:
        parts = []
        for start in range(0, len(chips), EMBEDDER_SPEC.max_batch_size):
            outputs = await self._backend.infer(
                self._model,
                {
                    "chips": np.ascontiguousarray(
                        chips[start : start + EMBEDDER_SPEC.max_batch_size]
                    )
                },
                ["descriptors"],
            )
            parts.append(np.asarray(outputs["descriptors"], dtype=np.float32))
        return np.concatenate(parts)

    async def embed(
        self, chips: NDArray[np.uint8]
    ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """(unit-length embeddings, raw norms) for N x 150 x 150 x 3 chips."""
        raw = await self.batcher.submit(chips)
        norms = np.linalg.norm(raw, axis=1)
        return raw / np.maximum(norms, 1e-12)[:, None], norms

    async def model_version(self) -> str:
        version = await self._backend.model_version(self._model)
        return version + MIRROR_SUFFIX if self._mirror else version


def chips_from_request(
    request: embedding_pb2.EmbedChipsRequest, max_chips: int
) -> NDArray[np.uint8]:
    count = len(request.chips)
    if count == 0:
        raise invalid_argument("chips", "at least one chip is required")
    if count > max_chips:
        raise invalid_argument("chips", f"at most {max_chips} chips per call, got {count}")
    violations = []
    for index, chip in enumerate(request.chips):
        if chip.width != CHIP_SIZE or chip.height != CHIP_SIZE:
            violations.append(
                (
                    f"chips[{index}]",
                    f"chip is {chip.width}x{chip.height}; the model takes {CHIP_SIZE}x{CHIP_SIZE}",
                )
            )
        elif len(chip.rgb) != CHIP_BYTES:
            violations.append(
                (f"chips[{index}].rgb", f"expected {CHIP_BYTES} bytes, got {len(chip.rgb)}")
            )
    if violations:
        raise invalid_arguments(violations, reason="INVALID_CHIP")
    joined = b"".join(chip.rgb for chip in request.chips)
    return np.frombuffer(joined, np.uint8).reshape(count, CHIP_SIZE, CHIP_SIZE, 3)


class EmbeddingServicer(embedding_pb2_grpc.EmbeddingServiceServicer):  # type: ignore[misc]
    def __init__(self, settings: Settings, embedder: Embedder) -> None:
        self._settings = settings
        self._embedder = embedder

    async def EmbedChips(  # noqa: N802 - gRPC method name
        self,
        request: embedding_pb2.EmbedChipsRequest,
        context: grpc.aio.ServicerContext,
    ) -> embedding_pb2.EmbedChipsResponse:
        chips = chips_from_request(request, self._settings.embedding.max_chips_per_request)
        telemetry.annotate(chip_count=int(chips.shape[0]))
        vectors, norms = await self._embedder.embed(chips)
        return embedding_pb2.EmbedChipsResponse(
            embeddings=[
                common_pb2.Embedding(values=vector.tolist(), raw_norm=float(norm))
                for vector, norm in zip(vectors, norms, strict=True)
            ],
            model_version=await self._embedder.model_version(),
            dimension=int(vectors.shape[1]),
        )

    async def GetModelInfo(  # noqa: N802 - gRPC method name
        self,
        request: embedding_pb2.GetModelInfoRequest,
        context: grpc.aio.ServicerContext,
    ) -> embedding_pb2.GetModelInfoResponse:
        model_version = await self._embedder.model_version()
        # The committed calibration of this model version; unset when there is none.
        record = load_calibration(model_version)
        return embedding_pb2.GetModelInfoResponse(
            model_version=model_version,
            model_name=MODEL_NAME,
            dimension=DIMENSION,
            chip_width=CHIP_SIZE,
            chip_height=CHIP_SIZE,
            max_batch_size=self._settings.embedding.max_chips_per_request,
            backend=(
                "onnxruntime" if self._settings.inference.backend.value == "local" else "triton"
            ),
            similarity_calibration=record.message if record is not None else None,
        )


def build_server(
    settings: Settings, servicer: EmbeddingServicer, port: int | None = None
) -> FacegridServer:
    """The embedding service's gRPC server around a servicer built with its dependencies (in
    the event loop it will run in); on ``embedding.port`` unless ``port`` is given."""
    registration = ServiceRegistration.of(
        embedding_pb2,
        "EmbeddingService",
        embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server,
        servicer,
    )
    return FacegridServer.for_service("embedding", registration, settings, port)


async def serve(settings: Settings) -> None:
    backend = create_backend(settings.inference, [settings.inference.embedder_model], settings.tls)
    embedder = Embedder(settings, backend)
    embedder.batcher.start()
    QUEUE_DEPTH.labels("embedding_chips").set_function(lambda: embedder.batcher.queued_chips)
    servicer = EmbeddingServicer(settings, embedder)
    server = build_server(settings, servicer)

    async def on_stop() -> None:
        await embedder.batcher.close()
        await backend.close()

    await run_until_stopped(server, on_stop)
