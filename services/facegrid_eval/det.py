"""The detection error trade-off (DET) curve of a verification run, as a PNG.

False non-match rate against false match rate, both on normal-deviate (probit) axes
as ISO/IEC 19795-1 draws them, so that a model's curve is close to a straight line and
rates from 1e-6 to 0.5 can be read off one picture. The similarity thresholds that
facegrid ships (and any given) are marked on the curve.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from facegrid.similarity import Calibration
from scipy.stats import norm

from facegrid_eval.evaluate import PairScores

TICKS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.05, 0.2, 0.5)


def curve(pairs: PairScores, points: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """(FMR, FNMR) at impostor-score quantiles from FMR 1/n up to 0.5."""
    n = len(pairs.impostor)
    lowest = max(1.0 / n, 1e-7)
    fmrs = np.geomspace(lowest, 0.5, points)
    ranks = np.minimum((fmrs * n).astype(np.int64), n - 1)
    thresholds = np.array([np.nextafter(pairs.impostor.descending(int(r)), np.inf) for r in ranks])
    fmr = pairs.impostor.at_or_above(thresholds) / n
    fnmr = pairs.genuine_scores.below(thresholds) / max(1, len(pairs.genuine))
    return fmr, fnmr


def write_det(
    path: Path,
    pairs: PairScores,
    calibration: Calibration | None,
    marked: Sequence[float],
    title: str,
) -> None:
    """Draw the DET curve to ``path`` (PNG); ``marked``: similarity thresholds to mark."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # the `eval` extra is not installed
        raise RuntimeError("the DET curve needs matplotlib: pip install 'facegrid[eval]'") from exc
    fmr, fnmr = curve(pairs)
    keep = (fmr > 0) & (fnmr > 0) & (fnmr < 1)
    figure, axes = plt.subplots(figsize=(7, 6), dpi=110)
    axes.plot(norm.ppf(fmr[keep]), norm.ppf(fnmr[keep]), color="#1f4e79", linewidth=2)
    if calibration is not None:
        for similarity in marked:
            cosine = calibration.cosine_at(similarity)
            fm = pairs.impostor.at_or_above([cosine])[0] / len(pairs.impostor)
            fnm = pairs.genuine_scores.below([cosine])[0] / max(1, len(pairs.genuine))
            if 0 < fm < 1 and 0 < fnm < 1:
                x, y = norm.ppf(fm), norm.ppf(fnm)
                axes.plot([x], [y], "o", color="#c00000")
                axes.annotate(
                    f"similarity {similarity:g}\nFMR {fm:.1e}, FNMR {fnm:.3f}",
                    (x, y),
                    textcoords="offset points",
                    xytext=(8, 6),
                    fontsize=8,
                )
    ticks = [t for t in TICKS if t >= fmr[0] / 2]
    axes.set_xticks([norm.ppf(t) for t in ticks], [_label(t) for t in ticks])
    yticks = (1e-3, 1e-2, 0.05, 0.1, 0.2, 0.5, 0.8, 0.95)
    axes.set_yticks([norm.ppf(t) for t in yticks], [_label(t) for t in yticks])
    axes.set_xlim(norm.ppf(max(fmr[0], 1e-7)), norm.ppf(0.5))
    lowest_fnmr = float(fnmr[keep].min()) if keep.any() else 1e-3
    axes.set_ylim(norm.ppf(max(min(lowest_fnmr, 0.01) / 2, 1e-4)), norm.ppf(0.97))
    axes.grid(True, color="#dddddd")
    axes.set_xlabel(f"false match rate ({len(pairs.impostor):,} impostor pairs)")
    axes.set_ylabel(f"false non-match rate ({len(pairs.genuine):,} genuine pairs)")
    axes.set_title(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def _label(rate: float) -> str:
    if rate >= 0.01:
        return f"{rate:g}"
    return f"1e{round(math.log10(rate))}"
