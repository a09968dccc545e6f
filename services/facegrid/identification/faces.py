"""Image -> faces -> embeddings, through the detection and embedding services."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from facegrid import limits
from facegrid.config import QualityLevel
from facegrid.errors import failed_precondition, invalid_argument
from facegrid.identification.deadline import Deadline
from facegrid.identification.downstream import Downstream
from facegrid.identification.policy import QualityPolicy
from facegrid.internal.v1 import detection_pb2, embedding_pb2
from facegrid.similarity import Calibration, load_calibration
from facegrid.v1 import common_pb2


@dataclass(frozen=True)
class ModelInfo:
    """The embedding model the gateway's services run, with its calibration."""

    version: str
    dimension: int
    calibration_message: common_pb2.SimilarityCalibration
    calibration: Calibration


@dataclass(frozen=True)
class Detected:
    response: detection_pb2.DetectFacesResponse

    @property
    def faces(self) -> list[common_pb2.FaceDetail]:
        return list(self.response.faces)


@dataclass(frozen=True)
class Probe:
    """The largest face of an image, ready to search with."""

    face: common_pb2.FaceDetail  # without its chip
    embedding: common_pb2.Embedding
    model_version: str
    detected_face_count: int


def without_chip(face: common_pb2.FaceDetail) -> common_pb2.FaceDetail:
    copy = common_pb2.FaceDetail()
    copy.CopyFrom(face)
    copy.ClearField("chip")
    return copy


class FacePipeline:
    def __init__(self, downstream: Downstream, quality: QualityPolicy) -> None:
        self._downstream = downstream
        self.quality = quality
        self._model: ModelInfo | None = None
        self._model_lock = asyncio.Lock()

    async def model(self, deadline: Deadline) -> ModelInfo:
        """The embedding model's version and calibration, asked once and then kept."""
        async with self._model_lock:
            if self._model is None:
                info = await self._downstream.call(
                    self._downstream.embedding.GetModelInfo,
                    embedding_pb2.GetModelInfoRequest(),
                    deadline,
                    "embedding",
                )
                record = load_calibration(info.model_version)
                if record is None or not info.HasField("similarity_calibration"):
                    raise failed_precondition(
                        "CALIBRATION",
                        info.model_version,
                        f"no similarity calibration is known for model {info.model_version!r}",
                    )
                self._model = ModelInfo(
                    version=info.model_version,
                    dimension=info.dimension,
                    calibration_message=info.similarity_calibration,
                    calibration=Calibration.from_proto(info.similarity_calibration),
                )
            return self._model

    async def detect(
        self,
        image: bytes,
        deadline: Deadline,
        field: str = "image",
        include_chips: bool = True,
        max_faces: int = limits.MAX_FACES_PER_IMAGE,
        min_confidence: float | None = None,
        min_face_size: int | None = None,
    ) -> Detected:
        request = detection_pb2.DetectFacesRequest(
            image=image, max_faces=max_faces, include_chips=include_chips
        )
        if min_confidence is not None:
            request.min_confidence = min_confidence
        if min_face_size is not None:
            if min_face_size < limits.MIN_FACE_SIZE:
                raise invalid_argument(
                    "min_face_size",
                    f"must be at least {limits.MIN_FACE_SIZE} pixels, got {min_face_size}",
                )
            request.min_face_size = min_face_size
        response = await self._downstream.call(
            self._downstream.detection.DetectFaces,
            request,
            deadline,
            "detection",
            renames={"image": field},
        )
        return Detected(response)

    async def embed(
        self, faces: list[common_pb2.FaceDetail], deadline: Deadline
    ) -> tuple[list[common_pb2.Embedding], str]:
        if not faces:
            return [], ""
        response = await self._downstream.call(
            self._downstream.embedding.EmbedChips,
            embedding_pb2.EmbedChipsRequest(chips=[f.chip for f in faces]),
            deadline,
            "embedding",
        )
        return list(response.embeddings), response.model_version

    async def probe(
        self,
        image: bytes,
        quality_filter: int,
        deadline: Deadline,
        field: str = "image",
    ) -> Probe:
        """The largest face, which must pass the quality filter and the probe minimum; a
        smaller one never stands in."""
        level = self.quality.level(quality_filter)
        detected = await self.detect(image, deadline, field)
        if not detected.faces:
            raise invalid_argument(field, "no face was found in the image", reason="NO_FACE")
        largest = detected.faces[0]
        self.check_probe_quality(largest, level, field)
        embeddings, version = await self.embed([largest], deadline)
        return Probe(without_chip(largest), embeddings[0], version, len(detected.faces))

    def check_probe_quality(
        self, face: common_pb2.FaceDetail, level: QualityLevel | None, field: str
    ) -> None:
        """FACE_QUALITY naming each failed measure (ErrorInfo metadata ``measures``)."""
        failures = self.quality.probe_failures(face, level)
        if failures:
            raise invalid_argument(
                field,
                "the largest face cannot be searched reliably: "
                + "; ".join(f.text for f in failures),
                reason="FACE_QUALITY",
                metadata={"measures": ",".join(dict.fromkeys(f.measure for f in failures))},
            )


def cosines(probe: common_pb2.Embedding, others: list[common_pb2.Embedding]) -> NDArray[np.float64]:
    if not others:
        return np.zeros(0)
    matrix = np.array([list(e.values) for e in others], dtype=np.float64)
    return matrix @ np.array(list(probe.values), dtype=np.float64)
