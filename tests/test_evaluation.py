"""Evaluation and calibration: metrics on known answers, and the real services on photos.

The calibration test re-measures the committed table on ../shared/data/faces through
the detection and embedding services (started once for this module) and checks that
it reproduces the file; the eval test runs `facegrid eval` on the knn set.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import PROJECT_ROOT, ServiceProcess, start_service
from facegrid import cli
from facegrid.evaluation import calibrate, evaluate, labels, metrics
from facegrid.evaluation.duplicates import group_captures
from facegrid.evaluation.faces import Face, FaceClient, FaceSet
from facegrid.evaluation.labels import UNKNOWN, LabelError, Role
from facegrid.similarity import CalibrationRecord, load_calibration
from facegrid.v1 import embedding_pb2, embedding_pb2_grpc
from grpc_helpers import DEADLINE_S

MODEL_VERSION = "dlib_resnet_v1"
COMMITTED = PROJECT_ROOT / "services" / "facegrid" / "calibrations" / f"{MODEL_VERSION}.json"
SEEDS = PROJECT_ROOT / "seeds" / "eval"

# ---------------------------------------------------------------- metrics


def test_roc_auc_counts_ordered_pairs_and_half_ties() -> None:
    # 3 of the 4 (genuine, impostor) pairs are ordered right.
    assert metrics.roc_auc([0.9, 0.8], [0.7, 0.85]) == pytest.approx(0.75)
    assert metrics.roc_auc([0.5, 0.9], [0.5]) == pytest.approx(0.75)  # one tie: half
    assert metrics.roc_auc([0.1], [0.2, 0.3]) == 0.0
    assert math.isnan(metrics.roc_auc([], [0.1]))


def test_roc_auc_matches_the_pairwise_definition() -> None:
    rng = np.random.default_rng(7)
    genuine = rng.normal(1.0, 1.0, 60).round(1)  # rounded: many ties
    impostor = rng.normal(0.0, 1.0, 90).round(1)
    diff = genuine[:, None] - impostor[None, :]
    expected = (np.count_nonzero(diff > 0) + 0.5 * np.count_nonzero(diff == 0)) / diff.size
    assert metrics.roc_auc(genuine, impostor) == pytest.approx(expected)


def test_tar_at_far_allows_floor_far_times_n_impostors() -> None:
    impostor = np.arange(100) / 100.0  # 0.00 .. 0.99
    genuine = [0.985, 0.995, 0.5]
    tar, threshold = metrics.tar_at_far(genuine, impostor, 0.01)
    assert 0.98 < threshold < 0.985  # one impostor (0.99) may pass, 0.98 may not
    assert tar == pytest.approx(2 / 3)
    assert metrics.false_match_rate(impostor, threshold) == pytest.approx(0.01)
    tar, threshold = metrics.tar_at_far(genuine, impostor, 0.0)
    assert 0.99 < threshold < 0.995
    assert tar == pytest.approx(1 / 3)


def test_accuracy_and_error_rates_at_a_threshold() -> None:
    genuine, impostor = [0.9, 0.8, 0.6], [0.1, 0.7, 0.75]
    assert metrics.accuracy_at(genuine, impostor, 0.75) == pytest.approx(4 / 6)
    assert metrics.false_match_rate(impostor, 0.75) == pytest.approx(1 / 3)  # at or above
    assert metrics.false_non_match_rate(genuine, 0.8) == pytest.approx(1 / 3)  # below


def test_pairs_leave_out_two_unknown_faces() -> None:
    genuine, impostor = metrics.pair_indices(["a", "a", "b", UNKNOWN, UNKNOWN], UNKNOWN)
    assert genuine.tolist() == [[0, 1]]
    assert len(impostor) == 10 - 1 - 1
    assert [3, 4] not in impostor.tolist()


def test_rank_one_with_excluded_candidates() -> None:
    scores = np.array([[0.9, 0.2, 0.3], [0.1, 0.8, 0.95], [0.5, 0.4, 0.1]])
    excluded = np.zeros_like(scores, dtype=bool)
    excluded[1, 2] = True  # probe 1's own capture
    best, top = metrics.best_matches(scores, excluded)
    assert best.tolist() == [0, 1, 0]
    assert top.tolist() == [0.9, 0.8, 0.5]
    assert metrics.rank_one_accuracy(["a", "b", "c"], ["a", "b", "b"], best) == pytest.approx(2 / 3)
    nothing, _ = metrics.best_matches(scores[:, :1], np.ones((3, 1), bool))
    assert nothing.tolist() == [-1, -1, -1]


# ------------------------------------------------------------- calibration


def test_calibration_puts_t0_at_80_midway_in_the_gap() -> None:
    genuine = [0.93, 0.95, 0.96, 0.97]
    impostor = [0.70, 0.80, 0.82, 0.89]
    record, measurement = calibrate.build_record(genuine, impostor, "m", "test")
    assert measurement.separable
    assert measurement.t0 == pytest.approx((0.89 + 0.93) / 2)
    table = record.calibration
    assert table.similarity(measurement.t0) == pytest.approx(80.0)
    assert record.default_threshold == 80.0
    assert max(table.similarity(c) for c in impostor) < 80.0
    assert min(table.similarity(c) for c in genuine) >= 80.0
    assert table.similarity(-1.0) == 0.0
    assert table.similarity(1.0) == 100.0
    assert table.cosine_at(80.0) == pytest.approx(measurement.t0, abs=1e-6)
    t0_point = record.message.points[3]
    assert t0_point.false_match_rate == 0.0
    assert t0_point.false_non_match_rate == 0.0


def test_calibration_without_a_gap_stays_above_every_impostor() -> None:
    genuine = [0.80, 0.85, 0.88, 0.95]
    impostor = [0.70, 0.86, 0.96]
    record, measurement = calibrate.build_record(genuine, impostor, "m", "test")
    assert not measurement.separable
    assert 0.96 < measurement.t0 <= 0.96 + calibrate.NO_GAP_MARGIN + 1e-12
    cosines = [p.cosine_similarity for p in record.message.points]
    assert all(b > a for a, b in itertools.pairwise(cosines))
    assert "genuine median" not in [a.name for a in measurement.anchors]  # below t0
    assert max(record.calibration.similarity(c) for c in impostor) < 80.0


def test_record_round_trips_through_json() -> None:
    record, _ = calibrate.build_record([0.95, 0.96], [0.7, 0.8], "m", "d")
    again = CalibrationRecord.from_json(record.to_json({"note": 1}))
    assert again.message == record.message
    assert again.default_threshold == record.default_threshold


def test_committed_calibration_loads_and_rejects_odd_versions() -> None:
    record = load_calibration(MODEL_VERSION)
    assert record is not None
    assert record.model_version == MODEL_VERSION
    assert record.default_threshold == 80.0
    assert "Reproduce: facegrid calibrate" in record.message.description
    assert load_calibration("no_such_model") is None
    assert load_calibration("../calibrations/dlib_resnet_v1") is None


# ------------------------------------------------------------- labels, copies


def test_manifest_labels_faces_and_rejects_mistakes(tmp_path: Path) -> None:
    (tmp_path / "gallery" / "ann").mkdir(parents=True)
    (tmp_path / "gallery" / "ann" / "a.jpg").write_bytes(b"x")
    (tmp_path / "group.jpg").write_bytes(b"y")
    manifest = tmp_path / "labels.toml"
    manifest.write_text(
        '[gallery]\nfolders = ["gallery"]\n'
        '[[photo]]\npath = "group.jpg"\nfaces = ["ann", "?", "-"]\n'
    )
    label_set = labels.discover(tmp_path)
    assert [p.path for p in label_set.photos] == ["gallery/ann/a.jpg", "group.jpg"]
    group = label_set.photos[1]
    assert group.role is Role.PROBE
    assert group.labels == ("ann", UNKNOWN, "-")
    assert group.sources == ("group.jpg#0", "group.jpg#1", "group.jpg#2")
    for bad in (
        '[[photo]]\npath = "../x.jpg"\nfaces = ["a"]\n',
        '[[photo]]\npath = "group.jpg"\nfaces = ["a"]\nsha256 = "00"\n',
        '[[photo]]\npath = "group.jpg"\nface = ["a"]\n',
        '[[photo]]\npath = "missing.jpg"\nfaces = ["a"]\n',
    ):
        manifest.write_text(bad)
        with pytest.raises(LabelError):
            labels.discover(tmp_path)


def _face(name: str, label: str, source: str) -> Face:
    return Face(name, 0, label, Role.GALLERY, source, (0, 0, 1, 1), 99.0, name)


def test_copies_of_a_capture_are_grouped_and_must_agree() -> None:
    vectors = np.eye(4)
    vectors[3] = vectors[0]  # an undeclared copy of the first face
    faces = [_face("a", "x", "a"), _face("b", "x", "a"), _face("c", "y", "c"), _face("d", "x", "d")]
    captures = group_captures(faces, vectors)
    assert captures.ids.tolist() == [0, 0, 1, 0]
    assert captures.representatives.tolist() == [0, 2]
    faces[3] = _face("d", "y", "d")
    with pytest.raises(LabelError, match="different labels"):
        group_captures(faces, vectors)


def test_identification_excludes_the_probes_own_capture() -> None:
    vectors = np.array([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8]])
    faces = (
        _face("g1", "x", "s1"),
        Face("p", 0, "x", Role.PROBE, "s1", (0, 0, 1, 1), 99.0, "p"),  # a copy of g1
        _face("g2", "y", "s2"),
    )
    result = evaluate.evaluate(FaceSet(faces, vectors, "m", "d", ()), None, math.nan)
    (probe,) = result.probes
    assert not probe.enrolled  # x's only gallery photo is the probe itself
    assert probe.best is not None
    assert probe.best.name == "g2#0"


# ---------------------------------------------------------- real services


def _local_service(
    name: str, model_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    service = start_service(
        name, [f"inference.model_repository={model_repo}"], tmp_path_factory.mktemp(f"eval-{name}")
    )
    yield service
    assert service.stop() == 0, service.log()


@pytest.fixture(scope="module")
def embedding(
    model_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    yield from _local_service("embedding", model_repo, tmp_path_factory)


@pytest.fixture(scope="module")
def detection(
    model_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    yield from _local_service("detection", model_repo, tmp_path_factory)


@pytest.fixture(scope="module")
def client(detection: ServiceProcess, embedding: ServiceProcess) -> Iterator[FaceClient]:
    client = FaceClient(detection.address, embedding.address)
    yield client
    client.close()


def test_get_model_info_returns_the_committed_calibration(embedding: ServiceProcess) -> None:
    with grpc.insecure_channel(embedding.address) as channel:
        info = embedding_pb2_grpc.EmbeddingServiceStub(channel).GetModelInfo(
            embedding_pb2.EmbeddingServiceGetModelInfoRequest(), timeout=DEADLINE_S
        )
    record = load_calibration(info.model_version)
    assert info.model_version == MODEL_VERSION
    assert record is not None
    assert info.HasField("similarity_calibration")
    assert info.similarity_calibration == record.message


def test_calibration_reproduces_the_committed_file(
    faces: Path,
    detection: ServiceProcess,
    embedding: ServiceProcess,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "calibration.json"
    code = cli.main(
        [
            "calibrate",
            "--faces",
            str(faces),
            "--labels",
            str(SEEDS / "faces.toml"),
            "--detection",
            detection.address,
            "--embedding",
            embedding.address,
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "genuine" in printed
    assert "impostor" in printed
    measured = CalibrationRecord.from_json(out.read_text())
    committed = CalibrationRecord.from_json(COMMITTED.read_text())
    new_figures = json.loads(out.read_text())["measurement"]
    old_figures = json.loads(COMMITTED.read_text())["measurement"]
    assert measured.model_version == committed.model_version == MODEL_VERSION
    assert measured.default_threshold == committed.default_threshold
    for key in ("faces", "distinct_captures", "genuine_pairs", "impostor_pairs"):
        assert new_figures[key] == old_figures[key], key
    assert len(measured.message.points) == len(committed.message.points)
    for new, old in zip(measured.message.points, committed.message.points, strict=True):
        assert new.cosine_similarity == pytest.approx(old.cosine_similarity, abs=1e-4)
        assert new.similarity == old.similarity
        assert new.false_match_rate == pytest.approx(old.false_match_rate, abs=1e-6)
        assert new.false_non_match_rate == pytest.approx(old.false_non_match_rate, abs=1e-6)
    # The default threshold lets no impostor pair of the calibration photos through.
    highest_impostor = new_figures["impostor_cosine"]["max"]
    assert committed.calibration.similarity(highest_impostor) < committed.default_threshold
    assert new_figures["distinct_captures"] < new_figures["faces"]  # copies were merged


def test_knn_probes_are_identified_and_the_stranger_rejected(
    faces: Path, client: FaceClient
) -> None:
    label_set = labels.discover(faces / "knn")
    assert label_set.origin == str(SEEDS / "knn.toml")
    record = load_calibration(MODEL_VERSION)
    assert record is not None
    result = evaluate.evaluate(
        client.embed_set(label_set), record.calibration, record.default_threshold
    )
    enrolled, strangers = result.enrolled_probes, result.unenrolled_probes
    assert len(enrolled) == 7
    assert result.rank_one_accuracy == 1.0
    assert all(p.accepted(record.default_threshold) for p in enrolled)
    assert [p.face.name for p in strangers] == ["test/obama_and_biden.jpg#2"]
    assert not strangers[0].accepted(record.default_threshold)
    assert result.verification.auc == 1.0
    assert result.verification.false_matches == 0


def test_eval_command_starts_its_own_services(
    faces: Path, model_repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(
        [
            "eval",
            str(faces / "knn"),
            "--strict",
            "--set",
            f"inference.model_repository={model_repo}",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "rank-1 accuracy: 1.0000 (7/7)" in out
    assert "7/7 enrolled probe faces identified, 1/1 not-enrolled faces rejected" in out
    assert "ROC AUC" in out
    assert "TAR at FAR 0.01" in out
