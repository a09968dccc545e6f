"""Whether a detected face is good enough to use: the measures of a QualityLevel.

One place for the rule, used by the gateway (indexing filters, the probe minimum) and by
``facegrid eval`` (what the probe minimum costs in true accepts).
"""

from __future__ import annotations

from dataclasses import dataclass

from facegrid.config import QualityLevel
from facegrid.v1 import common_pb2, face_service_pb2

Reason = face_service_pb2.UnindexedReason


@dataclass(frozen=True)
class QualityFailure:
    reason: face_service_pb2.UnindexedReason
    measure: str  # the FaceQuality field (or "confidence") that failed
    text: str  # for people: the value and the limit


def quality_failures(
    face: common_pb2.FaceDetail, level: QualityLevel | None
) -> list[QualityFailure]:
    """Every measure of the face that fails the level; empty if it passes."""
    if level is None:
        return []
    q = face.quality
    out: list[QualityFailure] = []

    def fail(reason: face_service_pb2.UnindexedReason, measure: str, text: str) -> None:
        out.append(QualityFailure(reason, measure, text))

    if face.confidence < level.min_confidence:
        fail(
            Reason.UNINDEXED_REASON_LOW_CONFIDENCE,
            "confidence",
            f"confidence {face.confidence:.1f} < {level.min_confidence:g}",
        )
    if q.face_size < level.min_face_size:
        fail(
            Reason.UNINDEXED_REASON_SMALL_BOUNDING_BOX,
            "face_size",
            f"too small: {q.face_size} px < {level.min_face_size}",
        )
    if q.sharpness < level.min_sharpness:
        fail(
            Reason.UNINDEXED_REASON_LOW_SHARPNESS,
            "sharpness",
            f"blurred: sharpness {q.sharpness:.1f} < {level.min_sharpness:g}",
        )
    if q.brightness < level.min_brightness:
        fail(
            Reason.UNINDEXED_REASON_LOW_BRIGHTNESS,
            "brightness",
            f"too dark: brightness {q.brightness:.1f} < {level.min_brightness:g}",
        )
    if q.brightness > level.max_brightness:
        fail(
            Reason.UNINDEXED_REASON_HIGH_BRIGHTNESS,
            "brightness",
            f"overexposed: brightness {q.brightness:.1f} > {level.max_brightness:g}",
        )
    yaw = abs(q.yaw) if q.HasField("yaw") else 0.0
    roll = abs(q.roll) if q.HasField("roll") else 0.0
    if yaw > level.max_yaw:
        fail(
            Reason.UNINDEXED_REASON_EXTREME_POSE,
            "yaw",
            f"turned away: yaw {yaw:.0f} deg > {level.max_yaw:g}",
        )
    if roll > level.max_roll:
        fail(
            Reason.UNINDEXED_REASON_EXTREME_POSE,
            "roll",
            f"tilted: roll {roll:.0f} deg > {level.max_roll:g}",
        )
    return out
