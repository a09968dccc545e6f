"""``facegrid eval``, ``facegrid calibrate`` and ``facegrid eval-detection``.

They use running services given by ``--detection``/``--embedding``, or start their own
(with the ``--set`` overrides) and stop them afterwards.
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
from pathlib import Path
from typing import Any

from facegrid.config import add_overrides_argument, load_settings
from facegrid.similarity import CalibrationRecord, load_calibration
from rich.console import Console

from facegrid_eval import calibrate, det, detection_eval, evaluate, labels, protocol, report
from facegrid_eval.faces import DEFAULT_CACHE_DIR, FaceSet, face_client
from facegrid_eval.labels import LabelError, LabelSet

DEFAULT_FARS = (1e-3, 1e-4, 1e-5)


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add this package's sub-commands to the `facegrid` command."""
    run = commands.add_parser(
        "eval",
        help="verification and identification figures on a folder of labelled photos",
        description="Verification (ROC AUC, TAR at FARs, FMR and FNMR with 95%% intervals at "
        "the default thresholds, a DET curve) and identification (rank-1 and open-set, "
        "each probe face against the gallery) on labelled photos, and with --pairs LFW's "
        "10-fold protocol. Labels: --labels, else FOLDER/labels.toml, else seeds/eval/<folder "
        "name>.toml, else FOLDER's train/<person>/ (gallery) and test/<person>/ (probes), "
        "else FOLDER/<person>/ (each face searched against the others).",
    )
    run.add_argument("folder", type=Path, help="folder of labelled photos")
    _common_arguments(run)
    run.add_argument(
        "--calibration", type=Path, help="calibration JSON (default: the committed one)"
    )
    run.add_argument(
        "--threshold", type=float, help="match threshold, 0-100 (default: the calibration's)"
    )
    run.add_argument(
        "--far",
        type=float,
        action="append",
        help="FAR for TAR@FAR, repeatable (default: 1e-3, 1e-4 and 1e-5)",
    )
    run.add_argument(
        "--pairs",
        type=Path,
        help="a pairs file in LFW's pairs.txt format: run the 10-fold protocol on it",
    )
    run.add_argument(
        "--det",
        type=Path,
        help="where to write the DET curve (PNG; default var/eval/det-<folder>.png)",
    )
    run.add_argument("--no-det", action="store_true", help="do not draw the DET curve")
    run.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 unless every probe face is right: its person at rank 1 and at the "
        "threshold, or, for a person not in the gallery, no match at the threshold",
    )
    run.set_defaults(handler=eval_command)

    cal = commands.add_parser(
        "calibrate",
        help="measure the cosine -> similarity calibration on labelled photos",
        description="Measure genuine and impostor cosine similarities on labelled photos "
        "and write the calibration table: similarity anchored on measured false match "
        "rates, with FMR and FNMR and their 95%% intervals at every whole similarity (see "
        "facegrid.similarity for its design).",
    )
    cal.add_argument("--faces", type=Path, required=True, help="folder of labelled photos")
    _common_arguments(cal)
    cal.add_argument("--out", type=Path, help="JSON file to write (default: print it)")
    cal.add_argument(
        "--date",
        default=datetime.date.today().isoformat(),
        help="measurement date for the description (default: today)",
    )
    cal.set_defaults(handler=calibrate_command)
    detection_eval.register(commands, lambda parser: _service_arguments(parser, False))


def _service_arguments(parser: argparse.ArgumentParser, embedding: bool = True) -> None:
    parser.add_argument("--detection", metavar="ADDR", help="running detection service")
    if embedding:
        parser.add_argument("--embedding", metavar="ADDR", help="running embedding service")
    add_overrides_argument(
        parser, "setting for services started here, e.g. inference.model_repository=PATH"
    )


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--labels", type=Path, help="TOML label manifest (see seeds/eval/)")
    parser.add_argument(
        "--upsample",
        type=int,
        default=0,
        choices=[0, 1, 2],
        help="detector upsampling where the labels do not set it (default 0)",
    )
    parser.add_argument(
        "--face",
        choices=("central", "largest"),
        default="central",
        help="which face of a <person>/ folder photo is the labelled one: the one nearest "
        "the centre (the default; LFW's convention: its photos are centred on the labelled "
        "person) or the largest (as SearchFacesByImage picks its probe; in 102 of lfw-dev's "
        "6,922 photos that is a bystander)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=DEFAULT_CACHE_DIR,
        help=f"folder of the embedding cache (default {DEFAULT_CACHE_DIR})",
    )
    parser.add_argument(
        "--no-cache", action="store_true", help="measure every photo again; keep nothing"
    )
    _service_arguments(parser)


