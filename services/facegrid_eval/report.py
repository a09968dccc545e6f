"""Rich tables of ``facegrid eval`` and ``facegrid calibrate`` results."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from facegrid.similarity import CalibrationRecord
from rich.console import Console
from rich.table import Table

from facegrid_eval import calibrate, evaluate, labels
from facegrid_eval.evaluate import ErrorRates
from facegrid_eval.labels import LabelSet
from facegrid_eval.protocol import FoldResult

# Above this many probes the per-probe table is left out (the summary stays).
PROBE_TABLE_LIMIT = 60


def print_evaluation(
    console: Console,
    label_set: LabelSet,
    result: evaluate.Evaluation,
    record: CalibrationRecord | None,
    thresholds: Sequence[tuple[str, float]],
) -> None:
    """``thresholds``: (name, similarity) pairs to report error rates at."""
    faces = result.faces
    console.print(f"labels: {label_set.shown_origin}")
    console.print(
        f"{len(faces.faces)} faces of {len({f.label for f in faces.faces} - {labels.UNKNOWN})} "
        f"people in {len({f.photo for f in faces.faces})} photos, {result.captures.count} "
        f"distinct captures; embedding {faces.embedding_version}, detection "
        f"{faces.detection_version}"
    )
    if record is None:
        console.print("[yellow]no calibration for this model: similarity figures are n/a[/]")
    else:
        console.print(
            f"calibration {record.model_version}, match threshold {result.threshold:g} "
            f"(cosine {record.calibration.cosine_at(result.threshold):.4f})"
        )
    merged = [g for g in result.captures.members() if len(g) > 1]
    for group in merged[:20]:
        names = ", ".join(faces.faces[i].name for i in group)
        console.print(f"  one capture, counted once: {names}", style="dim")
    if len(merged) > 20:
        console.print(f"  ... and {len(merged) - 20} more captures with copies", style="dim")
    for note in faces.notes[:20]:
        console.print(f"  {note}", style="yellow")
    if len(faces.notes) > 20:
        console.print(f"  ... and {len(faces.notes) - 20} more notes", style="yellow")
    console.print(_verification_table(result, record, thresholds))
    if result.probes:
        if len(result.probes) <= PROBE_TABLE_LIMIT:
            console.print(_identification_table(result))
        console.print(_identification_summary(result, thresholds))


def _verification_table(
    result: evaluate.Evaluation,
    record: CalibrationRecord | None,
    thresholds: Sequence[tuple[str, float]],
) -> Table:
    v = result.verification
    pairs = v.pairs
    table = Table(title="verification (pairs of distinct captures)", title_justify="left")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("genuine pairs", f"{len(pairs.genuine):,}")
    table.add_row("impostor pairs", f"{len(pairs.impostor):,}")
    table.add_row("ROC AUC", _fmt(v.auc, 6))
    for point in v.tar_at:
        tar_at = f"cosine {point.cosine:.4f}" if math.isfinite(point.cosine) else "any"
        if record is not None and math.isfinite(point.cosine):
            tar_at += f", similarity {record.calibration.similarity(point.cosine):.1f}"
        table.add_row(
            f"TAR at FAR {point.far:g}",
            f"{_fmt(point.tar, 4)} (one weight per person {_fmt(point.tar_per_person, 4)}; "
            f"threshold {tar_at})",
        )
    if record is None or math.isnan(result.threshold):
        table.add_row("error rates at the match threshold", "n/a (no calibration)")
    else:
        rates = evaluate.error_rates(pairs, record.calibration, [t for _, t in thresholds])
        resampled = evaluate.people_bootstrap(
            result.faces, result.captures, [at.cosine for at in rates]
        )
        for (name, _), at, people in zip(thresholds, rates, resampled, strict=True):
            table.add_row(f"FMR at {at.similarity:g} ({name})", fmr_text(at))
            table.add_row(
                "  FMR 95% resampling people", f"{people.fmr[0]:.3g} to {people.fmr[1]:.3g}"
            )
            table.add_row(f"FNMR at {at.similarity:g} ({name})", fnmr_text(at))
            table.add_row(
                "  FNMR 95% resampling people", f"{people.fnmr[0]:.4f} to {people.fnmr[1]:.4f}"
            )
    for name, scores in (("genuine", pairs.genuine_scores), ("impostor", pairs.impostor)):
        if len(scores):
            values = scores.sorted
            table.add_row(
                f"{name} cosine min / median / max",
                f"{values[0]:.4f} / {values[len(values) // 2]:.4f} / {values[-1]:.4f}",
            )
    return table


def fmr_text(at: ErrorRates) -> str:
    rate, low, high = at.fmr
    return (
        f"{rate:.3g} (95%: {low:.3g} to {high:.3g}; {at.false_matches:,} of "
        f"{at.impostor_pairs:,} impostor pairs)"
    )


def fnmr_text(at: ErrorRates) -> str:
    rate, low, high = at.fnmr
    return (
        f"{rate:.4f} (95%: {low:.4f} to {high:.4f}; {at.false_non_matches:,} of "
        f"{at.genuine_pairs:,} genuine pairs)"
    )


def _identification_table(result: evaluate.Evaluation) -> Table:
    mode = "leave one out" if result.leave_one_out else "probes against the gallery"
    table = Table(title=f"identification, rank 1 ({mode})", title_justify="left")
    for column in ("probe face", "person", "rank 1", "rank-1 gallery face", "cosine"):
        table.add_column(column, justify="right" if column == "cosine" else "left", no_wrap=True)
    table.add_column("similarity", justify="right", no_wrap=True)
    table.add_column("result", no_wrap=True)
    for probe in result.probes:
        best = probe.best
        table.add_row(
            probe.face.name,
            probe.face.label if probe.enrolled else f"{probe.face.label} (not enrolled)",
            best.label if best else "-",
            best.name if best else "-",
            _fmt(probe.cosine, 4),
            _fmt(probe.similarity, 1),
            _outcome(probe, result.threshold),
        )
    return table


def _outcome(probe: evaluate.ProbeResult, threshold: float) -> str:
    accepted = probe.accepted(threshold)
    if not probe.enrolled and math.isnan(threshold):
        return "n/a (no threshold)"
    if not probe.enrolled:
        return "[red]false match[/]" if accepted else "[green]rejected (right)[/]"
    if not probe.rank_one_correct:
        return "[red]wrong person at rank 1[/]"
    if math.isnan(threshold):
        return "[green]right at rank 1[/]"
    return "[green]identified[/]" if accepted else "[yellow]right, below threshold[/]"


def _identification_summary(
    result: evaluate.Evaluation, thresholds: Sequence[tuple[str, float]]
) -> str:
    enrolled, strangers = result.enrolled_probes, result.unenrolled_probes
    hits = sum(p.rank_one_correct for p in enrolled)
    mode = "leave one out" if result.leave_one_out else "probes against the gallery"
    gallery = sum(1 for f in result.faces.faces if f.role is labels.Role.GALLERY)
    lines = [
        f"identification ({mode}, gallery of {gallery:,} faces)",
        f"rank-1 accuracy: {_fmt(result.rank_one_accuracy, 4)} ({hits}/{len(enrolled)})",
    ]
    if not math.isnan(result.threshold):
        for name, threshold in thresholds:
            identified = sum(p.correct(threshold) for p in enrolled)
            rejected = sum(p.correct(threshold) for p in strangers)
            lines.append(
                f"at threshold {threshold:g} ({name}): {identified}/{len(enrolled)} enrolled "
                f"probe faces identified, {rejected}/{len(strangers)} not-enrolled faces "
                "rejected"
            )
    return "\n".join(lines)


def print_quality_cost(console: Console, cost: evaluate.QualityCost, threshold: float) -> None:
    measures = ", ".join(f"{m} {n}" for m, n in cost.by_measure.items()) or "none"
    console.print(
        f"probe quality minimum (gateway.probe_quality): {cost.refused} of {cost.faces} faces "
        f"would be refused as probes ({measures}); TAR at {threshold:g}: {cost.tar:.4f} over "
        f"all genuine pairs, {cost.tar_with_refusals:.4f} counting pairs with a refused face "
        "as not matched"
    )


def print_folds(console: Console, folds: FoldResult, source: str) -> None:
    console.print(
        f"10-fold verification on {source}: {folds.mean * 100:.2f}% "
        f"± {folds.standard_error * 100:.2f} (standard error; {folds.pairs} pairs, "
        f"{folds.unscored_pairs} without a face counted as 'different')"
    )
    console.print("  per fold: " + ", ".join(f"{a * 100:.2f}" for a in folds.accuracies))


def print_calibration(
    console: Console,
    record: CalibrationRecord,
    measurement: calibrate.Measurement,
    summary: dict[str, Any],
) -> None:
    console.print(f"labels: {summary['labels']}")
    console.print(
        f"{summary['faces']:,} faces of {summary['people']:,} people: "
        f"{measurement.genuine_pairs:,} genuine and {measurement.impostor_pairs:,} impostor pairs"
    )
    for key in ("lowest_genuine_pair", "highest_impostor_pair"):
        if summary[key]:
            first, second = summary[key]
            console.print(f"{key.replace('_', ' ')}: {first} and {second}")
    table = Table(
        title=f"calibration {record.model_version}: default threshold "
        f"{record.default_threshold:g}, "
        + ", ".join(f"{k} {v:g}" for k, v in record.purpose_thresholds.items()),
        title_justify="left",
    )
    for column in ("similarity", "cosine", "FMR", "FMR 95% interval", "FNMR", "FNMR 95% interval"):
        table.add_column(column, justify="right")
    for point in record.message.points:
        if point.similarity % 5 and point.similarity not in (99.0,):
            continue
        table.add_row(
            f"{point.similarity:g}",
            f"{point.cosine_similarity:.6f}",
            f"{point.false_match_rate:.3g}",
            f"{point.false_match_rate_lower_bound:.3g} to {point.false_match_rate_upper_bound:.3g}",
            f"{point.false_non_match_rate:.4f}",
            f"{point.false_non_match_rate_lower_bound:.4f} to "
            f"{point.false_non_match_rate_upper_bound:.4f}",
        )
    console.print(table)


def _fmt(value: float, digits: int) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
