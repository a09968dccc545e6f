"""The administrator's policy: match thresholds callers cannot lower, and quality filters."""

from __future__ import annotations

import math

from facegrid.config import AutoQuality, GatewaySettings, QualityLevel
from facegrid.errors import invalid_argument
from facegrid.v1 import common_pb2, face_service_pb2

Reason = face_service_pb2.UnindexedReason
QF = common_pb2.QualityFilter
Purpose = common_pb2.IdentificationContext.Purpose


class ThresholdPolicy:
    """Minimum similarity per purpose: the larger of the deployment and purpose minimums."""

    def __init__(self, settings: GatewaySettings, calibration_default: float) -> None:
        self._minimum = (
            settings.min_similarity if settings.min_similarity is not None else calibration_default
        )
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

    def minimum(self, purpose: int) -> float:
        return max(self._minimum, self._per_purpose.get(purpose, 0.0))

    def decide(
        self, purpose: int, requested: float | None, field: str
    ) -> common_pb2.MatchThreshold:
        """The threshold to apply: a lower or absent request is raised to the minimum."""
        if requested is not None and not (math.isfinite(requested) and 0 <= requested <= 100):
            raise invalid_argument(field, f"must be 0 to 100, got {requested}")
        minimum = self.minimum(purpose)
        threshold = common_pb2.MatchThreshold(
            minimum=minimum, applied=max(minimum, requested or 0.0)
        )
        if requested is not None:
            threshold.requested = requested
        return threshold


class QualityPolicy:
    """The QualityFilter levels, as the administrator configured them."""

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

    def level(self, value: int, field: str = "quality_filter") -> QualityLevel | None:
        if value not in self._levels:
            raise invalid_argument(field, f"unknown quality filter {value}")
        return self._levels[value]

    @staticmethod
    def reasons(
        face: common_pb2.FaceDetail, level: QualityLevel | None
    ) -> list[face_service_pb2.UnindexedReason]:
        """Every reason the face fails the level; empty if it passes."""
        if level is None:
            return []
        quality = face.quality
        reasons: list[face_service_pb2.UnindexedReason] = []
        if face.confidence < level.min_confidence:
            reasons.append(Reason.UNINDEXED_REASON_LOW_CONFIDENCE)
        if quality.face_size < level.min_face_size:
            reasons.append(Reason.UNINDEXED_REASON_SMALL_BOUNDING_BOX)
        if quality.sharpness < level.min_sharpness:
            reasons.append(Reason.UNINDEXED_REASON_LOW_SHARPNESS)
        if quality.brightness < level.min_brightness:
            reasons.append(Reason.UNINDEXED_REASON_LOW_BRIGHTNESS)
        if quality.brightness > level.max_brightness:
            reasons.append(Reason.UNINDEXED_REASON_HIGH_BRIGHTNESS)
        yaw = abs(quality.yaw) if quality.HasField("yaw") else 0.0
        roll = abs(quality.roll) if quality.HasField("roll") else 0.0
        if yaw > level.max_yaw or roll > level.max_roll:
            reasons.append(Reason.UNINDEXED_REASON_EXTREME_POSE)
        return reasons


def describe_reasons(reasons: list[face_service_pb2.UnindexedReason]) -> str:
    return ", ".join(
        Reason.Name(r).removeprefix("UNINDEXED_REASON_").lower().replace("_", " ") for r in reasons
    )
