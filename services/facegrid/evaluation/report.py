"""Rich tables of ``facegrid eval`` and ``facegrid calibrate`` results."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from facegrid.evaluation import calibrate, evaluate, labels
from facegrid.evaluation.labels import LabelSet
from facegrid.similarity import CalibrationRecord


def print_evaluation(
    console: Console,
    label_set: LabelSet,
    result: evaluate.Evaluation,
    record: CalibrationRecord | None,
) -> None:
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
    for group in result.captures.members():
        if len(group) > 1:
            names = ", ".join(faces.faces[i].name for i in group)
            console.print(f"  one capture, counted once: {names}", style="dim")
    for note in faces.notes:
        console.print(f"  {note}", style="yellow")
    console.print(_verification_table(result, record))
    if result.probes:
        console.print(_identification_table(result))
        console.print(_identification_summary(result))


def _verification_table(result: evaluate.Evaluation, record: CalibrationRecord | None) -> Table:
    v = result.verification
    table = Table(title="verification (pairs of distinct captures)", title_justify="left")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("genuine pairs", str(len(v.genuine)))
    table.add_row("impostor pairs", str(len(v.impostor)))
    table.add_row("ROC AUC", _fmt(v.auc, 4))
    accuracy = "n/a"
    if not math.isnan(v.accuracy):
        accuracy = (
            f"{v.accuracy:.4f} ({v.false_matches} false matches, "
            f"{v.false_non_matches} false non-matches)"
        )
    if math.isnan(result.threshold):
        table.add_row("accuracy at the match threshold", "n/a (no calibration)")
    else:
        table.add_row(f"accuracy at threshold {result.threshold:g}", accuracy)
    tar_at = f"cosine {v.tar_threshold:.4f}" if math.isfinite(v.tar_threshold) else "any"
    if record is not None and math.isfinite(v.tar_threshold):
        tar_at += f", similarity {record.calibration.similarity(v.tar_threshold):.1f}"
    table.add_row(f"TAR at FAR {v.far:g}", f"{_fmt(v.tar, 4)} (threshold {tar_at})")
    for name, values in (("genuine", v.genuine), ("impostor", v.impostor)):
        if len(values):
            table.add_row(
                f"{name} cosine min / median / max",
                f"{values.min():.4f} / {float(np.median(values)):.4f} / {values.max():.4f}",
            )
    return table


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


def _identification_summary(result: evaluate.Evaluation) -> str:
    enrolled, strangers = result.enrolled_probes, result.unenrolled_probes
    hits = sum(p.rank_one_correct for p in enrolled)
    lines = [f"rank-1 accuracy: {_fmt(result.rank_one_accuracy, 4)} ({hits}/{len(enrolled)})"]
    if not math.isnan(result.threshold):
        identified = sum(p.correct(result.threshold) for p in enrolled)
        rejected = sum(p.correct(result.threshold) for p in strangers)
        lines.append(
            f"at threshold {result.threshold:g}: {identified}/{len(enrolled)} enrolled probe "
            f"faces identified, {rejected}/{len(strangers)} not-enrolled faces rejected"
        )
    return "\n".join(lines)


def print_calibration(
    console: Console,
    record: CalibrationRecord,
    measurement: calibrate.Measurement,
    summary: dict[str, Any],
) -> None:
    console.print(f"labels: {summary['labels']}")
    stats = Table(title="cosine similarity of pairs", title_justify="left")
    for column in ("pairs", "count", "min", "median", "max"):
        stats.add_column(column, justify="left" if column == "pairs" else "right")
    for name, s in (("genuine", measurement.genuine), ("impostor", measurement.impostor)):
        stats.add_row(name, str(s.count), f"{s.minimum:.4f}", f"{s.median:.4f}", f"{s.maximum:.4f}")
    console.print(stats)
    for key in ("lowest_genuine_pair", "highest_impostor_pair"):
        first, second = summary[key]
        console.print(f"{key.replace('_', ' ')}: {first} and {second}")
    gap = "midway between the highest impostor and the lowest genuine above it"
    if not measurement.separable:
        gap = "[yellow]no genuine pair above every impostor: just above the highest impostor[/]"
    console.print(f"t0 = {measurement.t0:.6f} ({gap}) -> similarity {record.default_threshold:g}")
    table = Table(
        title=f"calibration {record.model_version} (default threshold "
        f"{record.default_threshold:g})",
        title_justify="left",
    )
    for column in ("anchor", "cosine", "similarity", "false match rate", "false non-match rate"):
        table.add_column(column, justify="left" if column == "anchor" else "right")
    for anchor, point in zip(measurement.anchors, record.message.points, strict=True):
        table.add_row(
            anchor.name,
            f"{point.cosine_similarity:.6f}",
            f"{point.similarity:g}",
            f"{point.false_match_rate:.4f}",
            f"{point.false_non_match_rate:.4f}",
        )
    console.print(table)


def _fmt(value: float, digits: int) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
