"""Evaluation and calibration: metrics on known answers, and the real services on photos.

The calibration test re-measures the committed table on ../shared/data/faces through
the detection and embedding services (started once for this module) and checks that
it reproduces the file; the eval test runs `facegrid eval` on the knn set.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import PROJECT_ROOT, ServiceProcess, start_service
from facegrid import cli
from facegrid.internal.v1 import embedding_pb2, embedding_pb2_grpc
from facegrid.similarity import Calibration, CalibrationRecord, load_calibration
from facegrid.v1 import common_pb2
from facegrid_eval import (
    calibrate,
    evaluate,
    labels,
    metrics,
    protocol,
)
from facegrid_eval import (
    crowds as crowd_photos,
)
from facegrid_eval.duplicates import group_captures
from facegrid_eval.faces import Face, FaceClient, FaceSet
from facegrid_eval.labels import UNKNOWN, LabelError, Role
from grpc_helpers import DEADLINE_S
from scipy.stats import binom

MODEL_VERSION = "dlib_resnet_v1+mirror"  # what the embedding service serves by default
MODEL_VERSIONS = ("dlib_resnet_v1+mirror", "dlib_resnet_v1")
CALIBRATIONS = PROJECT_ROOT / "services" / "facegrid" / "calibrations"
SEEDS = PROJECT_ROOT / "seeds" / "eval"
Purpose = common_pb2.IdentificationContext.Purpose

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


# ------------------------------------------------------------- bounds


def test_clopper_pearson_interval_is_exact() -> None:
    """Each end is where the binomial tail beyond the observed count is 2.5%."""
    n = 100
    low, high = metrics.binomial_interval([0, 5, 37, 100], n)
    for k, lower, upper in zip((0, 5, 37, 100), low, high, strict=True):
        if k < n:
            assert binom.cdf(k, n, upper) == pytest.approx(0.025, rel=1e-6)
        else:
            assert upper == 1.0
        if k > 0:
            assert binom.sf(k - 1, n, lower) == pytest.approx(0.025, rel=1e-6)
        else:
            assert lower == 0.0
    assert high[0] == pytest.approx(1 - 0.025 ** (1 / n), rel=1e-9)  # 0.0362: "rule of 3.7"
    lows, highs = metrics.binomial_interval(np.arange(0, 51), 50)
    assert np.all(np.diff(lows) > 0)
    assert np.all(np.diff(highs) > 0)
    assert np.all(lows <= np.arange(51) / 50)
    assert np.all(np.arange(51) / 50 <= highs)


def test_highest_count_within_is_the_last_count_under_the_bound() -> None:
    n = 1_000_000
    k = metrics.highest_count_within(1e-4, n)
    assert metrics.binomial_interval(k, n)[1] <= 1e-4 < metrics.binomial_interval(k + 1, n)[1]
    assert 70 < k < 100  # well under the 100 a point estimate would allow
    assert metrics.highest_count_within(1e-4, 1000) == -1  # too few pairs to show it


def test_resampling_people_widens_the_interval_where_pairs_are_not_independent() -> None:
    """Two look-alikes among 40 people: all their cross pairs match, nothing else does.
    Pair counting calls that FMR precise; resampling people shows it hangs on two."""
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(40, 16))
    centres[1] = centres[0]  # the look-alikes
    vectors, faces = [], []
    for person, centre in enumerate(centres):
        for photo in range(10):
            name = f"p{person}/{photo}"
            vectors.append(centre + rng.normal(scale=0.15, size=16))
            faces.append(Face(name, 0, f"p{person}", Role.GALLERY, name, (0, 0, 1, 1), 99.0, name))
    embeddings = np.array(vectors)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    face_set = FaceSet(tuple(faces), embeddings, "m", "d", ())
    captures = group_captures(face_set.faces, face_set.embeddings)
    pairs = evaluate.score_pairs(face_set, captures)
    cosine = 0.9
    false_matches = int(pairs.impostor.at_or_above([cosine])[0])
    assert false_matches == 100  # the 10 x 10 pairs of the look-alikes, and no others
    low, high = metrics.binomial_interval(false_matches, len(pairs.impostor))
    resampled = evaluate.PeopleResampler(face_set, captures, 0.8)
    people_low, people_high = resampled.fmr_interval(cosine)
    assert people_low <= false_matches / len(pairs.impostor) <= people_high
    assert (people_high - people_low) > 5 * (high - low)
    assert resampled.fmr_interval(cosine) == evaluate.PeopleResampler(
        face_set, captures, 0.9
    ).fmr_interval(cosine)
    with pytest.raises(ValueError, match="kept from cosine"):
        resampled.fmr_interval(0.5)


# ------------------------------------------------------------- calibration


def _pairs(genuine: np.ndarray, impostor: np.ndarray) -> evaluate.PairScores:
    pairs = np.zeros((len(genuine), 2), np.intp)
    return evaluate.PairScores(
        genuine, pairs, np.full(len(genuine), 1 / len(genuine)), metrics.Scores(impostor), None
    )


@pytest.fixture(scope="module")
def synthetic() -> evaluate.PairScores:
    rng = np.random.default_rng(3)
    return _pairs(
        np.clip(rng.normal(0.95, 0.02, 20_000), -1, 1),
        np.clip(rng.normal(0.80, 0.04, 2_000_000), -1, 1),
    )


def test_calibration_anchors_sit_at_the_lowest_cosine_within_each_fmr_bound(
    synthetic: evaluate.PairScores,
) -> None:
    record, measurement = calibrate.build_record(synthetic, "m", "test")
    n = len(synthetic.impostor)
    for anchor, (bound, similarity) in zip(measurement.anchors, calibrate.FMR_ANCHORS, strict=True):
        assert anchor.similarity == similarity
        written = float(np.float32(anchor.cosine))
        count = synthetic.impostor.at_or_above([written])[0]
        assert count == anchor.false_matches
        assert metrics.binomial_interval(count, n)[1] <= bound
        # One step lower on the written grid lets too many through: it is the lowest.
        lower = float(np.float32(anchor.cosine - 1e-6))
        assert metrics.binomial_interval(synthetic.impostor.at_or_above([lower])[0], n)[1] > bound
    table = record.calibration
    assert [p.similarity for p in record.message.points] == [float(s) for s in range(101)]
    cosines = [p.cosine_similarity for p in record.message.points]
    assert all(b > a for a, b in itertools.pairwise(cosines))
    assert table.similarity(-1.0) == 0.0
    assert table.similarity(1.0) == 100.0
    for anchor in measurement.anchors:
        assert table.similarity(anchor.cosine) == pytest.approx(anchor.similarity, abs=1e-3)
    assert record.default_threshold == 80.0
    assert record.purpose_threshold(Purpose.PURPOSE_WATCHLIST_MONITORING) == 90.0
    assert record.purpose_threshold(Purpose.PURPOSE_TESTING) is None
    assert record.message.impostor_pair_count == n
    assert record.message.genuine_pair_count == len(synthetic.genuine)


def test_calibration_points_carry_recounted_rates_and_bounds(
    synthetic: evaluate.PairScores,
) -> None:
    record, _ = calibrate.build_record(synthetic, "m", "test")
    genuine = np.sort(synthetic.genuine)
    for point in record.message.points[45:]:
        cosine = float(np.float32(point.cosine_similarity))
        false_matches = synthetic.impostor.at_or_above([cosine])[0]
        false_non_matches = int(np.searchsorted(genuine, cosine, side="left"))
        n, g = len(synthetic.impostor), len(genuine)
        assert point.false_match_rate == pytest.approx(false_matches / n)
        assert point.false_non_match_rate == pytest.approx(false_non_matches / g)
        low, high = metrics.binomial_interval(false_matches, n)
        assert (point.false_match_rate_lower_bound, point.false_match_rate_upper_bound) == (
            pytest.approx(float(low)),
            pytest.approx(float(high)),
        )
        assert (
            point.false_non_match_rate_lower_bound
            <= point.false_non_match_rate
            <= point.false_non_match_rate_upper_bound
        )


def test_calibration_needs_enough_impostor_pairs() -> None:
    rng = np.random.default_rng(4)
    few = _pairs(rng.normal(0.95, 0.02, 100), rng.normal(0.8, 0.04, 10_000))
    with pytest.raises(ValueError, match=r"cannot show an FMR of 0\.0001"):
        calibrate.build_record(few, "m", "test")


def test_record_round_trips_through_json(synthetic: evaluate.PairScores) -> None:
    record, _ = calibrate.build_record(synthetic, "m", "d")
    again = CalibrationRecord.from_json(record.to_json({"note": 1}))
    assert again.default_threshold == record.default_threshold
    assert again.purpose_thresholds == {"PURPOSE_WATCHLIST_MONITORING": 90.0}
    for new, old in zip(again.message.points, record.message.points, strict=True):
        assert new.cosine_similarity == old.cosine_similarity
        assert new.false_match_rate == pytest.approx(old.false_match_rate, rel=1e-3)
    document = json.loads(record.to_json())
    document["purpose_default_thresholds"] = {"PURPOSE_NO_SUCH": 90}
    with pytest.raises(ValueError, match="unknown purpose"):
        CalibrationRecord.from_json(json.dumps(document))


def test_false_match_rate_between_points_is_log_interpolated() -> None:
    message = common_pb2.SimilarityCalibration(
        points=[
            common_pb2.SimilarityCalibration.Point(
                cosine_similarity=c,
                similarity=s,
                false_match_rate=f,
                false_match_rate_upper_bound=u,
            )
            for c, s, f, u in (
                (0.0, 0.0, 1.0, 1.0),
                (0.5, 50.0, 1e-2, 2e-2),
                (1.0, 100.0, 0.0, 1e-6),
            )
        ]
    )
    table = Calibration.from_proto(message)
    assert table.has_error_rates
    at = table.false_match_rate(0.25)
    assert at is not None
    assert at.rate == pytest.approx(0.1)  # halfway between 1 and 1e-2 on a log scale
    assert at.upper_bound == pytest.approx(math.sqrt(2e-2))
    above = table.false_match_rate(0.75)
    assert above is not None
    assert above.rate == pytest.approx(0.5e-2)  # towards a point without false matches
    assert table.false_match_rate(2.0) == table.false_match_rate(1.0)
    without = common_pb2.SimilarityCalibration(points=[p for p in message.points])
    without.points[1].ClearField("false_match_rate")
    assert Calibration.from_proto(without).false_match_rate(0.3) is None


@pytest.mark.parametrize("model_version", MODEL_VERSIONS)
def test_committed_calibrations_meet_their_fmr_bounds(model_version: str) -> None:
    record = load_calibration(model_version)
    assert record is not None
    assert record.model_version == model_version
    assert record.default_threshold == 80.0
    assert record.purpose_threshold(Purpose.PURPOSE_WATCHLIST_MONITORING) == 90.0
    points = {p.similarity: p for p in record.message.points}
    assert sorted(points) == [float(s) for s in range(101)]
    assert points[80.0].false_match_rate_upper_bound <= 1e-4
    assert points[90.0].false_match_rate_upper_bound <= 1e-5
    assert points[79.0].false_match_rate_upper_bound > 1e-4  # the lowest such threshold
    assert record.message.impostor_pair_count > 20_000_000
    assert record.message.genuine_pair_count > 100_000
    assert "lfw-dev" in record.message.description
    assert "Reproduce: facegrid calibrate" in record.message.description
    document = json.loads((CALIBRATIONS / f"{model_version}.json").read_text())
    histogram = document["measurement"]["impostor_cosine"]["histogram"]
    assert sum(histogram["counts"]) == record.message.impostor_pair_count
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
            embedding_pb2.GetModelInfoRequest(), timeout=DEADLINE_S
        )
    record = load_calibration(info.model_version)
    assert info.model_version == MODEL_VERSION
    assert record is not None
    assert info.HasField("similarity_calibration")
    assert info.similarity_calibration == record.message


def test_knn_probes_are_ranked_right_and_the_stranger_rejected(
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
    # At FMR 1e-4 about 84% of genuine pairs match (lfw-dev): most, not all, probes.
    assert sum(p.accepted(record.default_threshold) for p in enrolled) >= 5
    assert [p.face.name for p in strangers] == ["test/obama_and_biden.jpg#2"]
    assert not strangers[0].accepted(record.default_threshold)
    assert result.verification.auc == 1.0
    assert result.verification.at_threshold is not None
    assert result.verification.at_threshold.false_matches == 0


def test_eval_command_starts_its_own_services(
    faces: Path, model_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    det = tmp_path / "det.png"
    code = cli.main(
        [
            "eval",
            str(faces / "knn"),
            "--threshold",
            "60",
            "--strict",
            "--no-cache",
            "--det",
            str(det),
            "--set",
            f"inference.model_repository={model_repo}",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "rank-1 accuracy: 1.0000 (7/7)" in out
    assert "at threshold 60 (this run): 7/7 enrolled probe faces identified, 1/1" in out
    assert "ROC AUC" in out
    assert "TAR at FAR 0.001" in out
    assert "FMR at 80 (default)" in out
    assert det.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_calibrate_refuses_a_set_too_small_for_its_bounds(
    faces: Path,
    detection: ServiceProcess,
    embedding: ServiceProcess,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The 20 distinct faces of ../shared/data/faces give 165 impostor pairs: too few to
    show an FMR of 1e-2 (with no false match the upper bound is 0.022)."""
    code = cli.main(
        [
            "calibrate",
            "--faces",
            str(faces),
            "--no-cache",
            "--detection",
            detection.address,
            "--embedding",
            embedding.address,
        ]
    )
    out = capsys.readouterr().out
    assert code == 2
    assert "impostor pairs cannot show an FMR of 0.01" in out
    assert "label more people" in out


