"""The gateway's threshold and probe-quality policy, in process (no services).

Thresholds are similarities on the committed calibration's scale, whose points carry
measured false match rates; these tests check the rules the administrator relies on:
callers can raise, never lower; purposes and collections can only be stricter; a
collection with an older similarity table keeps the same measured FMR; and each decision
says what it means for a gallery of a given size.
"""

from __future__ import annotations

import math

import grpc
import pytest
from facegrid.config import GatewaySettings
from facegrid.errors import ServiceError
from facegrid.identification.policy import QualityPolicy, ThresholdPolicy
from facegrid.similarity import load_calibration
from facegrid.v1 import common_pb2, resources_pb2

MODEL = "dlib_resnet_v1+mirror"
Purpose = common_pb2.IdentificationContext.Purpose
TESTING = Purpose.PURPOSE_TESTING
WATCHLIST = Purpose.PURPOSE_WATCHLIST_MONITORING
# A similarity table of the kind collections were created with before the recalibration
# (measured on 20 faces): 80 was cosine 0.909, an FMR of about 1e-2 on lfw-dev.
OLD_POINTS = (
    (-1.0, 0.0),
    (0.822009, 20.0),
    (0.886611, 70.0),
    (0.909215, 80.0),
    (0.963767, 95.0),
    (1.0, 100.0),
)


def _policy(**settings: object) -> ThresholdPolicy:
    return ThresholdPolicy(GatewaySettings(**settings))  # type: ignore[arg-type]


def _collection(
    points: tuple[tuple[float, float], ...] | None = None, minimum: float | None = None
) -> resources_pb2.Collection:
    record = load_calibration(MODEL)
    assert record is not None
    collection = resources_pb2.Collection(model_version=MODEL, face_count=300_000)
    if points is None:
        collection.similarity_calibration.CopyFrom(record.message)
    else:
        collection.similarity_calibration.CopyFrom(
            common_pb2.SimilarityCalibration(
                model_version=MODEL,
                points=[
                    common_pb2.SimilarityCalibration.Point(cosine_similarity=c, similarity=s)
                    for c, s in points
                ],
            )
        )
    if minimum is not None:
        collection.min_match_threshold = minimum
    return collection


def _code(call: object) -> grpc.StatusCode:
    with pytest.raises(ServiceError) as caught:
        call()  # type: ignore[operator]
    return caught.value.code


def test_defaults_come_from_the_calibration_and_mean_fmr_1e4_and_1e5() -> None:
    policy = _policy()
    default = policy.decide(MODEL, TESTING, None, "t").message
    assert (default.minimum, default.applied) == (80.0, 80.0)
    assert not default.HasField("requested")
    assert 0 < default.false_match_rate <= default.false_match_rate_upper_bound <= 1e-4
    watch = policy.decide(MODEL, WATCHLIST, None, "t").message
    assert watch.minimum == 90.0
    assert watch.false_match_rate_upper_bound <= 1e-5


def test_a_caller_raises_but_never_lowers() -> None:
    policy = _policy()
    lowered = policy.decide(MODEL, TESTING, 10.0, "t").message
    assert (lowered.requested, lowered.minimum, lowered.applied) == (10.0, 80.0, 80.0)
    raised = policy.decide(MODEL, TESTING, 92.5, "t").message
    assert raised.applied == pytest.approx(92.5)
    assert (
        raised.false_match_rate < policy.decide(MODEL, TESTING, None, "t").message.false_match_rate
    )
    for bad in (-1.0, 100.5, math.nan, math.inf):
        assert (
            _code(lambda b=bad: policy.decide(MODEL, TESTING, b, "t"))
            == grpc.StatusCode.INVALID_ARGUMENT
        )


def test_administrator_settings_override_the_calibration_defaults() -> None:
    policy = _policy(
        min_similarity=70.0, purpose_min_similarity={"PURPOSE_WATCHLIST_MONITORING": 95.0}
    )
    assert policy.decide(MODEL, TESTING, None, "t").message.minimum == 70.0
    assert policy.decide(MODEL, WATCHLIST, None, "t").message.minimum == 95.0
    # A purpose minimum below the deployment's does not lower it.
    assert (
        _policy(purpose_min_similarity={"PURPOSE_TESTING": 50.0})
        .decide(MODEL, TESTING, None, "t")
        .message.minimum
        == 80.0
    )
    with pytest.raises(ValueError, match="unknown purpose"):
        _policy(purpose_min_similarity={"PURPOSE_GUESSING": 90.0})


