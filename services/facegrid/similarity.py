"""Similarity on a 0-100 scale from cosine similarity, by a calibration table.

A calibration is a piecewise-linear map from cosine similarity to similarity, measured
per embedding model version (see SimilarityCalibration in common.proto). Below the
first point it gives the first point's similarity, above the last point the last's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from facegrid.errors import invalid_argument
from facegrid.v1 import common_pb2


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