# ---------------------------------------------------------------- LFW (lfw-dev)

# The fixed subset: every 4th person folder (by name) of lfw-dev, 1,794 photos.
SUBSET_EVERY = 4
# Subset rates differ from the committed ones (measured on all of lfw-dev) mostly by who
# is in the subset, which the binomial interval ignores. Tolerance: the committed rate
# must lie within the subset's own 99% interval from resampling its people, widened by
# half its width on each side (percentile intervals of a quarter of the people fall a
# little short: measured on the four quarters, 3 of 32 rates lay just outside).
SUBSET_CONFIDENCE = 0.99
SUBSET_WIDENING = 0.5
# The re-measured false matches at the committed default may exceed the measured count
# by this fraction only (other CPUs round float32 sums differently near the anchor).
REMEASURE_SLACK = 0.005


# All of lfw-dev takes about 4.5 minutes to embed on 2 cores, most of the suite's budget
# for this module: the suite embeds the fixed subset (a quarter, about 1 minute) and the
# checks that need every pair run when FACEGRID_FULL_LFW=1 (by hand; README).
FULL_LFW = os.environ.get("FACEGRID_FULL_LFW") == "1"
needs_full_lfw = pytest.mark.skipif(
    not FULL_LFW, reason="needs all of lfw-dev embedded: set FACEGRID_FULL_LFW=1"
)


