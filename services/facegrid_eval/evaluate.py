"""Verification and identification on a labelled face set.

Verification pairs every two captures (see :mod:`facegrid_eval.duplicates`):
same person is genuine, different people impostor. Scores are computed block by block
and only the impostor scores are kept (sorted, 8 bytes a pair: 24 million pairs of
LFW's half take 190 MB), so memory stays bounded by the set's size, not its square.

Identification searches each probe face against the gallery faces, as
SearchFacesByImage does against a collection: the rank-1 match is the gallery face with
the highest cosine, and a probe counts as matched only at or above the match
threshold. A probe whose person has no gallery face (labelled "?" or simply not
enrolled) is right only when nothing reaches the threshold (open-set identification).
Without probes (a plain folder of people) every face is searched against all the
others (leave one out). Gallery faces of the probe's own capture are never candidates.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from facegrid.config import QualityLevel
from facegrid.quality import quality_failures
from facegrid.similarity import Calibration
from facegrid.v1 import common_pb2
from numpy.typing import NDArray

from facegrid_eval import metrics
from facegrid_eval.duplicates import Captures, group_captures
from facegrid_eval.faces import Face, FaceSet
from facegrid_eval.labels import UNKNOWN, Role

BLOCK_ROWS = 1024
DEFAULT_FARS = (1e-3, 1e-4, 1e-5)


@dataclass(frozen=True)
class PairScores:
    """Cosines of every genuine and impostor pair of distinct captures."""

    genuine: NDArray[np.float64]
    genuine_pairs: metrics.Pairs  # face indices of each genuine pair
    # Each person's genuine pairs share one unit of weight, so that a person with 500
    # photos (125,000 pairs) counts as much as one with two.
    genuine_weights: NDArray[np.float64]
    impostor: metrics.Scores
    highest_impostor_pair: tuple[int, int] | None  # face indices

    @property
    def genuine_scores(self) -> metrics.Scores:
        return metrics.Scores(self.genuine)


@dataclass(frozen=True)
class ErrorRates:
    """False match and non-match counts and rates at one threshold, with intervals."""

    similarity: float  # nan without a calibration
    cosine: float
    false_matches: int
    impostor_pairs: int
    false_non_matches: int
    genuine_pairs: int

    @property
    def fmr(self) -> tuple[float, float, float]:
        """(rate, lower, upper) of the false match rate."""
        return _rate(self.false_matches, self.impostor_pairs)

    @property
    def fnmr(self) -> tuple[float, float, float]:
        return _rate(self.false_non_matches, self.genuine_pairs)


def _rate(errors: int, trials: int) -> tuple[float, float, float]:
    if not trials:
        return math.nan, math.nan, math.nan
    low, high = metrics.binomial_interval(errors, trials)
    return errors / trials, float(low), float(high)


@dataclass(frozen=True)
class TarAtFar:
    far: float
    tar: float  # over all genuine pairs
    tar_per_person: float  # each person weighted equally
    cosine: float  # the threshold


@dataclass(frozen=True)
class Verification:
    pairs: PairScores
    auc: float
    tar_at: tuple[TarAtFar, ...]
    at_threshold: ErrorRates | None  # None without a calibration

    @property
    def accuracy(self) -> float:
        rates = self.at_threshold
        if rates is None:
            return math.nan
        right = (rates.impostor_pairs - rates.false_matches) + (
            rates.genuine_pairs - rates.false_non_matches
        )
        return right / max(1, rates.impostor_pairs + rates.genuine_pairs)


@dataclass(frozen=True)
class ProbeResult:
    face: Face
    enrolled: bool  # the probe's person has gallery faces
    best: Face | None
    cosine: float
    similarity: float  # nan without a calibration

    def accepted(self, threshold: float) -> bool:
        return not math.isnan(self.similarity) and self.similarity >= threshold

    @property
    def rank_one_correct(self) -> bool:
        return self.best is not None and self.best.label == self.face.label

    def correct(self, threshold: float) -> bool:
        """Open-set: the right person at the threshold, or nobody for a stranger."""
        if self.enrolled:
            return self.rank_one_correct and self.accepted(threshold)
        return not self.accepted(threshold)


@dataclass(frozen=True)
class Evaluation:
    faces: FaceSet
    captures: Captures
    verification: Verification
    probes: tuple[ProbeResult, ...]
    leave_one_out: bool
    threshold: float  # similarity; nan without a calibration

    @property
    def enrolled_probes(self) -> list[ProbeResult]:
        return [p for p in self.probes if p.enrolled]

    @property
    def unenrolled_probes(self) -> list[ProbeResult]:
        return [p for p in self.probes if not p.enrolled]

    @property
    def rank_one_accuracy(self) -> float:
        enrolled = self.enrolled_probes
        if not enrolled:
            return math.nan
        return float(np.mean([p.rank_one_correct for p in enrolled]))

    def identification_rates(self, threshold: float) -> tuple[float, float]:
        """Open-set (detection and identification rate, false positive identification
        rate) at ``threshold``: enrolled probes whose own person is the rank-1 candidate
        at or above it, and strangers for whom anyone is."""
        enrolled, strangers = self.enrolled_probes, self.unenrolled_probes
        dir_ = np.mean([p.correct(threshold) for p in enrolled]) if enrolled else math.nan
        fpir = np.mean([p.accepted(threshold) for p in strangers]) if strangers else math.nan
        return float(dir_), float(fpir)


def evaluate(
    faces: FaceSet,
    calibration: Calibration | None,
    threshold: float,
    fars: Sequence[float] = DEFAULT_FARS,
) -> Evaluation:
    """Verification and identification figures of ``faces``."""
    captures = group_captures(faces.faces, faces.embeddings)
    pairs = score_pairs(faces, captures)
    verification = verify(pairs, calibration, threshold, fars)
    probes, leave_one_out = identify(faces, captures, calibration)
    return Evaluation(faces, captures, verification, probes, leave_one_out, threshold)


@dataclass(frozen=True)
class _PairBlock:
    """Cosines of some rows of faces with all faces, and which cells are pairs."""

    rows: NDArray[np.intp]
    scores: NDArray[np.float32]  # len(rows) x all
    upper: NDArray[np.bool_]  # the column comes after the row: each pair once
    same: NDArray[np.bool_]  # the two faces carry one label


def _pair_blocks(vectors: NDArray[np.float32], codes: NDArray[np.intp]) -> Iterator[_PairBlock]:
    """Every pair of ``vectors``, BLOCK_ROWS rows at a time (memory: rows x all)."""
    columns = np.arange(len(vectors))
    for start in range(0, len(vectors), BLOCK_ROWS):
        rows = np.arange(start, min(start + BLOCK_ROWS, len(vectors)))
        yield _PairBlock(
            rows,
            vectors[rows] @ vectors.T,
            columns[None, :] > rows[:, None],
            codes[rows][:, None] == codes[None, :],
        )


def score_pairs(faces: FaceSet, captures: Captures) -> PairScores:
    """Cosines of all pairs of capture representatives, block by block.

    Two faces with one label are genuine, two labels impostor; two faces of unknown
    people ("?") are left out, since they may be the same stranger.
    """
    reps = captures.representatives
    labels = np.array([faces.faces[r].label for r in reps], dtype=object)
    codes = np.unique(labels, return_inverse=True)[1].astype(np.intp)
    unknown = labels == UNKNOWN
    vectors = np.asarray(faces.embeddings[reps], np.float32)
    genuine: list[NDArray[np.float64]] = []
    genuine_pairs: list[NDArray[np.intp]] = []
    impostor: list[NDArray[np.float32]] = []
    best: tuple[float, int, int] | None = None
    for part in _pair_blocks(vectors, codes):
        rows, block = part.rows, part.scores
        both_unknown = unknown[rows][:, None] & unknown[None, :]
        is_genuine = part.upper & part.same & ~both_unknown
        is_impostor = part.upper & ~part.same
        i, j = np.nonzero(is_genuine)
        genuine.append(block[i, j].astype(np.float64))
        genuine_pairs.append(np.stack([reps[rows[i]], reps[j]], 1))
        scores = np.where(is_impostor, block, -np.inf)
        top = np.unravel_index(int(np.argmax(scores)), scores.shape)
        if np.isfinite(scores[top]) and (best is None or scores[top] > best[0]):
            best = (float(scores[top]), int(reps[rows[top[0]]]), int(reps[top[1]]))
        impostor.append(block[is_impostor])
    gen = np.concatenate(genuine) if genuine else np.zeros(0)
    gen_pairs = np.concatenate(genuine_pairs) if genuine_pairs else np.zeros((0, 2), np.intp)
    flat = np.concatenate(impostor) if impostor else np.zeros(0, np.float32)
    return PairScores(
        gen,
        gen_pairs,
        _per_person_weights([faces.faces[int(a)].label for a in gen_pairs[:, 0]]),
        metrics.Scores(flat),
        (best[1], best[2]) if best is not None else None,
    )


def _per_person_weights(labels: Sequence[str]) -> NDArray[np.float64]:
    counts: dict[str, int] = defaultdict(int)
    for label in labels:
        counts[label] += 1
    if not counts:
        return np.zeros(0)
    return np.array([1.0 / (counts[label] * len(counts)) for label in labels], np.float64)


def verify(
    pairs: PairScores,
    calibration: Calibration | None,
    threshold: float,
    fars: Sequence[float] = DEFAULT_FARS,
) -> Verification:
    tar_at = []
    for far in fars:
        tar, cosine = metrics.tar_at_far(pairs.genuine, pairs.impostor, far)
        per_person = (
            float(pairs.genuine_weights[pairs.genuine >= cosine].sum())
            if len(pairs.genuine)
            else math.nan
        )
        tar_at.append(TarAtFar(far, tar, per_person, cosine))
    at_threshold = None
    if calibration is not None and not math.isnan(threshold):
        at_threshold = error_rates(pairs, calibration, [threshold])[0]
    return Verification(
        pairs, metrics.roc_auc(pairs.genuine, pairs.impostor), tuple(tar_at), at_threshold
    )


def error_rates(
    pairs: PairScores, calibration: Calibration, similarities: Sequence[float]
) -> list[ErrorRates]:
    """Counts at each similarity threshold (a pair matches at or above it)."""
    cosines = [calibration.cosine_at(s) for s in similarities]
    false_matches = pairs.impostor.at_or_above(cosines)
    false_non_matches = pairs.genuine_scores.below(cosines)
    return [
        ErrorRates(s, c, int(fm), len(pairs.impostor), int(fnm), len(pairs.genuine))
        for s, c, fm, fnm in zip(
            similarities, cosines, false_matches, false_non_matches, strict=True
        )
    ]


def identify(
    faces: FaceSet, captures: Captures, calibration: Calibration | None
) -> tuple[tuple[ProbeResult, ...], bool]:
    """Rank-1 search of each probe face against the gallery faces, block by block."""
    items = faces.faces
    gallery = np.array([i for i, f in enumerate(items) if f.role is Role.GALLERY], np.intp)
    probes = np.array([i for i, f in enumerate(items) if f.role is Role.PROBE], np.intp)
    leave_one_out = len(probes) == 0
    if leave_one_out:
        probes = gallery
    if not len(probes) or not len(gallery):
        return (), leave_one_out
    # The distinct captures of each person in the gallery: a probe is enrolled when one
    # of them is not its own.
    gallery_captures: dict[str, set[int]] = defaultdict(set)
    for g in gallery:
        gallery_captures[items[g].label].add(int(captures.ids[g]))
    vectors = np.asarray(faces.embeddings, np.float32)
    results = []
    for start in range(0, len(probes), BLOCK_ROWS):
        block = probes[start : start + BLOCK_ROWS]
        scores = vectors[block] @ vectors[gallery].T
        excluded = captures.ids[block][:, None] == captures.ids[gallery][None, :]
        best, top = metrics.best_matches(scores.astype(np.float64), excluded)
        for row, probe in enumerate(block):
            face = items[probe]
            match = items[gallery[best[row]]] if best[row] >= 0 else None
            cosine = float(top[row])
            similarity = (
                calibration.similarity(cosine)
                if calibration is not None and match is not None
                else math.nan
            )
            own = int(captures.ids[probe])
            enrolled = face.label != UNKNOWN and bool(gallery_captures[face.label] - {own})
            results.append(ProbeResult(face, enrolled, match, cosine, similarity))
    return tuple(results), leave_one_out


@dataclass(frozen=True)
class QualityCost:
    """What refusing faces below a quality level as probes costs in true accepts."""

    refused: int  # faces that fail the level
    faces: int
    by_measure: dict[str, int]  # faces failing each measure
    tar: float  # at the threshold, every genuine pair
    tar_with_refusals: float  # pairs with a refused face counted as not matched


def quality_cost(
    faces: FaceSet, pairs: PairScores, cosine: float, level: QualityLevel | None
) -> QualityCost:
    """TAR at ``cosine`` before and after refusing the faces that fail ``level``."""
    failing = np.zeros(len(faces.faces), bool)
    by_measure: dict[str, int] = defaultdict(int)
    for i, face in enumerate(faces.faces):
        detail = common_pb2.FaceDetail(confidence=face.confidence, quality=face.quality)
        measures = {f.measure for f in quality_failures(detail, level)}
        failing[i] = bool(measures)
        for measure in measures:
            by_measure[measure] += 1
    matched = pairs.genuine >= cosine
    usable = ~(failing[pairs.genuine_pairs[:, 0]] | failing[pairs.genuine_pairs[:, 1]])
    total = max(1, len(pairs.genuine))
    return QualityCost(
        int(failing.sum()),
        len(faces.faces),
        dict(sorted(by_measure.items())),
        float(matched.sum() / total),
        float((matched & usable).sum() / total),
    )


@dataclass(frozen=True)
class ResampledInterval:
    """95% intervals from resampling people: FMR (low, high) and FNMR (low, high)."""

    fmr: tuple[float, float]
    fnmr: tuple[float, float]


class PeopleResampler:
    """Intervals of FMR and FNMR that count people, not pairs, as the independent draws.

    People are resampled with replacement (ISO/IEC 19795-1's "subsets bootstrap"), and
    each resample's error rates are recounted from per-person and per-pair-of-people
    counts, so that how alike a few people look, or how many photos one person has
    (George W. Bush holds 70% of lfw-dev's genuine pairs), shows in the width. It is
    the interval that says how far another set of people may land: four quarters of
    lfw-dev's people gave FMRs from 3.9e-5 to 1.3e-4 at cosine 0.9415, where the whole
    set's binomial interval is 9.2e-5 to 1.0e-4.

    Impostor pairs are kept from ``floor`` up (FMR below it is not resampled).
    """

    def __init__(
        self,
        faces: FaceSet,
        captures: Captures,
        floor: float,
        resamples: int = 1000,
        confidence: float = metrics.CONFIDENCE,
        seed: int = 0,
    ) -> None:
        reps = captures.representatives
        names = np.array([faces.faces[r].label for r in reps], dtype=object)
        people, person = np.unique(names, return_inverse=True)
        self._people = len(people)
        known = np.array([name != UNKNOWN for name in people])
        photos = np.bincount(person, minlength=len(people)).astype(np.float64)
        vectors = np.asarray(faces.embeddings[reps], np.float32)
        high: list[tuple[NDArray[np.intp], NDArray[np.float32]]] = []
        genuine: list[tuple[NDArray[np.intp], NDArray[np.float32]]] = []
        for part in _pair_blocks(vectors, person):
            rows, block = part.rows, part.scores
            i, j = np.nonzero(part.upper & ~part.same & (block >= floor))
            high.append((person[rows[i]] * len(people) + person[j], block[i, j]))
            gi, gj = np.nonzero(part.upper & part.same & known[person[rows]][:, None])
            genuine.append((person[rows[gi]], block[gi, gj]))
        keys = np.concatenate([k for k, _ in high]) if high else np.zeros(0, np.intp)
        scores = np.concatenate([v for _, v in high]) if high else np.zeros(0, np.float32)
        order = np.argsort(-scores, kind="stable")  # highest first: "at or above t" is a prefix
        self._pair_keys, self._pair_scores = keys[order], scores[order].astype(np.float64)
        self._genuine_person = np.concatenate([g for g, _ in genuine])
        self._genuine_scores = np.concatenate([v for _, v in genuine]).astype(np.float64)
        rng = np.random.default_rng(seed)
        draws = rng.multinomial(len(people), np.full(len(people), 1.0 / len(people)), resamples)
        self._weights = draws.astype(np.float64)
        total = self._weights @ photos
        self._impostor_pairs = (total**2 - (self._weights**2) @ (photos**2)) / 2.0
        self._genuine_pairs = self._weights @ np.bincount(
            self._genuine_person, minlength=len(people)
        ).astype(np.float64)
        self._tail = (1.0 - confidence) / 2.0
        self.floor = floor

    def fmr_interval(self, cosine: float) -> tuple[float, float]:
        if cosine < self.floor:
            raise ValueError(f"impostor pairs are kept from cosine {self.floor:g} only")
        kept = int(np.searchsorted(-self._pair_scores, -cosine, side="right"))
        keys, counts = np.unique(self._pair_keys[:kept], return_counts=True)
        first, second = np.divmod(keys, self._people)
        weighted = np.concatenate(
            [
                (chunk[:, first] * chunk[:, second]) @ counts.astype(np.float64)
                for chunk in np.array_split(self._weights, max(1, len(self._weights) // 50))
            ]
        )
        rates = weighted / self._impostor_pairs
        return float(np.quantile(rates, self._tail)), float(np.quantile(rates, 1 - self._tail))

    def fnmr_interval(self, cosine: float) -> tuple[float, float]:
        missed = np.bincount(
            self._genuine_person[self._genuine_scores < cosine], minlength=self._people
        ).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            rates = (self._weights @ missed) / self._genuine_pairs
        return (
            float(np.nanquantile(rates, self._tail)),
            float(np.nanquantile(rates, 1 - self._tail)),
        )


def people_bootstrap(
    faces: FaceSet, captures: Captures, cosines: Sequence[float]
) -> list[ResampledInterval]:
    """:class:`PeopleResampler` intervals at each cosine."""
    resampler = PeopleResampler(faces, captures, min(cosines))
    return [
        ResampledInterval(resampler.fmr_interval(c), resampler.fnmr_interval(c)) for c in cosines
    ]
