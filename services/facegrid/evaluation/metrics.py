"""Verification and identification figures, in plain numpy.

Scores are "higher means more alike" (cosine or calibrated similarity). A pair is
accepted as a match when its score is at or above the threshold, as everywhere in
facegrid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

Pairs = NDArray[np.intp]  # k x 2 indices, i < j


def pair_indices(labels: Sequence[str], unknown: str = "?") -> tuple[Pairs, Pairs]:
    """(genuine, impostor) pairs among items labelled ``labels``.

    Two items with one label are genuine, two labels are impostor; two ``unknown`` items
    are left out (two strangers may be the same person).
    """
    names = np.array(labels, dtype=object)
    i, j = np.triu_indices(len(names), k=1)
    same = names[i] == names[j]
    both_unknown = (names[i] == unknown) & (names[j] == unknown)
    genuine = same & ~both_unknown
    impostor = ~same
    return np.stack([i[genuine], j[genuine]], 1), np.stack([i[impostor], j[impostor]], 1)


def roc_auc(genuine: ArrayLike, impostor: ArrayLike) -> float:
    """Area under the ROC curve: P(genuine score > impostor score), ties counting half
    (the Mann-Whitney statistic, from average ranks)."""
    gen = np.asarray(genuine, np.float64).ravel()
    imp = np.asarray(impostor, np.float64).ravel()
    if not len(gen) or not len(imp):
        return math.nan
    ranks = _average_ranks(np.concatenate([gen, imp]))
    rank_sum = ranks[: len(gen)].sum()
    return float((rank_sum - len(gen) * (len(gen) + 1) / 2) / (len(gen) * len(imp)))


def accuracy_at(genuine: ArrayLike, impostor: ArrayLike, threshold: float) -> float:
    """Fraction of all pairs decided right: genuine at or above, impostor below."""
    gen = np.asarray(genuine, np.float64).ravel()
    imp = np.asarray(impostor, np.float64).ravel()
    total = len(gen) + len(imp)
    if not total:
        return math.nan
    return float((np.count_nonzero(gen >= threshold) + np.count_nonzero(imp < threshold)) / total)


def false_match_rate(impostor: ArrayLike, threshold: float) -> float:
    imp = np.asarray(impostor, np.float64).ravel()
    return float(np.mean(imp >= threshold)) if len(imp) else math.nan


def false_non_match_rate(genuine: ArrayLike, threshold: float) -> float:
    gen = np.asarray(genuine, np.float64).ravel()
    return float(np.mean(gen < threshold)) if len(gen) else math.nan


def tar_at_far(genuine: ArrayLike, impostor: ArrayLike, far: float) -> tuple[float, float]:
    """(true accept rate, threshold) at the lowest threshold whose false accept rate is
    at most ``far``. No interpolation: with n impostor pairs, FAR moves in steps of 1/n,
    so the threshold sits just above the (floor(far * n) + 1)-th highest impostor
    score (a genuine score equal to that impostor score is rejected)."""
    gen = np.asarray(genuine, np.float64).ravel()
    imp = np.sort(np.asarray(impostor, np.float64).ravel())[::-1]
    if not len(gen) or not len(imp):
        return math.nan, math.nan
    allowed = math.floor(far * len(imp) + 1e-9)
    if allowed >= len(imp):
        return 1.0, -math.inf
    cutoff = imp[allowed]
    threshold = float(np.nextafter(cutoff, np.inf))
    return float(np.mean(gen >= threshold)), threshold


def best_matches(
    scores: NDArray[np.float64], excluded: NDArray[np.bool_] | None = None
) -> tuple[NDArray[np.intp], NDArray[np.float64]]:
    """For each row (probe) of a probe x gallery score matrix: the best gallery column
    and its score, leaving out ``excluded`` cells; -1 and -inf where nothing is left."""
    masked = np.array(scores, np.float64, copy=True)
    if excluded is not None:
        masked[excluded] = -np.inf
    if masked.shape[1] == 0:
        return np.full(len(masked), -1, np.intp), np.full(len(masked), -np.inf)
    best = np.argmax(masked, axis=1).astype(np.intp)
    top = masked[np.arange(len(masked)), best]
    best[~np.isfinite(top)] = -1
    return best, top


def rank_one_accuracy(
    probe_labels: Sequence[str], gallery_labels: Sequence[str], best: NDArray[np.intp]
) -> float:
    """Fraction of probes whose best gallery match carries the probe's own label."""
    if not len(probe_labels):
        return math.nan
    hits = [
        b >= 0 and gallery_labels[b] == label for label, b in zip(probe_labels, best, strict=True)
    ]
    return float(np.mean(hits))


def _average_ranks(values: NDArray[np.float64]) -> NDArray[np.float64]:
    """1-based ranks, tied values sharing their average rank."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    _, first, counts = np.unique(ordered, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0  # 1-based mean of positions first+1 .. first+count
    ranks = np.empty(len(values), np.float64)
    ranks[order] = np.repeat(average, counts)
    return ranks