def subset_people(people: list[str]) -> set[str]:
    return set(sorted(people)[::SUBSET_EVERY])


@pytest.fixture(scope="module")
def lfw_faces(
    lfw_dev: Path, client: FaceClient, tmp_path_factory: pytest.TempPathFactory
) -> tuple[FaceSet, Path]:
    """lfw-dev (all of it with FACEGRID_FULL_LFW=1, else the fixed subset) through the
    real services, with an embedding cache that the command tests below reuse."""
    cache = tmp_path_factory.mktemp("eval-cache")
    found = labels.discover(lfw_dev)
    if not FULL_LFW:
        keep = subset_people(found.people)
        found = dataclasses.replace(
            found, photos=tuple(p for p in found.photos if p.people <= keep and p.people)
        )
    return client.embed_set(found, cache_dir=cache), cache


@needs_full_lfw
def test_default_thresholds_keep_their_fmr_bound_on_lfw_dev(
    lfw_faces: tuple[FaceSet, Path],
) -> None:
    """Re-measured on the data the calibration was measured on: the FMR's upper 95% bound
    (the wider of Clopper-Pearson and resampling people) at 80 is at most 1e-4, at 90
    (watch-lists) at most 1e-5."""
    faces, _ = lfw_faces
    record = load_calibration(faces.embedding_version)
    assert record is not None
    assert faces.embedding_version == MODEL_VERSION
    captures = group_captures(faces.faces, faces.embeddings)
    pairs = evaluate.score_pairs(faces, captures)
    committed = {p.similarity: p for p in record.message.points}
    assert len(pairs.impostor) == record.message.impostor_pair_count
    assert len(pairs.genuine) == record.message.genuine_pair_count
    for similarity, bound in ((80.0, 1e-4), (90.0, 1e-5)):
        (rates,) = evaluate.error_rates(pairs, record.calibration, [similarity])
        expected = round(committed[similarity].false_match_rate * len(pairs.impostor))
        assert rates.false_matches <= expected * (1 + REMEASURE_SLACK) + 1
        assert rates.fmr[2] <= bound  # Clopper-Pearson
        (people,) = evaluate.people_bootstrap(faces, captures, [rates.cosine])
        assert people.fmr[1] <= bound * (1 + REMEASURE_SLACK)
        assert committed[similarity].false_match_rate_upper_bound <= bound
    # The old default, cosine 0.909215 (80 on the 20-face scale), let 1 in 100 through.
    (old,) = evaluate.error_rates(
        pairs, record.calibration, [record.calibration.similarity(0.909215)]
    )
    assert old.fmr[0] > 5e-3


