"""The administrator's policy: match thresholds callers cannot lower, and quality filters.

Thresholds are similarities on the scale of the embedding model's committed
calibration, whose points carry measured false match rates (see facegrid.similarity):
the deployment minimum (``gateway.min_similarity``, default the calibration's 80, FMR
at most 1e-4), stricter minimums per purpose (default: the calibration's, 90 for
watch-list monitoring), and a collection's own ``min_match_threshold``. A collection
keeps the similarity table it was created with; where that table differs from the
committed one (a collection made before a recalibration), the deployment and purpose
minimums are carried over through the cosine they stand for, so that they keep their
measured false match rate on every collection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from facegrid.config import AutoQuality, GatewaySettings, QualityLevel
from facegrid.errors import failed_precondition, invalid_argument
from facegrid.quality import QualityFailure, quality_failures
from facegrid.similarity import Calibration, CalibrationRecord, calibration_of, load_calibration
from facegrid.v1 import common_pb2, face_service_pb2, resources_pb2

Reason = face_service_pb2.UnindexedReason
QF = common_pb2.QualityFilter
Purpose = common_pb2.IdentificationContext.Purpose


def check_requested(requested: float | None, field: str) -> None:
    if requested is not None and not (math.isfinite(requested) and 0 <= requested <= 100):
        raise invalid_argument(field, f"must be 0 to 100, got {requested}")


@dataclass(frozen=True)
class ThresholdDecision:
    """The threshold of one call, and the measured false match rates it implies."""

    message: common_pb2.MatchThreshold
    scale: Calibration  # the similarity table of the scores compared
    reference: Calibration  # the model's committed table, with measured error rates

    @property
    def applied(self) -> float:
        return float(self.message.applied)

    def rates_at(self, cosine: float) -> tuple[float, float]:
        """(FMR, its upper 95% bound) measured at a match's cosine similarity."""
        rate = self.reference.false_match_rate(cosine)
        assert rate is not None  # the policy only decides with a table that has rates
        return rate.rate, rate.upper_bound

    def with_compared(self, compared: int) -> common_pb2.MatchThreshold:
        """The message, with the false candidates to expect among ``compared`` faces."""
        message = common_pb2.MatchThreshold()
        message.CopyFrom(self.message)
        message.compared_face_count = max(0, compared)
        message.expected_false_candidates = message.false_match_rate * message.compared_face_count
        message.expected_false_candidates_upper_bound = (
            message.false_match_rate_upper_bound * message.compared_face_count
        )
        return message


