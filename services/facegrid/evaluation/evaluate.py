"""Verification and identification on a labelled face set.

Verification pairs every two captures (see :mod:`facegrid.evaluation.duplicates`):
same person is genuine, different people impostor. Identification searches each probe
face against the gallery faces, as SearchFacesByImage does against a collection: the
rank-1 match is the gallery face with the highest cosine, and a probe counts as
matched only at or above the match threshold. A probe whose person has no gallery face
(labelled "?" or simply not enrolled) is right only when nothing reaches the threshold.
Without probes (a plain folder of people) every face is searched against all the
others (leave one out). Gallery faces of the probe's own capture are never candidates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from facegrid.evaluation import metrics
from facegrid.evaluation.duplicates import Captures, group_captures
from facegrid.evaluation.faces import Face, FaceSet
from facegrid.evaluation.labels import UNKNOWN, Role
from facegrid.similarity import Calibration


@dataclass(frozen=True)
class Verification:
    genuine: NDArray[np.float64]  # cosines of genuine pairs
    impostor: NDArray[np.float64]
    genuine_pairs: metrics.Pairs  # face indices of each pair
    impostor_pairs: metrics.Pairs
    auc: float
    far: float
    tar: float
    tar_threshold: float  # cosine
    accuracy: float  # at the match threshold; nan without a calibration
    false_matches: int
    false_non_matches: int


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


def evaluate(
    faces: FaceSet, calibration: Calibration | None, threshold: float, far: float = 0.01
) -> Evaluation:
    """Verification and identification figures of ``faces``."""
    captures = group_captures(faces.faces, faces.embeddings)
    verification = verify(faces, captures, calibration, threshold, far)
    probes, leave_one_out = identify(faces, captures, calibration)
    return Evaluation(faces, captures, verification, probes, leave_one_out, threshold)


def capture_pairs(faces: FaceSet, captures: Captures) -> tuple[metrics.Pairs, metrics.Pairs]:
    """Face indices of (genuine, impostor) pairs, one face per capture."""
    reps = captures.representatives
    genuine, impostor = metrics.pair_indices([faces.faces[r].label for r in reps], UNKNOWN)
    return reps[genuine], reps[impostor]


def pair_cosines(faces: FaceSet, pairs: metrics.Pairs) -> NDArray[np.float64]:
    vectors = faces.embeddings
    return np.asarray((vectors[pairs[:, 0]] * vectors[pairs[:, 1]]).sum(axis=1), np.float64)


def verify(
    faces: FaceSet,
    captures: Captures,
    calibration: Calibration | None,
    threshold: float,
    far: float,
) -> Verification:
    genuine_pairs, impostor_pairs = capture_pairs(faces, captures)
    genuine, impostor = pair_cosines(faces, genuine_pairs), pair_cosines(faces, impostor_pairs)
    tar, tar_threshold = metrics.tar_at_far(genuine, impostor, far)
    accuracy, false_matches, false_non_matches = math.nan, -1, -1
    if calibration is not None:
        gen_sim = calibration.similarities_of(genuine)
        imp_sim = calibration.similarities_of(impostor)
        accuracy = metrics.accuracy_at(gen_sim, imp_sim, threshold)
        false_matches = int(np.count_nonzero(imp_sim >= threshold))
        false_non_matches = int(np.count_nonzero(gen_sim < threshold))
    return Verification(
        genuine,
        impostor,
        genuine_pairs,
        impostor_pairs,
        metrics.roc_auc(genuine, impostor),
        far,
        tar,
        tar_threshold,
        accuracy,
        false_matches,
        false_non_matches,
    )


def identify(
    faces: FaceSet, captures: Captures, calibration: Calibration | None
) -> tuple[tuple[ProbeResult, ...], bool]:
    """Rank-1 search of each probe face against the gallery faces."""
    items = faces.faces
    gallery = np.array([i for i, f in enumerate(items) if f.role is Role.GALLERY], np.intp)
    probes = np.array([i for i, f in enumerate(items) if f.role is Role.PROBE], np.intp)
    leave_one_out = len(probes) == 0
    if leave_one_out:
        probes = gallery
    if not len(probes) or not len(gallery):
        return (), leave_one_out
    scores = faces.embeddings[probes] @ faces.embeddings[gallery].T
    excluded = captures.ids[probes][:, None] == captures.ids[gallery][None, :]
    best, top = metrics.best_matches(scores, excluded)
    results = []
    for row, probe in enumerate(probes):
        face = items[probe]
        match = items[gallery[best[row]]] if best[row] >= 0 else None
        cosine = float(top[row])
        similarity = (
            calibration.similarity(cosine)
            if calibration is not None and match is not None
            else math.nan
        )
        # Enrolled: another capture of this person is in the gallery.
        enrolled = face.label != UNKNOWN and any(
            items[g].label == face.label and captures.ids[g] != captures.ids[probe] for g in gallery
        )
        results.append(ProbeResult(face, enrolled, match, cosine, similarity))
    return tuple(results), leave_one_out
