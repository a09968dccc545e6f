"""EmbeddingService: aligned chips -> L2-normalised embeddings, batched across calls."""

from __future__ import annotations

import grpc
import numpy as np
from facegrid import telemetry
from facegrid.config import Settings
from facegrid.errors import invalid_argument, invalid_arguments
from facegrid.inference import InferenceBackend, create_backend
from facegrid.metrics import QUEUE_DEPTH
from facegrid.server import FacegridServer, ServiceRegistration, run_until_stopped
from facegrid.similarity import load_calibration
from facegrid.v1 import common_pb2, embedding_pb2, embedding_pb2_grpc
from numpy.typing import NDArray

from facegrid_embedding.batcher import MicroBatcher

CHIP_SIZE = 150
CHIP_BYTES = CHIP_SIZE * CHIP_SIZE * 3
DIMENSION = 128
MODEL_NAME = "dlib_face_recognition_resnet_model_v1"


class Embedder:
    """The embedding model behind a micro-batcher; results are L2-normalised."""

    def __init__(self, settings: Settings, backend: InferenceBackend) -> None:
        self._backend = backend
        self._model = settings.inference.embedder_model
        cfg = settings.embedding
        self.batcher = MicroBatcher(
            self._run_batch, cfg.max_batch, cfg.max_batch_delay_ms / 1000.0, cfg.max_queued_chips
        )

    async def _run_batch(self, chips: NDArray[np.uint8]) -> NDArray[np.float32]:
        outputs = await self._backend.infer(self._model, {"chips": chips}, ["descriptors"])
        return np.asarray(outputs["descriptors"], dtype=np.float32)

    async def embed(
        self, chips: NDArray[np.uint8]
    ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """(unit-length embeddings, raw norms) for N x 150 x 150 x 3 chips."""
        raw = await self.batcher.submit(chips)
        norms = np.linalg.norm(raw, axis=1)
        return raw / np.maximum(norms, 1e-12)[:, None], norms

    async def model_version(self) -> str:
        return await self._backend.model_version(self._model)


def chips_from_request(
    request: embedding_pb2.EmbeddingServiceEmbedChipsRequest, max_chips: int
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
        request: embedding_pb2.EmbeddingServiceEmbedChipsRequest,
        context: grpc.aio.ServicerContext,
    ) -> embedding_pb2.EmbeddingServiceEmbedChipsResponse:
        chips = chips_from_request(request, self._settings.embedding.max_chips_per_request)
        telemetry.annotate(chip_count=int(chips.shape[0]))
        vectors, norms = await self._embedder.embed(chips)
        return embedding_pb2.EmbeddingServiceEmbedChipsResponse(
            embeddings=[
                common_pb2.Embedding(values=vector.tolist(), raw_norm=float(norm))
                for vector, norm in zip(vectors, norms, strict=True)
            ],
            model_version=await self._embedder.model_version(),
            dimension=int(vectors.shape[1]),
        )

    async def GetModelInfo(  # noqa: N802 - gRPC method name
        self,
        request: embedding_pb2.EmbeddingServiceGetModelInfoRequest,
        context: grpc.aio.ServicerContext,
    ) -> embedding_pb2.EmbeddingServiceGetModelInfoResponse:
        model_version = await self._embedder.model_version()
        # The committed calibration of this model version; unset when there is none.
        record = load_calibration(model_version)
        return embedding_pb2.EmbeddingServiceGetModelInfoResponse(
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


async def serve(settings: Settings) -> None:
    backend = create_backend(settings.inference, [settings.inference.embedder_model])
    embedder = Embedder(settings, backend)
    embedder.batcher.start()
    QUEUE_DEPTH.labels("embedding_chips").set_function(lambda: embedder.batcher.queued_chips)
    servicer = EmbeddingServicer(settings, embedder)
    server = FacegridServer(
        "embedding",
        [
            ServiceRegistration.of(
                embedding_pb2,
                "EmbeddingService",
                embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server,
                servicer,
            )
        ],
        settings.server,
        settings.embedding.port,
        settings.embedding.max_concurrent_rpcs,
    )

    async def on_stop() -> None:
        await embedder.batcher.close()
        await backend.close()

    await run_until_stopped(server, on_stop)