def test_calibration_points_hold_on_a_fixed_subset_of_lfw_dev(
    lfw_faces: tuple[FaceSet, Path],
) -> None:
    faces, _ = lfw_faces
    labels_seen = {f.label for f in faces.faces}
    # Without FACEGRID_FULL_LFW the fixture holds the subset already.
    people = subset_people(list(labels_seen)) if FULL_LFW else labels_seen
    keep = [i for i, f in enumerate(faces.faces) if f.label in people]
    subset = FaceSet(
        tuple(faces.faces[i] for i in keep),
        faces.embeddings[keep],
        faces.embedding_version,
        faces.detection_version,
        (),
    )
    record = load_calibration(faces.embedding_version)
    assert record is not None
    captures = group_captures(subset.faces, subset.embeddings)
    points = {p.similarity: p for p in record.message.points}
    similarities = (50.0, 60.0, 70.0, 80.0)
    cosines = [record.calibration.cosine_at(s) for s in similarities]
    resampler = evaluate.PeopleResampler(
        subset, captures, min(cosines) - 1e-6, confidence=SUBSET_CONFIDENCE
    )
    for similarity, cosine in zip(similarities, cosines, strict=True):
        for (low, high), committed in (
            (resampler.fmr_interval(cosine), points[similarity].false_match_rate),
            (resampler.fnmr_interval(cosine), points[similarity].false_non_match_rate),
        ):
            margin = SUBSET_WIDENING * (high - low)
            assert low - margin <= committed <= high + margin, (similarity, low, high, committed)


