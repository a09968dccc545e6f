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
from scipy.stats import beta

Pairs = NDArray[np.intp]  # k x 2 indices, i < j
CONFIDENCE = 0.95  # of every interval facegrid reports


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


def roc_auc(genuine: ArrayLike, impostor: ArrayLike | Scores) -> float:
    """Area under the ROC curve: P(genuine score > impostor score), ties counting half
    (the Mann-Whitney statistic), by counting sorted impostor scores below each genuine
    score, so that millions of impostor pairs need no rank arrays."""
    gen = np.asarray(genuine, np.float64).ravel()
    imp = impostor if isinstance(impostor, Scores) else Scores(impostor)
    if not len(gen) or not len(imp):
        return math.nan
    below = np.searchsorted(imp.sorted, gen, side="left").astype(np.float64)
    at_or_below = np.searchsorted(imp.sorted, gen, side="right").astype(np.float64)
    return float((below + (at_or_below - below) / 2.0).sum() / (len(gen) * len(imp)))


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


def tar_at_far(genuine: ArrayLike, impostor: ArrayLike | Scores, far: float) -> tuple[float, float]:
    """(true accept rate, threshold) at the lowest threshold whose false accept rate is
    at most ``far``. No interpolation: with n impostor pairs, FAR moves in steps of 1/n,
    so the threshold sits just above the (floor(far * n) + 1)-th highest impostor
    score (a genuine score equal to that impostor score is rejected)."""
    gen = np.asarray(genuine, np.float64).ravel()
    imp = impostor if isinstance(impostor, Scores) else Scores(impostor)
    if not len(gen) or not len(imp):
        return math.nan, math.nan
    allowed = math.floor(far * len(imp) + 1e-9)
    if allowed >= len(imp):
        return 1.0, -math.inf
    threshold = float(np.nextafter(imp.descending(allowed), np.inf))
    return float(np.mean(gen >= threshold)), threshold


def binomial_interval(
    errors: ArrayLike, trials: int, confidence: float = CONFIDENCE
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Clopper-Pearson (exact) two-sided interval of an error rate ``errors / trials``.

    Each end has at most (1 - confidence) / 2 probability of lying on the wrong side,
    if the trials are independent. Pairs that share a photo or a person are not quite
    independent, so on pair counts the true uncertainty is somewhat wider; the interval
    is still the standard one (ISO/IEC 19795-1 reports it the same way). With no errors
    the upper end is about 3.7 / trials at 95%.
    """
    k = np.asarray(errors, np.float64)
    if trials <= 0:
        nan = np.full(k.shape, math.nan)
        return nan, nan
    alpha = (1.0 - confidence) / 2.0
    lower = np.where(k > 0, beta.ppf(alpha, k, trials - k + 1), 0.0)
    upper = np.where(k < trials, beta.ppf(1.0 - alpha, k + 1, trials - k), 1.0)
    return np.asarray(lower, np.float64), np.asarray(upper, np.float64)


def highest_count_within(bound: float, trials: int, confidence: float = CONFIDENCE) -> int:
    """The most errors among ``trials`` whose interval's upper end is still at most
    ``bound``; -1 if even none is too many (too few trials to show that bound)."""
    if binomial_interval(0, trials, confidence)[1] > bound:
        return -1
    low, high = 0, trials  # upper(low) <= bound < upper(high + 1) eventually
    while low < high:
        middle = (low + high + 1) // 2
        if binomial_interval(middle, trials, confidence)[1] <= bound:
            low = middle
        else:
            high = middle - 1
    return low


class Scores:
    """One kind of pair scores, sorted, for counting at many thresholds at once."""

    def __init__(self, values: ArrayLike) -> None:
        # Sorted in the values' own precision first: 24 million float32 cosines take
        # 96 MB to sort, where a float64 copy first would double the peak.
        self.sorted = np.sort(np.asarray(values).ravel()).astype(np.float64)

    def __len__(self) -> int:
        return len(self.sorted)

    def at_or_above(self, thresholds: ArrayLike) -> NDArray[np.int64]:
        """How many scores are at or above each threshold."""
        below = np.searchsorted(self.sorted, np.asarray(thresholds, np.float64), side="left")
        return np.asarray(len(self.sorted) - below, np.int64)

    def below(self, thresholds: ArrayLike) -> NDArray[np.int64]:
        return np.asarray(
            np.searchsorted(self.sorted, np.asarray(thresholds, np.float64), side="left"),
            np.int64,
        )

    def descending(self, rank: int) -> float:
        """The score at 0-based ``rank`` from the top."""
        return float(self.sorted[len(self.sorted) - 1 - rank])


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
