"""DetectionService over real gRPC, on both inference backends (local and Triton)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import skimage.data
from conftest import ServiceProcess, start_service
from facegrid.internal.v1 import detection_pb2, detection_pb2_grpc
from facegrid.v1 import common_pb2
from grpc_helpers import (
    DEADLINE_S,
    error_reason,
    field_violations,
    is_serving,
    jpeg_bytes,
    png_bytes,
    reflected_services,
    rpc_error,
)
from PIL import Image

ASTRONAUT_BOX = (168, 69, 263, 164)  # dlib's own MMOD box (inclusive corners)
Request = detection_pb2.DetectFacesRequest


@pytest.fixture(scope="module")
def channel(detection: ServiceProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(
        detection.address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
    ) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> detection_pb2_grpc.DetectionServiceStub:
    return detection_pb2_grpc.DetectionServiceStub(channel)


def detect(
    stub: detection_pb2_grpc.DetectionServiceStub, image: bytes, **fields: object
) -> detection_pb2.DetectFacesResponse:
    return stub.DetectFaces(Request(image=image, **fields), timeout=DEADLINE_S)  # type: ignore[arg-type]


def test_astronaut_face_box_landmarks_quality_chip(
    stub: detection_pb2_grpc.DetectionServiceStub,
) -> None:
    image = skimage.data.astronaut()
    reply = detect(stub, png_bytes(image), include_chips=True)
    assert (reply.image_width, reply.image_height, reply.orientation) == (512, 512, 1)
    assert reply.model_version.startswith("dlib_mmod_v1")
    assert len(reply.faces) == 1
    face = reply.faces[0]
    box = face.bounding_box
    assert (box.left, box.top, box.left + box.width - 1, box.top + box.height - 1) == ASTRONAUT_BOX
    assert box.width_ratio == pytest.approx(96 / 512)
    assert face.detector_score == pytest.approx(1.0625, abs=1e-3)
    assert face.confidence > 90
    kinds = {lm.type for lm in face.landmarks}
    assert common_pb2.Landmark.TYPE_NOSE in kinds
    assert common_pb2.Landmark.TYPE_LEFT_EYE in kinds
    for landmark in face.landmarks:  # inside the face box
        assert box.left <= landmark.x <= box.left + box.width
        assert box.top <= landmark.y <= box.top + box.height
    eyes = {lm.type: lm for lm in face.landmarks}
    assert eyes[common_pb2.Landmark.TYPE_LEFT_EYE].x < eyes[common_pb2.Landmark.TYPE_RIGHT_EYE].x
    quality = face.quality
    assert 0 < quality.sharpness <= 100
    assert 0 < quality.brightness <= 100
    assert quality.face_size == 96
    assert abs(quality.roll) < 15
    assert abs(quality.yaw) < 30
    assert (face.chip.width, face.chip.height, len(face.chip.rgb)) == (150, 150, 67500)


def test_chip_matches_dlib_get_face_chip(stub: detection_pb2_grpc.DetectionServiceStub) -> None:
    import dlib
    from facegrid.models.weights import landmarks_weights

    image = skimage.data.astronaut()
    reply = detect(stub, png_bytes(image), include_chips=True)
    predictor = dlib.shape_predictor(str(landmarks_weights()))
    shape = predictor(image, dlib.rectangle(*ASTRONAUT_BOX))
    expected = dlib.get_face_chip(image, shape, size=150, padding=0.25)
    chip = np.frombuffer(reply.faces[0].chip.rgb, np.uint8).reshape(150, 150, 3)
    assert np.array_equal(chip, expected)


def test_no_chip_unless_asked(stub: detection_pb2_grpc.DetectionServiceStub) -> None:
    reply = detect(stub, png_bytes(skimage.data.astronaut()))
    assert not reply.faces[0].HasField("chip")


def test_image_without_faces_is_not_an_error(stub: detection_pb2_grpc.DetectionServiceStub) -> None:
    reply = detect(stub, png_bytes(np.full((300, 400, 3), 128, np.uint8)))
    assert list(reply.faces) == []
    assert (reply.image_width, reply.image_height) == (400, 300)


def test_one_pixel_image(stub: detection_pb2_grpc.DetectionServiceStub) -> None:
    reply = detect(stub, png_bytes(np.zeros((1, 1, 3), np.uint8)))
    assert list(reply.faces) == []


def test_exif_rotated_photo_is_detected_upright(
    stub: detection_pb2_grpc.DetectionServiceStub,
) -> None:
    import io

    upright = skimage.data.astronaut()
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # as a camera would
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    out = io.BytesIO()
    stored.save(out, format="JPEG", quality=95, exif=exif)
    reply = detect(stub, out.getvalue())
    assert reply.orientation == 6
    assert len(reply.faces) == 1
    box = reply.faces[0].bounding_box
    assert abs(box.left - ASTRONAUT_BOX[0]) <= 4
    assert abs(box.top - ASTRONAUT_BOX[1]) <= 4


def test_several_faces_largest_first_and_max_faces(
    stub: detection_pb2_grpc.DetectionServiceStub, faces: Path
) -> None:
    data = (faces / "misc" / "two_people.jpg").read_bytes()
    reply = detect(stub, data)
    assert len(reply.faces) == 2
    areas = [f.bounding_box.width * f.bounding_box.height for f in reply.faces]
    assert areas == sorted(areas, reverse=True)
    only_one = detect(stub, data, max_faces=1)
    assert len(only_one.faces) == 1
    assert only_one.faces[0].bounding_box == reply.faces[0].bounding_box


def test_min_confidence_filters(stub: detection_pb2_grpc.DetectionServiceStub) -> None:
    image = png_bytes(skimage.data.astronaut())
    assert len(detect(stub, image, min_confidence=99.99).faces) == 0
    assert len(detect(stub, image, min_confidence=10).faces) >= 1


def test_upsample_finds_small_faces(stub: detection_pb2_grpc.DetectionServiceStub) -> None:
    small = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((256, 256)))
    assert len(detect(stub, png_bytes(small)).faces) == 0  # face of ~48 px < 80 px window
    found = detect(stub, png_bytes(small), upsample=1).faces
    assert len(found) == 1
    assert abs(found[0].bounding_box.left - 84) <= 6


def test_min_face_size_chooses_the_enlargement(
    stub: detection_pb2_grpc.DetectionServiceStub,
) -> None:
    """Measured smallest boxes: 80 px as the detector sees the image, 40 after one
    doubling, 21 after two. A 24-pixel face is found only when 20 is asked for."""
    astronaut = skimage.data.astronaut()
    tiny = np.full((512, 512, 3), 128, np.uint8)
    tiny[:128, :128] = np.asarray(Image.fromarray(astronaut).resize((128, 128)))
    native = detect(stub, png_bytes(tiny))
    assert (native.upsample, native.min_face_size, len(native.faces)) == (0, 80, 0)
    forty = detect(stub, png_bytes(tiny), min_face_size=40)
    assert (forty.upsample, forty.min_face_size) == (1, 40)
    twenty = detect(stub, png_bytes(tiny), min_face_size=20)
    assert (twenty.upsample, twenty.min_face_size) == (2, 20)
    assert len(twenty.faces) == 1
    assert twenty.faces[0].bounding_box.width <= 30
    assert detect(stub, png_bytes(tiny), min_face_size=90).upsample == 0


def test_the_settings_bound_the_enlargement_and_set_the_default_confidence(
    model_repo: Path, tmp_path: Path
) -> None:
    service = start_service(
        "detection",
        [
            f"inference.model_repository={model_repo}",
            "detection.max_detection_pixels=1000000",
            "detection.min_confidence=99.99",
        ],
        tmp_path,
    )
    try:
        with grpc.insecure_channel(service.address) as channel:
            stub = detection_pb2_grpc.DetectionServiceStub(channel)
            image = png_bytes(skimage.data.astronaut())  # 512x512: 4x is 4.2 MP
            reply = detect(stub, image, min_face_size=20)
            assert (reply.upsample, reply.min_face_size) == (0, 80)
            # The deployment's default confidence applies unless the request sets one.
            assert len(reply.faces) == 0
            assert len(detect(stub, image, min_confidence=10).faces) == 1
            small = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((400, 400)))
            assert detect(stub, png_bytes(small), min_face_size=20).upsample == 1  # 2.6 MP
    finally:
        assert service.stop() == 0, service.log()


@pytest.mark.parametrize(
    ("image", "reason"),
    [
        (b"", "IMAGE_EMPTY"),
        (b"this is not an image at all" * 20, "IMAGE_UNSUPPORTED_FORMAT"),
        (jpeg_bytes(skimage.data.astronaut())[:5000], "IMAGE_CORRUPT"),
    ],
    ids=["empty", "not-an-image", "truncated-jpeg"],
)
def test_bad_images_are_invalid_argument_and_service_survives(
    stub: detection_pb2_grpc.DetectionServiceStub, channel: grpc.Channel, image: bytes, reason: str
) -> None:
    error = rpc_error(lambda: detect(stub, image))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image" in field_violations(error)
    assert error_reason(error) == reason
    assert is_serving(channel)
    assert len(detect(stub, png_bytes(skimage.data.astronaut())).faces) == 1


def test_decompression_bomb(stub: detection_pb2_grpc.DetectionServiceStub) -> None:
    from conftest import png_header_only

    error = rpc_error(lambda: detect(stub, png_header_only(30000, 30000)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(error) == "IMAGE_TOO_MANY_PIXELS"


def test_oversized_bytes(stub: detection_pb2_grpc.DetectionServiceStub) -> None:
    noise = np.random.default_rng(0).integers(0, 255, (2900, 2900, 3), dtype=np.uint8)
    data = png_bytes(noise)  # ~25 MB of incompressible pixels, over the 15 MB limit
    error = rpc_error(lambda: detect(stub, data))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(error) == "IMAGE_TOO_LARGE"


def test_out_of_range_fields(stub: detection_pb2_grpc.DetectionServiceStub) -> None:
    error = rpc_error(
        lambda: detect(stub, png_bytes(skimage.data.astronaut()), max_faces=101, upsample=5)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(error)) == {"max_faces", "upsample"}
    for fields in ({"min_face_size": 19}, {"min_face_size": 40, "upsample": 1}):
        error = rpc_error(lambda f=fields: detect(stub, png_bytes(skimage.data.astronaut()), **f))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "min_face_size" in field_violations(error)


def test_health_and_reflection(channel: grpc.Channel) -> None:
    assert is_serving(channel)
    assert is_serving(channel, "facegrid.internal.v1.DetectionService")
    services = reflected_services(channel)
    assert {"facegrid.internal.v1.DetectionService", "grpc.health.v1.Health"} <= services