def _console() -> Console:
    return Console(width=None if sys.stdout.isatty() else 200)


def embed_labelled(args: argparse.Namespace, folder: Path) -> tuple[LabelSet, FaceSet]:
    label_set = labels.discover(folder, args.labels)
    cache = None if args.no_cache else args.cache
    with face_client(args.detection, args.embedding, list(args.overrides)) as client:
        return label_set, client.embed_set(
            label_set, args.upsample, cache_dir=cache, central=args.face == "central"
        )


# ------------------------------------------------------------------------ eval


def eval_command(args: argparse.Namespace) -> int:
    console = _console()
    try:
        pairs = protocol.read_pairs(args.pairs) if args.pairs is not None else None
        label_set, faces = embed_labelled(args, args.folder)
        record = (
            CalibrationRecord.from_json(args.calibration.read_text(encoding="utf-8"))
            if args.calibration
            else load_calibration(faces.embedding_version)
        )
    except (LabelError, RuntimeError, OSError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    calibration = record.calibration if record is not None else None
    threshold = args.threshold if args.threshold is not None else math.nan
    if record is not None and args.threshold is None:
        threshold = record.default_threshold
    thresholds = _reported_thresholds(record, threshold)
    result = evaluate.evaluate(faces, calibration, threshold, args.far or DEFAULT_FARS)
    report.print_evaluation(console, label_set, result, record, thresholds)
    if calibration is not None and not math.isnan(threshold):
        level = load_settings(list(args.overrides)).gateway.probe_quality
        cost = evaluate.quality_cost(
            faces, result.verification.pairs, calibration.cosine_at(threshold), level
        )
        report.print_quality_cost(console, cost, threshold)
    if pairs is not None:
        report.print_folds(console, protocol.ten_fold(faces, pairs), str(args.pairs))
    if not args.no_det and len(result.verification.pairs.impostor):
        path = args.det or Path("var/eval") / f"det-{args.folder.resolve().name}.png"
        try:
            det.write_det(
                path,
                result.verification.pairs,
                calibration,
                [t for _, t in thresholds],
                f"DET: {args.folder.name}, {faces.embedding_version}",
            )
        except RuntimeError as exc:
            console.print(f"[yellow]no DET curve:[/yellow] {exc}")
        else:
            console.print(f"DET curve written to {path}")
    if args.strict:
        wrong = [p for p in result.probes if not p.correct(threshold)]
        return 1 if wrong or not result.probes else 0
    return 0


def _reported_thresholds(
    record: CalibrationRecord | None, threshold: float
) -> list[tuple[str, float]]:
    """The threshold used, and the calibration's defaults beside it."""
    if math.isnan(threshold):
        return []
    named = [
        (
            "this run" if record is None or threshold != record.default_threshold else "default",
            threshold,
        )
    ]
    if record is not None:
        if threshold != record.default_threshold:
            named.append(("default", record.default_threshold))
        for purpose, value in record.purpose_thresholds.items():
            name = purpose.removeprefix("PURPOSE_").lower().replace("_", " ") + " default"
            named.append((name, value))
    return named


# ------------------------------------------------------------------- calibrate


def calibrate_command(args: argparse.Namespace) -> int:
    console = _console()
    command = f"facegrid calibrate --faces {args.faces}"
    if args.labels is not None:
        command += f" --labels {args.labels}"
    if args.upsample:
        command += f" --upsample {args.upsample}"
    command += f" --face {args.face}"
    command += "".join(f" --set {o}" for o in args.overrides if not o.startswith("inference."))
    if args.out is not None:
        command += f" --out {args.out}"
    try:
        label_set, faces = embed_labelled(args, args.faces)
        with Console(stderr=True).status(
            "measuring the scale: false match rates and their intervals, resampling people "
            "1,000 times (about 2 minutes for lfw-dev)"
        ):
            record, measurement, summary = calibrate.calibrate_faces(
                label_set, faces, str(args.faces), args.date, command
            )
    except (LabelError, RuntimeError, OSError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    report.print_calibration(console, record, measurement, summary)
    text = record.to_json(summary)
    if args.out is None:
        print(text, end="")
    else:
        args.out.write_text(text, encoding="utf-8")
        console.print(f"written to {args.out}")
    return 0
