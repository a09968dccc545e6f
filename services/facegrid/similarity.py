"""Similarity on a 0-100 scale from cosine similarity, by a calibration table.

A calibration is a piecewise-linear map from cosine similarity to similarity, measured
per embedding model version (see SimilarityCalibration in common.proto), with the false
match and false non-match rates measured at each point. Below the first point it gives
the first point's similarity, above the last point the last's.

The committed tables live in ``facegrid/calibrations/<model_version>.json`` and are
written by ``facegrid calibrate`` (see :mod:`facegrid_eval.calibrate`), which
measures the cosine similarities of genuine pairs (two photos of one person) and
impostor pairs (two different people) on labelled photos. The scale is anchored on
measured false match rates (FMR): similarity 50, 60, 70, 80 and 90 sit at the lowest
cosine where the upper end of the 95% confidence interval of the FMR is at most 1e-1,
1e-2, 1e-3, 1e-4 and 1e-5, so every 10 points above 50 are a tenfold drop in false
matches; the scale runs straight from cosine -1 (0) to the first anchor and from the
last anchor to cosine 1 (100). The table holds a point at every whole similarity.

A threshold's meaning is therefore a false match rate on the calibration set, and the
default thresholds are chosen by it: 80 for the deployment (FMR at most 1e-4) and 90
for watch-list monitoring, where every passer-by is compared (at most 1e-5).
"""

from __future__ import annotations

import decimal
import json
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np
from google.protobuf import json_format
from numpy.typing import NDArray

from facegrid.errors import invalid_argument
from facegrid.v1 import common_pb2

CALIBRATIONS_PACKAGE = "facegrid.calibrations"
_MODEL_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
Purpose = common_pb2.IdentificationContext.Purpose


@dataclass(frozen=True)
class FalseMatchRate:
    """A measured false match rate and the upper end of its 95% confidence interval."""

    rate: float
    upper_bound: float


@dataclass(frozen=True, eq=False)
class Calibration:
    cosines: NDArray[np.float64]
    similarities: NDArray[np.float64]
    # Measured at each point; None when the table does not carry them.
    false_match_rates: NDArray[np.float64] | None = None
    false_match_upper_bounds: NDArray[np.float64] | None = None

    @classmethod
    def from_proto(
        cls, message: common_pb2.SimilarityCalibration, field: str = "similarity_calibration"
    ) -> Calibration:
        points = list(message.points)
        cosines = np.array([p.cosine_similarity for p in points], np.float64)
        similarities = np.array([p.similarity for p in points], np.float64)
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
        rates = uppers = None
        if all(p.HasField("false_match_rate") for p in points):
            rates = np.array([p.false_match_rate for p in points], np.float64)
            uppers = np.array(
                [
                    p.false_match_rate_upper_bound
                    if p.HasField("false_match_rate_upper_bound")
                    else p.false_match_rate
                    for p in points
                ],
                np.float64,
            )
        return cls(cosines, similarities, rates, uppers)

    def similarity(self, cosine: float) -> float:
        return float(np.interp(cosine, self.cosines, self.similarities))

    def score(self, cosine: float) -> Score:
        """The figures every match reports, from its cosine similarity."""
        return Score(self.similarity(cosine), cosine, unit_distance(cosine))

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

    def same_scale(self, other: Calibration) -> bool:
        """Whether both map every cosine to the same similarity (the same points)."""
        return bool(
            np.array_equal(self.cosines, other.cosines)
            and np.array_equal(self.similarities, other.similarities)
        )

    @property
    def has_error_rates(self) -> bool:
        return self.false_match_rates is not None

    def false_match_rate(self, cosine: float) -> FalseMatchRate | None:
        """The FMR measured at ``cosine``, between the table's points; None without rates.

        Rates fall roughly exponentially with the cosine, so they are interpolated on a
        log scale (linearly towards a point where no impostor pair was left).
        """
        if self.false_match_rates is None or self.false_match_upper_bounds is None:
            return None
        if not math.isfinite(cosine):
            cosine = float(self.cosines[-1] if cosine > 0 else self.cosines[0])
        return FalseMatchRate(
            _interpolate_rate(cosine, self.cosines, self.false_match_rates),
            _interpolate_rate(cosine, self.cosines, self.false_match_upper_bounds),
        )


def _interpolate_rate(
    cosine: float, cosines: NDArray[np.float64], rates: NDArray[np.float64]
) -> float:
    if cosine <= cosines[0]:
        return float(rates[0])
    if cosine >= cosines[-1]:
        return float(rates[-1])
    index = int(np.searchsorted(cosines, cosine, side="right"))
    low_c, high_c = cosines[index - 1], cosines[index]
    low_r, high_r = float(rates[index - 1]), float(rates[index])
    t = float((cosine - low_c) / (high_c - low_c))
    if t == 0.0:
        return low_r
    if low_r > 0 and high_r > 0:
        return float(math.exp(math.log(low_r) + t * (math.log(high_r) - math.log(low_r))))
    return low_r + t * (high_r - low_r)


