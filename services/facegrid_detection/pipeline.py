"""The detection pipeline: decoded image -> faces with landmarks, quality and chips.

CPU work (pyramid, landmarks, chips) runs in a thread pool so the event loop stays free;
the detector trunk runs on the configured inference backend (in-process onnxruntime or
Triton), awaited in between.
"""

from __future__ import annotations

import asyncio
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from facegrid import telemetry
from facegrid.config import Settings
from facegrid.inference import InferenceBackend
from numpy.typing import NDArray
from PIL import Image

from facegrid_detection import mmod
from facegrid_detection.analysis import FaceAnalysis, FaceAnalyzer

# Confidence (0-100) = logistic(CONFIDENCE_SLOPE * detector score): dlib's operating point
# (score 0) is 50; the astronaut's face (score 1.06) is 98.6.
CONFIDENCE_SLOPE = 4.0
PIPELINE_SUFFIX = "sp5-chip150"
# The smallest face box (pixels) dlib's MMOD detector finds at its own scale (its window
# is 80x80); each doubling of the image halves it. Measured: 80, 40 and 21 pixels.
NATIVE_FACE_SIZE = 80
MAX_UPSAMPLE = 2


def confidence_from_score(score: float) -> float:
    return 100.0 / (1.0 + math.exp(-CONFIDENCE_SLOPE * score))


def score_from_confidence(confidence: float) -> float:
    clipped = min(max(confidence, 1e-6), 100.0 - 1e-6) / 100.0
    return math.log(clipped / (1.0 - clipped)) / CONFIDENCE_SLOPE


@dataclass(frozen=True)
class DetectedFace:
    box: tuple[float, float, float, float]  # left, top, right, bottom (inclusive), pixels
    score: float
    analysis: FaceAnalysis

    @property
    def confidence(self) -> float:
        return confidence_from_score(self.score)


@dataclass(frozen=True)
class Detection:
    """The faces of one image, and the scale the detector saw it at."""

    faces: list[DetectedFace]
    upsample: int
    min_face_size: int  # smallest findable face, in pixels of the image


@dataclass(frozen=True)
class _Prepared:
    pyramid: mmod.TiledPyramid
    scale: float  # original pixels per detection-image pixel
    upsample: int


class DetectionPipeline:
    def __init__(self, settings: Settings, backend: InferenceBackend) -> None:
        self._settings = settings
        self._backend = backend
        self._analyzer = FaceAnalyzer()
        self._executor = ThreadPoolExecutor(
            max_workers=settings.detection.workers, thread_name_prefix="detection"
        )
        self._model = settings.inference.detector_model

    async def model_version(self) -> str:
        return f"{await self._backend.model_version(self._model)}+{PIPELINE_SUFFIX}"

    async def detect(
        self,
        image: NDArray[np.uint8],
        max_faces: int,
        min_confidence: float,
        upsample: int = 0,
        min_face_size: int = 0,
    ) -> Detection:
        """Faces of ``image``, largest first. ``min_face_size`` (pixels, 0: use
        ``upsample``) chooses the upsampling; either way the enlarged image stays
        within ``detection.max_detection_pixels``."""
        loop = asyncio.get_running_loop()
        scale = self._shrink_factor(image)
        upsample = self.plan_upsample(image, scale, upsample, min_face_size)
        smallest = math.ceil(NATIVE_FACE_SIZE * scale / 2**upsample)
        with telemetry.span("detection.pyramid", upsample=upsample):
            prepared = await loop.run_in_executor(self._executor, self._prepare, image, upsample)
        if min(mmod.trunk_output_size(*prepared.pyramid.size)) < 1:
            # smaller than one detector window: no face can be found
            return Detection([], upsample, smallest)
        outputs = await self._backend.infer(
            self._model, {"image": prepared.pyramid.trunk_input(np.float32)}, ["scores"]
        )
        scores = np.asarray(outputs["scores"], dtype=np.float32)
        with telemetry.span("detection.analyse") as current:
            faces = await loop.run_in_executor(
                self._executor, self._finish, image, prepared, scores, max_faces, min_confidence
            )
            current.set_attribute("facegrid.face_count", len(faces))
        return Detection(faces, upsample, smallest)

    def plan_upsample(
        self, image: NDArray[np.uint8], scale: float, upsample: int, min_face_size: int
    ) -> int:
        """How many doublings: enough for ``min_face_size`` when given, never past the
        pixel budget (the pyramid and the trunk cost grow with the pixels)."""
        if min_face_size > 0:
            upsample = 0
            while (
                upsample < MAX_UPSAMPLE and NATIVE_FACE_SIZE * scale / 2**upsample > min_face_size
            ):
                upsample += 1
        height, width = image.shape[:2]
        pixels = (width / scale) * (height / scale)
        while upsample > 0 and pixels * 4**upsample > self._settings.detection.max_detection_pixels:
            upsample -= 1
        return upsample

    def _shrink_factor(self, image: NDArray[np.uint8]) -> float:
        longest = max(image.shape[:2])
        limit = self._settings.images.detect_max_side
        return 1.0 if longest <= limit else longest / limit

    def _prepare(self, image: NDArray[np.uint8], upsample: int) -> _Prepared:
        working, scale = self._shrink_for_detection(image)
        for _ in range(upsample):
            working = mmod.pyramid_up(working)
        return _Prepared(mmod.build_tiled_pyramid(working), scale, upsample)

    def _shrink_for_detection(self, image: NDArray[np.uint8]) -> tuple[NDArray[np.uint8], float]:
        """Very large photos are detected on a smaller copy: faces stay far above 80 px."""
        scale = self._shrink_factor(image)
        if scale == 1.0:
            return image, 1.0
        height, width = image.shape[:2]
        size = (max(1, round(width / scale)), max(1, round(height / scale)))
        small = Image.fromarray(image).resize(size, Image.Resampling.BOX)
        return np.asarray(small, dtype=np.uint8), scale

    def _finish(
        self,
        image: NDArray[np.uint8],
        prepared: _Prepared,
        scores: NDArray[np.float32],
        max_faces: int,
        min_confidence: float,
    ) -> list[DetectedFace]:
        detections = mmod.decode_detections(
            scores[0, 0], prepared.pyramid, score_from_confidence(min_confidence)
        )
        boxes = [
            (_to_original(mmod.rect_down(d, prepared.upsample), prepared.scale), d.score)
            for d in detections
        ]
        # Largest first (ties: the more confident); only the kept faces are analysed.
        boxes.sort(key=lambda item: (-_area(item[0]), -item[1]))
        return [
            DetectedFace(box, score, self._analyzer.analyze(image, box))
            for box, score in boxes[:max_faces]
        ]

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _to_original(detection: mmod.Detection, scale: float) -> tuple[float, float, float, float]:
    box = (detection.left, detection.top, detection.right, detection.bottom)
    if scale == 1.0:
        return box
    return (box[0] * scale, box[1] * scale, (box[2] + 1) * scale - 1, (box[3] + 1) * scale - 1)


def _area(box: tuple[float, float, float, float]) -> float:
    return (box[2] - box[0] + 1) * (box[3] - box[1] + 1)