def test_a_collection_minimum_is_stricter_only() -> None:
    policy = _policy()
    strict = policy.decide(MODEL, TESTING, None, "t", _collection(minimum=87.0)).message
    assert (strict.minimum, strict.collection_minimum, strict.applied) == (87.0, 87.0, 87.0)
    loose = policy.decide(MODEL, TESTING, 85.0, "t", _collection(minimum=70.0)).message
    assert (loose.minimum, loose.applied) == (80.0, 85.0)
    policy.check_collection_minimum(80.0, MODEL, None, "m")
    assert _code(lambda: policy.check_collection_minimum(79.5, MODEL, None, "m")) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )


def test_an_old_similarity_table_keeps_the_measured_fmr() -> None:
    """80 on the old table meant cosine 0.909 (FMR about 1e-2): the deployment minimum is
    carried over through its cosine, so the old collection is searched at FMR 1e-4 too."""
    policy = _policy()
    record = load_calibration(MODEL)
    assert record is not None
    old = policy.decide(MODEL, TESTING, None, "t", _collection(OLD_POINTS))
    new = policy.decide(MODEL, TESTING, None, "t", _collection())
    assert old.message.minimum > 85.0  # on the old table's scale
    assert old.scale.cosine_at(old.applied) == pytest.approx(
        record.calibration.cosine_at(80.0), abs=1e-5
    )
    assert old.message.false_match_rate == pytest.approx(new.message.false_match_rate, rel=1e-3)
    # A request of 80 on the old table is below the carried-over minimum: raised.
    assert policy.decide(
        MODEL, TESTING, 80.0, "t", _collection(OLD_POINTS)
    ).applied == pytest.approx(old.applied)


def test_a_decision_says_how_many_false_candidates_to_expect() -> None:
    decision = _policy().decide(MODEL, TESTING, None, "t", _collection())
    assessed = decision.with_compared(300_000)
    assert assessed.compared_face_count == 300_000
    assert assessed.expected_false_candidates == pytest.approx(assessed.false_match_rate * 300_000)
    assert 5 < assessed.expected_false_candidates < 30  # FMR 5e-5, at most 1e-4
    assert assessed.expected_false_candidates_upper_bound <= 30.0 + 1e-9
    rate, upper = decision.rates_at(0.99)
    assert rate < 1e-6
    assert upper < 1e-6
    assert decision.rates_at(0.90)[0] > decision.rates_at(0.95)[0]


def test_unknown_models_cannot_be_given_a_threshold() -> None:
    assert _code(lambda: _policy().decide("no-such-model", TESTING, None, "t")) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )


def _face(**quality: float) -> common_pb2.FaceDetail:
    values = {"sharpness": 50.0, "brightness": 50.0, "face_size": 120, "yaw": 0.0, "roll": 0.0}
    values.update(quality)
    return common_pb2.FaceDetail(confidence=99.0, quality=common_pb2.FaceQuality(**values))  # type: ignore[arg-type]


def test_the_probe_minimum_holds_whatever_filter_is_asked_for() -> None:
    quality = QualityPolicy(GatewaySettings())
    none = quality.level(common_pb2.QUALITY_FILTER_NONE)
    assert none is None
    assert quality.probe_failures(_face(), none) == []
    blurred = quality.probe_failures(_face(sharpness=1.0), none)
    assert [f.measure for f in blurred] == ["sharpness"]
    assert "blurred" in blurred[0].text
    dark_and_turned = quality.probe_failures(_face(brightness=3.0, yaw=80.0), none)
    assert {f.measure for f in dark_and_turned} == {"brightness", "yaw"}
    high = quality.level(common_pb2.QUALITY_FILTER_HIGH)
    small = quality.probe_failures(_face(face_size=60), high)
    assert [f.measure for f in small] == ["face_size"]  # HIGH wants 100 px; the minimum 40