@dataclass(frozen=True)
class Score:
    """One comparison of two embeddings, as a match reports it."""

    similarity: float  # on the collection's (or model's) calibrated 0-100 scale
    cosine: float
    distance: float  # Euclidean, between the unit vectors

    def admitted(self, threshold: float) -> bool:
        """Whether the match reaches a similarity threshold (inclusive)."""
        return self.similarity >= threshold


def unit_distance(cosine: float) -> float:
    """The Euclidean distance of two unit vectors with this cosine similarity."""
    return math.sqrt(max(0.0, 2.0 - 2.0 * cosine))


@dataclass(frozen=True)
class CalibrationRecord:
    """A committed calibration: the table and the default match thresholds (0-100)."""

    message: common_pb2.SimilarityCalibration
    default_threshold: float
    # Stricter defaults per purpose (IdentificationContext.Purpose names).
    purpose_thresholds: dict[str, float] = field(default_factory=dict)

    @property
    def model_version(self) -> str:
        return str(self.message.model_version)

    @property
    def calibration(self) -> Calibration:
        return calibration_of(self.message)

    def purpose_threshold(self, purpose: int) -> float | None:
        """The purpose's default minimum, where the calibration sets one."""
        name = Purpose.Name(purpose) if purpose in Purpose.values() else ""
        return self.purpose_thresholds.get(name)

    def to_json(self, measurement: dict[str, Any] | None = None) -> str:
        """The file form; ``measurement`` (figures for people to read) is kept beside it.

        The table is written in proto3 JSON field names (as in common.proto); cosines
        are written with 6 decimals (the calibration rounds them so that they survive
        the float32 of the message), rates with 6 significant digits.
        """
        rate_fields = [
            "false_match_rate",
            "false_match_rate_lower_bound",
            "false_match_rate_upper_bound",
            "false_non_match_rate",
            "false_non_match_rate_lower_bound",
            "false_non_match_rate_upper_bound",
        ]
        points = [
            {
                "cosine_similarity": round(float(p.cosine_similarity), 6),
                "similarity": round(float(p.similarity), 6),
                **{
                    rate: _significant(getattr(p, rate), rate)
                    for rate in rate_fields
                    if p.HasField(rate)
                },
            }
            for p in self.message.points
        ]
        table: dict[str, Any] = {
            "model_version": self.message.model_version,
            "description": self.message.description,
        }
        if self.message.genuine_pair_count or self.message.impostor_pair_count:
            table["genuine_pair_count"] = int(self.message.genuine_pair_count)
            table["impostor_pair_count"] = int(self.message.impostor_pair_count)
        table["points"] = points
        document: dict[str, Any] = {
            "default_threshold": self.default_threshold,
            "purpose_default_thresholds": dict(sorted(self.purpose_thresholds.items())),
            "similarity_calibration": table,
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
        purposes = {
            str(name): float(value)
            for name, value in document.get("purpose_default_thresholds", {}).items()
        }
        record = cls(message, float(document["default_threshold"]), purposes)
        record.calibration  # noqa: B018 - validates the table
        for name, value in {"default": record.default_threshold, **purposes}.items():
            if name != "default" and name not in Purpose.keys():  # noqa: SIM118 - not a dict
                raise ValueError(f"purpose_default_thresholds: unknown purpose {name!r}")
            if not 0 <= value <= 100:
                raise ValueError(f"threshold {name}={value} is not in [0, 100]")
        return record


def _significant(value: float, name: str) -> float:
    """6 significant digits; upper bounds rounded up and lower bounds down, so that a
    written bound never claims more than was measured."""
    if value == 0:
        return 0.0
    rounding = decimal.ROUND_HALF_EVEN
    if name.endswith("upper_bound"):
        rounding = decimal.ROUND_CEILING
    elif name.endswith("lower_bound"):
        rounding = decimal.ROUND_FLOOR
    exact = decimal.Decimal(value)
    quantum = decimal.Decimal(1).scaleb(exact.adjusted() - 5)
    return float(exact.quantize(quantum, rounding=rounding))


@lru_cache(maxsize=64)
def _parsed(serialized: bytes) -> Calibration:
    message = common_pb2.SimilarityCalibration()
    message.ParseFromString(serialized)
    return Calibration.from_proto(message)


def calibration_of(message: common_pb2.SimilarityCalibration) -> Calibration:
    """The parsed table of a calibration message (parsed once per distinct table)."""
    return _parsed(message.SerializeToString(deterministic=True))


@lru_cache(maxsize=16)
def load_calibration(model_version: str) -> CalibrationRecord | None:
    """The committed calibration of an embedding model version; None if none is known."""
    if not _MODEL_VERSION.fullmatch(model_version):
        return None  # not a file name: never look outside the package
    resource = resources.files(CALIBRATIONS_PACKAGE) / f"{model_version}.json"
    if not resource.is_file():
        return None
    return CalibrationRecord.from_json(resource.read_text(encoding="utf-8"))
