"""Build the cosine -> similarity calibration from genuine and impostor pairs.

The design of the scale is documented in :mod:`facegrid.similarity`: similarity 50,
60, 70, 80 and 90 sit at the lowest cosine where the upper end of the 95% confidence
interval of the false match rate (FMR) is at most 1e-1 ... 1e-5. This module finds
those cosines on measured pairs and writes a point at every whole similarity, each
with its FMR and false non-match rate (FNMR) and their 95% intervals. Pairs are those
of :func:`facegrid_eval.evaluate.score_pairs`: every two distinct captures,
copies of one photo counted once.

The interval is the wider of two: Clopper-Pearson over pairs (exact if pairs were
independent) and the percentiles of resampling people
(:class:`facegrid_eval.evaluate.PeopleResampler`), which is the wider one on LFW
by far, because pairs that share a person are not independent. FMR below similarity 50
(where no threshold belongs) carries the binomial interval only.

The default thresholds follow: 80 for the deployment (FMR at most 1e-4) and 90 for
PURPOSE_WATCHLIST_MONITORING (at most 1e-5). ``facegrid calibrate`` runs
:func:`calibrate_faces`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from facegrid.similarity import CalibrationRecord
from facegrid.v1 import common_pb2

from facegrid_eval import evaluate, labels, metrics
from facegrid_eval.duplicates import group_captures
from facegrid_eval.evaluate import PairScores, PeopleResampler
from facegrid_eval.faces import FaceSet
from facegrid_eval.labels import LabelSet

# (FMR bound, similarity) anchors of the scale.
FMR_ANCHORS = ((1e-1, 50.0), (1e-2, 60.0), (1e-3, 70.0), (1e-4, 80.0), (1e-5, 90.0))
DEFAULT_THRESHOLD = 80.0  # FMR at most 1e-4
PURPOSE_THRESHOLDS = {"PURPOSE_WATCHLIST_MONITORING": 90.0}  # at most 1e-5
DECIMALS = 6  # cosines as written; they must survive the float32 of the message
HISTOGRAM_BIN = 0.01


@dataclass(frozen=True)
class Anchor:
    fmr_bound: float
    similarity: float
    cosine: float
    false_matches: int  # impostor pairs at or above the cosine


@dataclass(frozen=True)
class Measurement:
    genuine_pairs: int
    impostor_pairs: int
    anchors: tuple[Anchor, ...]


def anchor_cosine(impostor: metrics.Scores, fmr_bound: float) -> tuple[float, int]:
    """The lowest cosine (on the written 6-decimal grid, as float32) at which the upper
    end of the FMR's 95% interval is at most ``fmr_bound``, and the false matches there.
    ValueError when there are too few impostor pairs to show that bound at all."""
    n = len(impostor)
    allowed = metrics.highest_count_within(fmr_bound, n)
    if allowed < 0:
        raise ValueError(
            f"{n} impostor pairs cannot show an FMR of {fmr_bound:g} (the interval's upper "
            f"end with no false match is {metrics.binomial_interval(0, n)[1]:.2g}): label "
            "more people"
        )
    # Just above the (allowed + 1)-th highest impostor score, so at most `allowed` reach it.
    cutoff = impostor.descending(allowed) if allowed < n else -1.0
    cosine = math.ceil(cutoff * 10**DECIMALS + 1e-9) / 10**DECIMALS
    while impostor.at_or_above([_as_written(cosine)])[0] > allowed:
        cosine += 10**-DECIMALS  # float32 rounding put it at or below the cutoff
    return round(cosine, DECIMALS), int(impostor.at_or_above([_as_written(cosine)])[0])


def _as_written(cosine: float) -> float:
    """The value a cosine takes once stored in SimilarityCalibration.Point (float32)."""
    return float(np.float32(round(cosine, DECIMALS)))


def resampled_anchor(resampler: PeopleResampler, start: float, bound: float) -> float:
    """The lowest cosine of the written grid, from ``start`` (where the binomial bound
    holds) up, where the people-resampled upper bound holds too."""
    step = 10**-DECIMALS

    def holds(cosine: float) -> bool:
        return resampler.fmr_interval(_as_written(cosine))[1] <= bound

    if holds(start):
        return start
    low, gap = start, 1e-3  # low fails; find a high that holds, then bisect
    while not holds(min(1.0, low + gap)):
        low, gap = low + gap, gap * 2
        if low >= 1.0:
            raise ValueError(f"no cosine keeps the resampled FMR under {bound:g}")
    high = min(1.0, low + gap)
    while high - low > step * 1.5:
        middle = round((low + high) / 2, DECIMALS)
        if holds(middle):
            high = middle
        else:
            low = middle
    return round(high, DECIMALS)


def measure(pairs: PairScores, resampler: PeopleResampler | None = None) -> Measurement:
    anchors: list[Anchor] = []
    for bound, similarity in FMR_ANCHORS:
        cosine, false_matches = anchor_cosine(pairs.impostor, bound)
        if resampler is not None:
            cosine = resampled_anchor(resampler, cosine, bound)
            false_matches = int(pairs.impostor.at_or_above([_as_written(cosine)])[0])
        if anchors and cosine <= anchors[-1].cosine:
            raise ValueError(f"the FMR {bound:g} anchor does not lie above the one before")
        anchors.append(Anchor(bound, similarity, cosine, false_matches))
    if anchors[-1].cosine >= 1.0:
        raise ValueError("impostor pairs reach cosine 1: the photos are mislabelled or copies")
    return Measurement(len(pairs.genuine), len(pairs.impostor), tuple(anchors))


def scale_points(measurement: Measurement) -> list[tuple[float, float]]:
    """(cosine, similarity) at every whole similarity 0-100, on the lines through
    (-1, 0), the anchors and (1, 100)."""
    knots_c = [-1.0, *(a.cosine for a in measurement.anchors), 1.0]
    knots_s = [0.0, *(a.similarity for a in measurement.anchors), 100.0]
    anchored = {a.similarity: a.cosine for a in measurement.anchors}
    points = []
    for similarity in range(101):
        cosine = anchored.get(float(similarity))
        if cosine is None:
            cosine = round(float(np.interp(similarity, knots_s, knots_c)), DECIMALS)
        points.append((cosine, float(similarity)))
    return points


def build_record(
    pairs: PairScores,
    model_version: str,
    description: str,
    resampler: PeopleResampler | None = None,
) -> tuple[CalibrationRecord, Measurement]:
    """The calibration record (table with measured error rates, default thresholds);
    with a ``resampler``, anchors and intervals from the wider of the two intervals."""
    measurement = measure(pairs, resampler)
    table = scale_points(measurement)
    written = [_as_written(c) for c, _ in table]
    false_matches = pairs.impostor.at_or_above(written)
    false_non_matches = pairs.genuine_scores.below(written)
    fm_low, fm_high = metrics.binomial_interval(false_matches, len(pairs.impostor))
    fnm_low, fnm_high = metrics.binomial_interval(false_non_matches, len(pairs.genuine))
    if resampler is not None:
        for k, cosine in enumerate(written):
            if cosine >= resampler.floor:
                low, high = resampler.fmr_interval(cosine)
                fm_low[k], fm_high[k] = min(fm_low[k], low), max(fm_high[k], high)
            low, high = resampler.fnmr_interval(cosine)
            fnm_low[k], fnm_high[k] = min(fnm_low[k], low), max(fnm_high[k], high)
    points = [
        common_pb2.SimilarityCalibration.Point(
            cosine_similarity=cosine,
            similarity=similarity,
            false_match_rate=float(false_matches[k]) / len(pairs.impostor),
            false_match_rate_lower_bound=float(fm_low[k]),
            false_match_rate_upper_bound=float(fm_high[k]),
            false_non_match_rate=float(false_non_matches[k]) / len(pairs.genuine),
            false_non_match_rate_lower_bound=float(fnm_low[k]),
            false_non_match_rate_upper_bound=float(fnm_high[k]),
        )
        for k, (cosine, similarity) in enumerate(table)
    ]
    message = common_pb2.SimilarityCalibration(
        model_version=model_version,
        points=points,
        description=description,
        genuine_pair_count=len(pairs.genuine),
        impostor_pair_count=len(pairs.impostor),
    )
    return CalibrationRecord(message, DEFAULT_THRESHOLD, dict(PURPOSE_THRESHOLDS)), measurement


def calibrate_faces(
    label_set: LabelSet, faces: FaceSet, dataset: str, date: str, command: str
) -> tuple[CalibrationRecord, Measurement, dict[str, Any]]:
    """The calibration record of a labelled face set, and figures for people to read."""
    captures = group_captures(faces.faces, faces.embeddings)
    pairs = evaluate.score_pairs(faces, captures)
    if not len(pairs.genuine) or not len(pairs.impostor):
        raise ValueError("no genuine or no impostor pairs: label more photos")
    people = sorted({f.label for f in faces.faces} - {labels.UNKNOWN})
    merged = sum(len(g) - 1 for g in captures.members())
    description = (
        f"Measured {date} on {len(faces.faces)} faces in "
        f"{len({f.photo for f in faces.faces})} photos of {dataset} (labels: "
        f"{label_set.shown_origin}): {len(people)} people; {merged} copies of a capture "
        f"counted once; {len(pairs.genuine)} genuine and {len(pairs.impostor)} impostor "
        f"pairs. Similarity 50/60/70/80/90 = the lowest cosine whose FMR upper 95% bound "
        f"(the wider of Clopper-Pearson and resampling people, 1,000 times) is at most "
        f"1e-1/1e-2/1e-3/1e-4/1e-5. Detection "
        f"{faces.detection_version}. Reproduce: {command}"
    )
    floor, _ = anchor_cosine(pairs.impostor, FMR_ANCHORS[0][0])
    resampler = PeopleResampler(faces, captures, _as_written(floor) - 1e-6)
    record, measurement = build_record(pairs, faces.embedding_version, description, resampler)
    summary: dict[str, Any] = {
        "date": date,
        "command": command,
        "labels": label_set.shown_origin,
        "detection_model_version": faces.detection_version,
        "people": len(people),
        "photos": len({f.photo for f in faces.faces}),
        "faces": len(faces.faces),
        "photos_without_a_face": list(faces.notes),
        "distinct_captures": captures.count,
        "genuine_pairs": measurement.genuine_pairs,
        "impostor_pairs": measurement.impostor_pairs,
        "anchors": [
            {
                "fmr_bound": a.fmr_bound,
                "similarity": a.similarity,
                "cosine": a.cosine,
                "false_matches": a.false_matches,
            }
            for a in measurement.anchors
        ],
        "genuine_cosine": distribution(pairs.genuine_scores),
        "impostor_cosine": distribution(pairs.impostor),
        "highest_impostor_pair": (
            [faces.faces[i].name for i in pairs.highest_impostor_pair]
            if pairs.highest_impostor_pair
            else []
        ),
        "lowest_genuine_pair": [
            faces.faces[int(i)].name for i in pairs.genuine_pairs[int(np.argmin(pairs.genuine))]
        ],
    }
    return record, measurement, summary


def distribution(scores: metrics.Scores) -> dict[str, Any]:
    """Quantiles and a histogram (bins of 0.01 in cosine) of one kind of pair scores."""
    values = scores.sorted
    low = math.floor(values[0] / HISTOGRAM_BIN) * HISTOGRAM_BIN
    edges = np.arange(low, values[-1] + HISTOGRAM_BIN, HISTOGRAM_BIN)
    counts = np.diff(np.searchsorted(values, edges, side="left"), append=len(values))
    quantiles = {
        q: round(float(np.quantile(values, q)), 6) for q in (0.0, 0.01, 0.1, 0.5, 0.9, 0.99, 1.0)
    }
    return {
        "count": len(values),
        "mean": round(float(values.mean()), 6),
        "quantiles": {f"{q:g}": v for q, v in quantiles.items()},
        "histogram": {
            "bin_width": HISTOGRAM_BIN,
            "first_bin_start": round(float(low), 6),
            "counts": [int(c) for c in counts],
        },
    }
