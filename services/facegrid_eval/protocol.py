"""LFW's 10-fold verification protocol ("View 2") on the photos a folder holds.

A pairs file in LFW's ``pairs.txt`` format starts with a line ``FOLDS N``, then per
fold N matched pairs (``name i j``: photos i and j of one person) and N mismatched
pairs (``name1 i name2 j``). Photo ``i`` of ``name`` is ``name/name_{i:04d}.jpg``.

For each fold, the threshold is the one that decides the other nine folds best; the
fold's accuracy is measured at it. The figure is the mean over the folds, with the
standard error of that mean, as LFW's results page reports it. A pair with a photo in
which no face was found (or that the folder lacks) cannot be scored: it is counted as
"different people", right for a mismatched pair and wrong for a matched one, so that
a failure to detect costs accuracy instead of being left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from facegrid_eval.labels import LabelError

if TYPE_CHECKING:  # only numpy and the standard library at run time: see bench_lfw_pairs.py
    from facegrid_eval.faces import FaceSet


@dataclass(frozen=True)
class Pair:
    first: str  # photo paths relative to the folder
    second: str
    same: bool
    fold: int


@dataclass(frozen=True)
class FoldResult:
    accuracies: tuple[float, ...]
    unscored_pairs: int  # a photo without a face, or missing
    pairs: int

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracies))

    @property
    def standard_error(self) -> float:
        return float(np.std(self.accuracies, ddof=1) / math.sqrt(len(self.accuracies)))


def photo_path(name: str, number: str) -> str:
    return f"{name}/{name}_{int(number):04d}.jpg"


def read_pairs(path: Path) -> list[Pair]:
    """The pairs of a ``pairs.txt``-format file; LabelError if it is not one."""
    try:
        lines = [line.split() for line in path.read_text(encoding="utf-8").splitlines()]
    except OSError as exc:
        raise LabelError(f"{path}: {exc}") from exc
    lines = [line for line in lines if line]
    try:
        folds, per_fold = (int(v) for v in lines[0])
    except (IndexError, ValueError):
        raise LabelError(f"{path}: the first line must be 'FOLDS PAIRS_PER_KIND'") from None
    rows = lines[1:]
    if folds < 2 or len(rows) != folds * 2 * per_fold:
        raise LabelError(
            f"{path}: expected {folds} folds of {per_fold} matched and {per_fold} mismatched "
            f"pairs ({folds * 2 * per_fold} lines), found {len(rows)}"
        )
    pairs = []
    for number, row in enumerate(rows):
        fold, within = divmod(number, 2 * per_fold)
        matched = within < per_fold
        try:
            if matched and len(row) == 3:
                pairs.append(
                    Pair(photo_path(row[0], row[1]), photo_path(row[0], row[2]), True, fold)
                )
            elif not matched and len(row) == 4:
                pairs.append(
                    Pair(photo_path(row[0], row[1]), photo_path(row[2], row[3]), False, fold)
                )
            else:
                raise ValueError
        except ValueError:
            kind = "matched (name i j)" if matched else "mismatched (name1 i name2 j)"
            raise LabelError(f"{path} line {number + 2}: expected a {kind} pair") from None
    return pairs


def pair_scores(faces: FaceSet, pairs: list[Pair]) -> tuple[NDArray[np.float64], int]:
    """Cosine of each pair's two largest faces; -inf where one cannot be scored."""
    index = {face.photo: i for i, face in enumerate(faces.faces) if face.index == 0}
    scores = np.full(len(pairs), -np.inf)
    unscored = 0
    for k, pair in enumerate(pairs):
        a, b = index.get(pair.first), index.get(pair.second)
        if a is None or b is None:
            unscored += 1
            continue
        scores[k] = float(faces.embeddings[a] @ faces.embeddings[b])
    return scores, unscored


def ten_fold(faces: FaceSet, pairs: list[Pair]) -> FoldResult:
    scores, unscored = pair_scores(faces, pairs)
    return ten_fold_of(scores, pairs, unscored)


def ten_fold_of(scores: NDArray[np.float64], pairs: list[Pair], unscored: int) -> FoldResult:
    """The protocol on given pair scores (higher: more alike; -inf: not scored)."""
    same = np.array([p.same for p in pairs])
    fold = np.array([p.fold for p in pairs])
    accuracies = []
    for f in np.unique(fold):
        train, test = fold != f, fold == f
        threshold = best_threshold(scores[train], same[train])
        accuracies.append(float(np.mean((scores[test] >= threshold) == same[test])))
    return FoldResult(tuple(accuracies), unscored, len(pairs))


def best_threshold(scores: NDArray[np.float64], same: NDArray[np.bool_]) -> float:
    """The threshold (midway between two scores) that decides these pairs best."""
    finite = np.unique(scores[np.isfinite(scores)])
    if not len(finite):
        return math.inf
    candidates = np.concatenate(
        [[finite[0] - 1e-6], (finite[1:] + finite[:-1]) / 2, [finite[-1] + 1e-6]]
    )
    # Right answers at each candidate: matched pairs at or above, mismatched below.
    order = np.sort(scores[same])
    other = np.sort(scores[~same])
    right = (len(order) - np.searchsorted(order, candidates, side="left")) + np.searchsorted(
        other, candidates, side="left"
    )
    return float(candidates[int(np.argmax(right))])
