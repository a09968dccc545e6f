"""EmbeddingService over real gRPC, on both inference backends (local and Triton)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dlib
import grpc
import numpy as np
import pytest
import skimage.data
from conftest import ServiceProcess, start_service
from facegrid.internal.v1 import embedding_pb2, embedding_pb2_grpc
from facegrid.models.weights import embedder_weights, landmarks_weights
from facegrid.v1 import common_pb2
from grpc_helpers import DEADLINE_S, field_violations, is_serving, reflected_services, rpc_error
from numpy.typing import NDArray

Request = embedding_pb2.EmbedChipsRequest


@pytest.fixture(scope="module")
def channel(embedding: ServiceProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(embedding.address) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> embedding_pb2_grpc.EmbeddingServiceStub:
    return embedding_pb2_grpc.EmbeddingServiceStub(channel)


@pytest.fixture(scope="module")
def reference_chips(faces_or_none: Path | None) -> list[NDArray[np.uint8]]:
    """dlib's own chips: the astronaut, plus the test photographs when present."""
    images = [skimage.data.astronaut()]
    if faces_or_none is not None:
        for path in sorted((faces_or_none / "knn" / "train").glob("*/*")):
            images.append(dlib.load_rgb_image(str(path)))
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(landmarks_weights()))
    chips = []
    for image in images:
        for box in detector(image, 1):
            shape = predictor(image, box)
            chips.append(np.asarray(dlib.get_face_chip(image, shape, size=150, padding=0.25)))
    return chips


@pytest.fixture(scope="module")
def faces_or_none() -> Path | None:
    from conftest import faces_dir

    return faces_dir()


def chip_message(chip: NDArray[np.uint8]) -> common_pb2.Chip:
    return common_pb2.Chip(rgb=chip.tobytes(), width=chip.shape[1], height=chip.shape[0])


def dlib_unit_descriptor(chip: NDArray[np.uint8]) -> NDArray[np.float64]:
    """What the service serves by default (embedding.mirror_average): dlib's descriptors
    of the chip and of its mirror image, summed and normalised."""
    model = dlib.face_recognition_model_v1(str(embedder_weights()))
    raw = np.asarray(model.compute_face_descriptor(chip), np.float64)
    mirrored = np.ascontiguousarray(chip[:, ::-1])
    raw = raw + np.asarray(model.compute_face_descriptor(mirrored), np.float64)
    return raw / np.linalg.norm(raw)


def test_embeddings_match_dlib_and_are_unit_length(
    stub: embedding_pb2_grpc.EmbeddingServiceStub, reference_chips: list[NDArray[np.uint8]]
) -> None:
    reply = stub.EmbedChips(
        Request(chips=[chip_message(c) for c in reference_chips]), timeout=DEADLINE_S
    )
    assert reply.dimension == 128
    assert reply.model_version == "dlib_resnet_v1+mirror"
    assert len(reply.embeddings) == len(reference_chips)
    for chip, embedding in zip(reference_chips, reply.embeddings, strict=True):
        values = np.asarray(embedding.values, np.float64)
        assert np.linalg.norm(values) == pytest.approx(1.0, abs=1e-5)
        assert np.abs(values - dlib_unit_descriptor(chip)).max() <= 1e-5
        assert embedding.raw_norm > 0.5


def test_concurrent_calls_are_batched_and_each_gets_its_own_answer(
    stub: embedding_pb2_grpc.EmbeddingServiceStub, reference_chips: list[NDArray[np.uint8]]
) -> None:
    expected = {i: dlib_unit_descriptor(c) for i, c in enumerate(reference_chips)}

    def one(index: int) -> tuple[int, NDArray[np.float64]]:
        chip = reference_chips[index % len(reference_chips)]
        reply = stub.EmbedChips(Request(chips=[chip_message(chip)]), timeout=DEADLINE_S)
        return index, np.asarray(reply.embeddings[0].values)

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(one, range(64)))
    for index, values in results:
        assert np.abs(values - expected[index % len(reference_chips)]).max() <= 1e-5


def test_model_info(stub: embedding_pb2_grpc.EmbeddingServiceStub, backend: str) -> None:
    info = stub.GetModelInfo(embedding_pb2.GetModelInfoRequest(), timeout=5)
    assert (info.dimension, info.chip_width, info.chip_height) == (128, 150, 150)
    assert info.backend == ("onnxruntime" if backend == "local" else "triton")
    assert info.model_version == "dlib_resnet_v1+mirror"
    assert info.similarity_calibration.impostor_pair_count > 0


def test_without_mirror_averaging_the_plain_descriptor_is_served(
    model_repo: Path, reference_chips: list[NDArray[np.uint8]], tmp_path: Path
) -> None:
    service = start_service(
        "embedding",
        [f"inference.model_repository={model_repo}", "embedding.mirror_average=false"],
        tmp_path,
    )
    try:
        with grpc.insecure_channel(service.address) as channel:
            reply = embedding_pb2_grpc.EmbeddingServiceStub(channel).EmbedChips(
                Request(chips=[chip_message(reference_chips[0])]), timeout=DEADLINE_S
            )
    finally:
        assert service.stop() == 0, service.log()
    assert reply.model_version == "dlib_resnet_v1"
    model = dlib.face_recognition_model_v1(str(embedder_weights()))
    raw = np.asarray(model.compute_face_descriptor(reference_chips[0]), np.float64)
    values = np.asarray(reply.embeddings[0].values)
    assert np.abs(values - raw / np.linalg.norm(raw)).max() <= 1e-5
    assert reply.embeddings[0].raw_norm == pytest.approx(np.linalg.norm(raw), rel=1e-4)


@pytest.mark.parametrize(
    ("chips", "field"),
    [
        ([], "chips"),
        ([common_pb2.Chip(rgb=b"\x00" * 100, width=10, height=10)], "chips[0]"),
        ([common_pb2.Chip(rgb=b"\x00" * 1000, width=150, height=150)], "chips[0].rgb"),
        ([common_pb2.Chip(rgb=b"\x00" * 67500, width=150, height=150)] * 257, "chips"),
    ],
    ids=["none", "wrong-size", "wrong-length", "too-many"],
)
def test_bad_chips_are_invalid_argument_and_service_survives(
    stub: embedding_pb2_grpc.EmbeddingServiceStub,
    channel: grpc.Channel,
    chips: list[common_pb2.Chip],
    field: str,
) -> None:
    error = rpc_error(lambda: stub.EmbedChips(Request(chips=chips), timeout=DEADLINE_S))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(error)
    assert is_serving(channel)
    good = common_pb2.Chip(rgb=b"\x80" * 67500, width=150, height=150)
    assert len(stub.EmbedChips(Request(chips=[good]), timeout=DEADLINE_S).embeddings) == 1


def test_health_and_reflection(channel: grpc.Channel) -> None:
    assert is_serving(channel, "facegrid.internal.v1.EmbeddingService")
    assert "facegrid.internal.v1.EmbeddingService" in reflected_services(channel)
