"""DetectionService: image bytes -> faces (box, confidence, landmarks, quality, chip)."""

from __future__ import annotations

import grpc
from facegrid import limits, telemetry
from facegrid.config import Settings
from facegrid.errors import invalid_arguments
from facegrid.imaging import decode_image
from facegrid.inference import create_backend
from facegrid.internal.v1 import detection_pb2, detection_pb2_grpc
from facegrid.server import FacegridServer, ServiceRegistration, run_until_stopped
from facegrid.v1 import common_pb2

from facegrid_detection.analysis import Landmark
from facegrid_detection.pipeline import (
    MAX_UPSAMPLE,
    DetectedFace,
    DetectionPipeline,
)

MAX_FACE_SIZE = 100_000

_LANDMARK_TYPES = {
    Landmark.LEFT_EYE_OUTER: common_pb2.Landmark.TYPE_LEFT_EYE_OUTER_CORNER,
    Landmark.LEFT_EYE_INNER: common_pb2.Landmark.TYPE_LEFT_EYE_INNER_CORNER,
    Landmark.RIGHT_EYE_INNER: common_pb2.Landmark.TYPE_RIGHT_EYE_INNER_CORNER,
    Landmark.RIGHT_EYE_OUTER: common_pb2.Landmark.TYPE_RIGHT_EYE_OUTER_CORNER,
    Landmark.NOSE_BASE: common_pb2.Landmark.TYPE_NOSE,
}


class DetectionServicer(detection_pb2_grpc.DetectionServiceServicer):  # type: ignore[misc]
    def __init__(self, settings: Settings, pipeline: DetectionPipeline) -> None:
        self._settings = settings
        self._pipeline = pipeline

    async def DetectFaces(  # noqa: N802 - gRPC method name
        self,
        request: detection_pb2.DetectFacesRequest,
        context: grpc.aio.ServicerContext,
    ) -> detection_pb2.DetectFacesResponse:
        max_faces, min_confidence = _validate(request, self._settings.detection.min_confidence)
        with telemetry.span("detection.decode", image_bytes=len(request.image)):
            image = decode_image(request.image, self._settings.images)
        telemetry.annotate(image_width=image.width, image_height=image.height)
        found = await self._pipeline.detect(
            image.pixels, max_faces, min_confidence, request.upsample, request.min_face_size
        )
        telemetry.annotate(face_count=len(found.faces), upsample=found.upsample)
        return detection_pb2.DetectFacesResponse(
            faces=[
                face_detail(face, image.width, image.height, request.include_chips)
                for face in found.faces
            ],
            image_width=image.width,
            image_height=image.height,
            orientation=image.orientation,
            model_version=await self._pipeline.model_version(),
            min_face_size=found.min_face_size,
            upsample=found.upsample,
        )


def _validate(
    request: detection_pb2.DetectFacesRequest, default_min_confidence: float
) -> tuple[int, float]:
    violations = []
    max_faces = request.max_faces or limits.MAX_FACES_PER_IMAGE
    if not 1 <= max_faces <= limits.MAX_FACES_PER_IMAGE:
        violations.append(
            ("max_faces", f"must be 1 to {limits.MAX_FACES_PER_IMAGE}, got {max_faces}")
        )
    min_confidence = (
        request.min_confidence if request.HasField("min_confidence") else default_min_confidence
    )
    if not 0.0 <= min_confidence <= 100.0:
        violations.append(("min_confidence", f"must be 0 to 100, got {min_confidence}"))
    if not 0 <= request.upsample <= MAX_UPSAMPLE:
        violations.append(("upsample", f"must be 0 to {MAX_UPSAMPLE}, got {request.upsample}"))
    smallest, size = limits.MIN_FACE_SIZE, request.min_face_size
    if size and not smallest <= size <= MAX_FACE_SIZE:
        violations.append(
            ("min_face_size", f"must be {smallest} to {MAX_FACE_SIZE} pixels, got {size}")
        )
    if request.min_face_size and request.upsample:
        violations.append(("min_face_size", "set either upsample or min_face_size, not both"))
    if violations:
        raise invalid_arguments(violations)
    return max_faces, min_confidence


def face_detail(
    face: DetectedFace, width: int, height: int, include_chip: bool
) -> common_pb2.FaceDetail:
    left, top, right, bottom = face.box
    box_width, box_height = right - left + 1, bottom - top + 1
    analysis = face.analysis
    quality = analysis.quality
    landmarks = [
        _landmark(_LANDMARK_TYPES[mark], x, y, width, height)
        for mark, (x, y) in zip(Landmark, analysis.landmarks, strict=True)
    ]
    left_eye, right_eye = analysis.eye_centres()
    landmarks.append(
        _landmark(common_pb2.Landmark.TYPE_LEFT_EYE, left_eye[0], left_eye[1], width, height)
    )
    landmarks.append(
        _landmark(common_pb2.Landmark.TYPE_RIGHT_EYE, right_eye[0], right_eye[1], width, height)
    )
    detail = common_pb2.FaceDetail(
        bounding_box=common_pb2.BoundingBox(
            left=round(left),
            top=round(top),
            width=round(box_width),
            height=round(box_height),
            left_ratio=left / width,
            top_ratio=top / height,
            width_ratio=box_width / width,
            height_ratio=box_height / height,
        ),
        confidence=face.confidence,
        detector_score=face.score,
        landmarks=landmarks,
        quality=common_pb2.FaceQuality(
            sharpness=quality.sharpness,
            brightness=quality.brightness,
            face_size=round(quality.face_size),
            inter_eye_distance=quality.inter_eye_distance,
            yaw=quality.yaw,
            roll=quality.roll,
        ),
    )
    if include_chip:
        chip = analysis.chip
        detail.chip.CopyFrom(
            common_pb2.Chip(rgb=chip.tobytes(), width=chip.shape[1], height=chip.shape[0])
        )
    return detail


def _landmark(
    kind: common_pb2.Landmark.Type, x: float, y: float, width: int, height: int
) -> common_pb2.Landmark:
    return common_pb2.Landmark(
        type=kind, x=float(x), y=float(y), x_ratio=float(x) / width, y_ratio=float(y) / height
    )


def build_server(
    settings: Settings, servicer: DetectionServicer, port: int | None = None
) -> FacegridServer:
    """The detection service's gRPC server around a servicer built with its dependencies (in
    the event loop it will run in); on ``detection.port`` unless ``port`` is given."""
    registration = ServiceRegistration.of(
        detection_pb2,
        "DetectionService",
        detection_pb2_grpc.add_DetectionServiceServicer_to_server,
        servicer,
    )
    return FacegridServer.for_service("detection", registration, settings, port)


async def serve(settings: Settings) -> None:
    backend = create_backend(settings.inference, [settings.inference.detector_model], settings.tls)
    pipeline = DetectionPipeline(settings, backend)
    servicer = DetectionServicer(settings, pipeline)
    server = build_server(settings, servicer)

    async def on_stop() -> None:
        await pipeline.close()
        await backend.close()

    await run_until_stopped(server, on_stop)
