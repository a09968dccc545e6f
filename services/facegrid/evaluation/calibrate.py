"""Build the cosine -> similarity calibration from genuine and impostor pairs.

The design of the table (which anchors, what they map to) is documented in
:mod:`facegrid.similarity`; this module measures where the anchors lie. Pairs are those
of :func:`facegrid.evaluation.evaluate.capture_pairs`: every two distinct captures,
copies of one photo counted once. ``facegrid calibrate`` runs :func:`calibrate_faces`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from facegrid.evaluation import evaluate, labels, metrics
from facegrid.evaluation.faces import FaceSet
from facegrid.evaluation.labels import LabelSet
from facegrid.similarity import CalibrationRecord
from facegrid.v1 import common_pb2

DEFAULT_THRESHOLD = 80.0  # the similarity t0 maps to
# A step in cosine that survives the float32 of SimilarityCalibration.Point.
MIN_STEP = 1e-5
# When no genuine pair lies above the highest impostor, t0 sits this far above it.
NO_GAP_MARGIN = 1e-3


@dataclass(frozen=True)
class Summary:
    """Cosine similarities of one kind of pair."""

    count: int
    minimum: float
    median: float
    maximum: float

    @classmethod
    def of(cls, values: NDArray[np.float64]) -> Summary:
        if not len(values):
            raise ValueError("no pairs of this kind: label more photos")
        return cls(len(values), float(values.min()), float(np.median(values)), float(values.max()))


@dataclass(frozen=True)
class Anchor:
    name: str
    cosine: float
    similarity: float


@dataclass(frozen=True)
class Measurement:
    genuine: Summary
    impostor: Summary
    t0: float
    separable: bool  # some genuine pair lies above every impostor pair
    anchors: tuple[Anchor, ...]


def zero_false_match_cosine(
    genuine: NDArray[np.float64], impostor: NDArray[np.float64]
) -> tuple[float, bool]:
    """t0: midway between the highest impostor cosine and the lowest genuine cosine above
    it, so both kinds keep a margin. Where no genuine pair lies above every impostor
    pair there is no gap to split: t0 is then just above the highest impostor (the
    lowest threshold without a false match), and the second value is False."""
    top_impostor = float(impostor.max())
    above = genuine[genuine > top_impostor]
    if len(above):
        return (top_impostor + float(above.min())) / 2.0, True
    t0 = min(top_impostor + NO_GAP_MARGIN, (top_impostor + 1.0) / 2.0)
    if t0 <= top_impostor:
        raise ValueError("impostor pairs reach cosine 1: the photos are mislabelled or copies")
    return t0, False


def measure(genuine: Sequence[float], impostor: Sequence[float]) -> Measurement:
    """Where the anchors of the table lie on these pairs."""
    gen = np.asarray(genuine, np.float64)
    imp = np.asarray(impostor, np.float64)
    gen_summary, imp_summary = Summary.of(gen), Summary.of(imp)
    t0, separable = zero_false_match_cosine(gen, imp)
    wanted = [
        Anchor("bound", -1.0, 0.0),
        Anchor("impostor median", imp_summary.median, 20.0),
        Anchor("highest impostor", imp_summary.maximum, 70.0),
        Anchor("t0 (zero false match)", t0, DEFAULT_THRESHOLD),
        Anchor("genuine median", gen_summary.median, 95.0),
        Anchor("bound", 1.0, 100.0),
    ]
    anchors: list[Anchor] = []
    for anchor in wanted:
        keep_t0 = anchor.similarity == DEFAULT_THRESHOLD
        if anchors and anchor.cosine - anchors[-1].cosine < MIN_STEP:
            if not keep_t0:
                continue  # not strictly above the one before: leave it out
            anchors.pop()  # t0 lies above the highest impostor by construction
        anchors.append(anchor)
    return Measurement(gen_summary, imp_summary, t0, separable, tuple(anchors))


def build_record(
    genuine: Sequence[float],
    impostor: Sequence[float],
    model_version: str,
    description: str,
) -> tuple[CalibrationRecord, Measurement]:
    """The calibration record (table with measured error rates, default threshold)."""
    measurement = measure(genuine, impostor)
    points = [
        common_pb2.SimilarityCalibration.Point(
            cosine_similarity=round(anchor.cosine, 6),
            similarity=anchor.similarity,
            false_match_rate=round(metrics.false_match_rate(impostor, anchor.cosine), 6),
            false_non_match_rate=round(metrics.false_non_match_rate(genuine, anchor.cosine), 6),
        )
        for anchor in measurement.anchors
    ]
    message = common_pb2.SimilarityCalibration(
        model_version=model_version, points=points, description=description
    )
    return CalibrationRecord(message, DEFAULT_THRESHOLD), measurement


def calibrate_faces(
    label_set: LabelSet, faces: FaceSet, dataset: str, date: str, command: str
) -> tuple[CalibrationRecord, Measurement, dict[str, Any]]:
    """The calibration record of a labelled face set, and figures for people to read."""
    result = evaluate.evaluate(faces, None, math.nan)
    genuine, impostor = result.verification.genuine, result.verification.impostor
    people = sorted({f.label for f in faces.faces} - {labels.UNKNOWN})
    merged = sum(len(g) - 1 for g in result.captures.members())
    description = (
        f"Measured {date} on {len(faces.faces)} faces in "
        f"{len({f.photo for f in faces.faces})} photos of {dataset} (labels: "
        f"{label_set.shown_origin}): {len(people)} named people plus "
        f"{sum(f.label == labels.UNKNOWN for f in faces.faces)} unnamed face(s); "
        f"{merged} copies of a capture counted once, leaving {result.captures.count} faces; "
        f"{len(genuine)} genuine and {len(impostor)} impostor pairs. Detection "
        f"{faces.detection_version}. Reproduce: {command}"
    )
    record, measurement = build_record(
        genuine.tolist(), impostor.tolist(), faces.embedding_version, description
    )
    v = result.verification
    summary: dict[str, Any] = {
        "date": date,
        "command": command,
        "labels": label_set.shown_origin,
        "detection_model_version": faces.detection_version,
        "people": people,
        "faces": len(faces.faces),
        "distinct_captures": result.captures.count,
        "genuine_pairs": measurement.genuine.count,
        "impostor_pairs": measurement.impostor.count,
        "genuine_cosine": _summary_dict(measurement.genuine),
        "impostor_cosine": _summary_dict(measurement.impostor),
        "lowest_genuine_pair": _extreme_pair(faces, v.genuine, v.genuine_pairs, lowest=True),
        "highest_impostor_pair": _extreme_pair(faces, v.impostor, v.impostor_pairs, lowest=False),
        "t0": round(measurement.t0, 6),
        "separable": measurement.separable,
        "anchors": [a.name for a in measurement.anchors],
    }
    return record, measurement, summary


def _extreme_pair(
    faces: FaceSet, cosines: np.ndarray[Any, Any], pairs: np.ndarray[Any, Any], lowest: bool
) -> list[str]:
    """Names of the two faces of the least (or most) similar pair."""
    row = int(np.argmin(cosines) if lowest else np.argmax(cosines))
    return [faces.faces[int(i)].name for i in pairs[row]]


def _summary_dict(summary: Summary) -> dict[str, float]:
    return {
        "min": round(summary.minimum, 6),
        "median": round(summary.median, 6),
        "max": round(summary.maximum, 6),
    }
