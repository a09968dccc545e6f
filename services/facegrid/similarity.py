"""Similarity on a 0-100 scale from cosine similarity, by a calibration table.

A calibration is a piecewise-linear map from cosine similarity to similarity, measured
per embedding model version (see SimilarityCalibration in common.proto). Below the
first point it gives the first point's similarity, above the last point the last's.

The committed tables live in ``facegrid/calibrations/<model_version>.json`` and are
written by ``facegrid calibrate`` (see :mod:`facegrid.evaluation.calibrate`), which
measures cosine similarities of genuine pairs (two photos of one person) and impostor
pairs (two different people) on labelled photos. The mapping is built from measured
anchors, with cosines strictly increasing:

=========================================  ==========
cosine similarity                          similarity
=========================================  ==========
-1 (the bound)                             0
median impostor pair                       20
highest impostor pair                      70
t0, the zero-false-match threshold         80
median genuine pair                        95
1 (the bound)                              100
=========================================  ==========

t0 lies midway between the highest impostor cosine and the lowest genuine cosine above
it, so on the calibration photos no impostor pair reaches similarity 80, and 80 is the
default match threshold (Rekognition's default, too). An anchor that would not lie
strictly above the one before it (for instance a genuine median below t0, on data that
does not separate) is left out. The scale orders pairs and marks where strangers
stopped matching on the calibration photos; it is not a probability.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np
from google.protobuf import json_format
from numpy.typing import NDArray

from facegrid.errors import invalid_argument
from facegrid.v1 import common_pb2

CALIBRATIONS_PACKAGE = "facegrid.calibrations"
_MODEL_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")


@dataclass(frozen=True)
class Calibration:
    cosines: NDArray[np.float64]
    similarities: NDArray[np.float64]

    @classmethod
    def from_proto(
        cls, message: common_pb2.SimilarityCalibration, field: str = "similarity_calibration"
    ) -> Calibration:
        cosines = np.array([p.cosine_similarity for p in message.points], np.float64)
        similarities = np.array([p.similarity for p in message.points], np.float64)
        if len(cosines) < 2:
            raise invalid_argument(f"{field}.points", "at least two points are required")
        if not np.all(np.diff(cosines) > 0) or cosines[0] < -1 or cosines[-1] > 1:
            raise invalid_argument(
                f"{field}.points", "cosine_similarity must increase strictly, within [-1, 1]"
            )
        if not np.all(np.diff(similarities) >= 0) or similarities[0] < 0 or similarities[-1] > 100:
            raise invalid_argument(
                f"{field}.points", "similarity must not decrease, within [0, 100]"
            )
        return cls(cosines, similarities)

    def similarity(self, cosine: float) -> float:
        return float(np.interp(cosine, self.cosines, self.similarities))

    def similarities_of(self, cosines: NDArray[np.floating[Any]]) -> NDArray[np.float64]:
        """Vectorised :meth:`similarity`."""
        return np.interp(np.asarray(cosines, np.float64), self.cosines, self.similarities)

    def cosine_at(self, similarity: float) -> float:
        """The lowest cosine whose similarity reaches ``similarity`` (for thresholds)."""
        if similarity <= self.similarities[0]:
            return float(self.cosines[0])
        if similarity > self.similarities[-1]:
            return float("inf")
        index = int(np.searchsorted(self.similarities, similarity, side="left"))
        low_s, high_s = self.similarities[index - 1], self.similarities[index]
        low_c, high_c = self.cosines[index - 1], self.cosines[index]
        return float(low_c + (high_c - low_c) * (similarity - low_s) / (high_s - low_s))


@dataclass(frozen=True)
class CalibrationRecord:
    """A committed calibration: the table and the default match threshold (0-100)."""

    message: common_pb2.SimilarityCalibration
    default_threshold: float

    @property
    def model_version(self) -> str:
        return str(self.message.model_version)

    @property
    def calibration(self) -> Calibration:
        return Calibration.from_proto(self.message)

    def to_json(self, measurement: dict[str, Any] | None = None) -> str:
        """The file form; ``measurement`` (figures for people to read) is kept beside it.

        The table is written in proto3 JSON (field names as in common.proto), its float32
        values rounded to 6 decimals so that the file reads as it was measured.
        """
        points = [
            {
                "cosine_similarity": round(float(p.cosine_similarity), 6),
                "similarity": round(float(p.similarity), 6),
                **{
                    rate: round(float(getattr(p, rate)), 6)
                    for rate in ("false_match_rate", "false_non_match_rate")
                    if p.HasField(rate)
                },
            }
            for p in self.message.points
        ]
        document: dict[str, Any] = {
            "default_threshold": self.default_threshold,
            "similarity_calibration": {
                "model_version": self.message.model_version,
                "points": points,
                "description": self.message.description,
            },
        }
        if measurement is not None:
            document["measurement"] = measurement
        return json.dumps(document, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> CalibrationRecord:
        document = json.loads(text)
        message = json_format.ParseDict(
            document["similarity_calibration"], common_pb2.SimilarityCalibration()
        )
        record = cls(message, float(document["default_threshold"]))
        record.calibration  # noqa: B018 - validates the table
        if not 0 <= record.default_threshold <= 100:
            raise ValueError(f"default_threshold {record.default_threshold} is not in [0, 100]")
        return record


@lru_cache(maxsize=16)
def load_calibration(model_version: str) -> CalibrationRecord | None:
    """The committed calibration of an embedding model version; None if none is known."""
    if not _MODEL_VERSION.match(model_version):
        return None  # not a file name: never look outside the package
    resource = resources.files(CALIBRATIONS_PACKAGE) / f"{model_version}.json"
    if not resource.is_file():
        return None
    return CalibrationRecord.from_json(resource.read_text(encoding="utf-8"))