class ThresholdPolicy:
    """Minimum similarity per purpose and collection, and what a threshold means."""

    def __init__(self, settings: GatewaySettings) -> None:
        self._deployment = settings.min_similarity
        self._per_purpose: dict[int, float] = {}
        for name, value in settings.purpose_min_similarity.items():
            try:
                purpose = Purpose.Value(name)
            except ValueError:
                raise ValueError(
                    f"gateway.purpose_min_similarity: unknown purpose {name!r}"
                ) from None
            if not 0 <= value <= 100:
                raise ValueError(f"gateway.purpose_min_similarity[{name}] must be 0 to 100")
            self._per_purpose[purpose] = value

    @staticmethod
    def reference(model_version: str) -> CalibrationRecord:
        """The committed calibration of a model version, which must carry error rates."""
        record = load_calibration(model_version)
        if record is None or not record.calibration.has_error_rates:
            raise failed_precondition(
                "CALIBRATION",
                model_version,
                f"no calibration with measured false match rates is known for model "
                f"{model_version!r}: the meaning of a threshold cannot be stated",
            )
        return record

    def deployment_minimum(self, record: CalibrationRecord) -> float:
        return self._deployment if self._deployment is not None else record.default_threshold

    def purpose_minimum(self, record: CalibrationRecord, purpose: int) -> float:
        """The larger of the deployment's and the purpose's minimum (reference scale)."""
        configured = self._per_purpose.get(purpose)
        if configured is None:
            configured = record.purpose_threshold(purpose)
        return max(self.deployment_minimum(record), configured or 0.0)

    def on_scale(self, similarity: float, record: CalibrationRecord, scale: Calibration) -> float:
        """A reference-scale similarity on another table, through its cosine."""
        if scale.same_scale(record.calibration):
            return similarity
        return scale.similarity(record.calibration.cosine_at(similarity))

    def decide(
        self,
        model_version: str,
        purpose: int,
        requested: float | None,
        field: str,
        collection: resources_pb2.Collection | None = None,
    ) -> ThresholdDecision:
        """The threshold to apply: a lower or absent request is raised to the minimum.

        ``collection``: the collection searched (its table and its own minimum); None
        for CompareFaces, whose scores are on the model's own scale.
        """
        check_requested(requested, field)
        record = self.reference(model_version)
        scale = record.calibration
        if collection is not None and collection.HasField("similarity_calibration"):
            scale = calibration_of(collection.similarity_calibration)
        minimum = self.on_scale(self.purpose_minimum(record, purpose), record, scale)
        message = common_pb2.MatchThreshold()
        if collection is not None and collection.HasField("min_match_threshold"):
            message.collection_minimum = collection.min_match_threshold
            minimum = max(minimum, collection.min_match_threshold)
        message.minimum = minimum
        message.applied = max(minimum, requested or 0.0)
        if requested is not None:
            message.requested = requested
        decision = ThresholdDecision(message, scale, record.calibration)
        message.false_match_rate, message.false_match_rate_upper_bound = decision.rates_at(
            scale.cosine_at(message.applied)
        )
        return decision

    def check_collection_minimum(
        self,
        value: float,
        model_version: str,
        scale: common_pb2.SimilarityCalibration | None,
        field: str,
    ) -> None:
        """A collection's minimum must lie within 0-100 and not below the deployment's."""
        check_requested(value, field)
        record = self.reference(model_version)
        table = calibration_of(scale) if scale is not None else record.calibration
        floor = self.on_scale(self.deployment_minimum(record), record, table)
        if value < floor - 1e-4:
            raise invalid_argument(
                field,
                f"{value:g} is below the deployment's minimum threshold {floor:g}; a "
                "collection may only be stricter",
            )


class QualityPolicy:
    """The QualityFilter levels, as the administrator configured them, and the minimum
    every probe face must meet whatever filter the caller picks."""

    def __init__(self, settings: GatewaySettings) -> None:
        self._levels: dict[int, QualityLevel | None] = {
            QF.QUALITY_FILTER_NONE: None,
            QF.QUALITY_FILTER_LOW: settings.quality_low,
            QF.QUALITY_FILTER_MEDIUM: settings.quality_medium,
            QF.QUALITY_FILTER_HIGH: settings.quality_high,
        }
        auto = {
            AutoQuality.NONE: QF.QUALITY_FILTER_NONE,
            AutoQuality.LOW: QF.QUALITY_FILTER_LOW,
            AutoQuality.MEDIUM: QF.QUALITY_FILTER_MEDIUM,
            AutoQuality.HIGH: QF.QUALITY_FILTER_HIGH,
        }[settings.auto_quality]
        self._levels[QF.QUALITY_FILTER_AUTO] = self._levels[auto]
        self._levels[QF.QUALITY_FILTER_UNSPECIFIED] = self._levels[auto]
        self.probe_minimum = settings.probe_quality

    def level(self, value: int, field: str = "quality_filter") -> QualityLevel | None:
        if value not in self._levels:
            raise invalid_argument(field, f"unknown quality filter {value}")
        return self._levels[value]

    @staticmethod
    def failures(face: common_pb2.FaceDetail, level: QualityLevel | None) -> list[QualityFailure]:
        """Every measure of the face that fails the level; empty if it passes."""
        return quality_failures(face, level)

    @classmethod
    def reasons(
        cls, face: common_pb2.FaceDetail, level: QualityLevel | None
    ) -> list[face_service_pb2.UnindexedReason]:
        """Every reason the face fails the level (each once); empty if it passes."""
        reasons: list[face_service_pb2.UnindexedReason] = []
        for failure in cls.failures(face, level):
            if failure.reason not in reasons:
                reasons.append(failure.reason)
        return reasons

    def probe_failures(
        self, face: common_pb2.FaceDetail, level: QualityLevel | None
    ) -> list[QualityFailure]:
        """What keeps a face from being searched with: the caller's level and the probe
        minimum, which no quality_filter (not even NONE) lowers."""
        failures = self.failures(face, self.probe_minimum)
        seen = {f.measure for f in failures}
        return failures + [f for f in self.failures(face, level) if f.measure not in seen]