def test_eval_on_lfw_dev_reports_rates_folds_and_a_det_curve(
    lfw_dev: Path,
    lfw_faces: tuple[FaceSet, Path],
    detection: ServiceProcess,
    embedding: ServiceProcess,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    faces, cache = lfw_faces
    det = tmp_path / "det.png"
    folder, pairs = lfw_dev, ["--pairs", str(lfw_dev / "pairs-dev.txt")]
    if not FULL_LFW:
        # The subset's person folders (the cache knows their photos); no 10-fold pairs,
        # which name people of the whole set.
        folder, pairs = tmp_path / "subset", []
        folder.mkdir()
        for person in {f.label for f in faces.faces}:
            (folder / person).symlink_to(lfw_dev / person, target_is_directory=True)
    code = cli.main(
        [
            "eval",
            str(folder),
            *pairs,
            "--cache",
            str(cache),
            "--det",
            str(det),
            "--detection",
            detection.address,
            "--embedding",
            embedding.address,
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    for figure in ("ROC AUC", "TAR at FAR 0.001", "TAR at FAR 0.0001", "TAR at FAR 1e-05"):
        assert figure in out
    assert "FMR at 80 (default)" in out
    assert "FNMR at 90 (watchlist monitoring default)" in out
    assert "rank-1 accuracy" in out
    assert "not-enrolled faces rejected" in out
    if FULL_LFW:
        found = re.search(r"10-fold verification on .*: (\d+\.\d+)% ± (\d+\.\d+)", out)
        assert found is not None, out
        # Measured 98.97% (face_recognition's own pipeline: 97.62% on the same pairs).
        assert float(found.group(1)) >= 98.5
    assert det.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pairs_file_is_checked(tmp_path: Path) -> None:
    good = tmp_path / "pairs.txt"
    good.write_text("2\t1\nA\t1\t2\nA\t1\tB\t1\nC\t3\t4\nC\t1\tD\t2\n")
    pairs = protocol.read_pairs(good)
    assert [(p.first, p.second, p.same, p.fold) for p in pairs[:2]] == [
        ("A/A_0001.jpg", "A/A_0002.jpg", True, 0),
        ("A/A_0001.jpg", "B/B_0001.jpg", False, 0),
    ]
    scores = np.array([0.9, 0.1, -np.inf, 0.2])
    folds = protocol.ten_fold_of(scores, pairs, unscored=1)
    assert folds.accuracies[1] == 0.5  # the unscored matched pair counts as "different"
    for text in (
        "",
        "2 1\nA 1 2\n",
        "1 1\nA 1 2\nA 1 B\n",
        "2 1\nA 1 B 2\nA 1 2\nC 1 2\nC 1 D 2\n",
    ):
        (tmp_path / "bad.txt").write_text(text)
        with pytest.raises(LabelError):
            protocol.read_pairs(tmp_path / "bad.txt")


# ---------------------------------------------------------------- crowds


def test_detection_scoring_matches_boxes_at_iou_half() -> None:
    truth = ((0.0, 0.0, 10.0, 10.0), (20.0, 0.0, 10.0, 10.0))
    found = [
        ((1.0, 1.0, 10.0, 10.0), 99.0),
        ((0.0, 0.0, 10.0, 10.0), 90.0),
        ((50.0, 50.0, 5.0, 5.0), 80.0),
    ]
    assert crowd_photos.iou(truth[0], truth[0]) == 1.0
    assert crowd_photos.iou(truth[0], truth[1]) == 0.0
    # The second box overlaps the first truth box already taken: a false positive.
    assert crowd_photos.match(found, truth) == (1, 2)
    assert crowd_photos.match(found, truth, ignored=((50.0, 50.0, 5.0, 5.0),)) == (1, 1)


def test_crowd_annotations_are_read(crowds: Path) -> None:
    sets = crowd_photos.datasets(crowds)
    assert sum(len(p.boxes) for p in sets["dlib"]) == 25
    assert sum(len(p.boxes) for p in sets["wider"]) == 328
    counts = {p.path.name: p.face_count for p in sets["compreface"]}
    assert counts["016_8.jpg"] == 8
    assert counts["001_A.jpg"] == 1
    assert counts["017_0.jpg"] == 0
    noses = {p.path.name: len(p.noses) for p in sets["compreface"]}
    assert noses["016_8.jpg"] == 8


def test_small_faces_are_found_in_dlib_crowd_photos(
    crowds: Path, detection: ServiceProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """dlib's testing.xml: 25 faces 37-109 px wide. Measured recall: 5/25 at the detector's
    own 80 px, 24/25 looking for 40 px faces, 25/25 for 20 px; precision 24/25 and up."""
    report = tmp_path / "detection.json"
    code = cli.main(
        [
            "eval-detection",
            str(crowds),
            "--min-face-size",
            "40",
            "--min-face-size",
            "20",
            "--only",
            "dlib",
            "--detection",
            detection.address,
            "--json",
            str(report),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    rows = {(r["dataset"], r["setting"]): r for r in json.loads(report.read_text())}
    assert {dataset for dataset, _ in rows} == {"dlib"}
    forty = rows[("dlib", "facegrid, faces >= 40 px")]
    twenty = rows[("dlib", "facegrid, faces >= 20 px")]
    assert forty["recall"] >= 0.9
    assert forty["precision"] >= 0.9
    assert twenty["recall"] >= 0.95
    assert twenty["precision"] >= 0.9
