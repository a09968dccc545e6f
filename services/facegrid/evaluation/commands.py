"""``facegrid eval`` and ``facegrid calibrate``: measure the served models on labelled photos.

Both use running services given by ``--detection``/``--embedding``, or start their own
(with the ``--set`` overrides) and stop them afterwards.
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from facegrid.config import add_overrides_argument
from facegrid.evaluation import calibrate, evaluate, labels, report
from facegrid.evaluation.faces import FaceSet, face_client
from facegrid.evaluation.labels import LabelError, LabelSet
from facegrid.similarity import CalibrationRecord, load_calibration

DEFAULT_FAR = 0.01


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add this package's sub-commands to the `facegrid` command."""
    run = commands.add_parser(
        "eval",
        help="verification and identification figures on a folder of labelled photos",
        description="Verification (ROC AUC, accuracy at the match threshold, TAR at a FAR) "
        "and identification (rank-1 of each probe face against the gallery) on labelled "
        "photos. Labels: --labels, else FOLDER/labels.toml, else seeds/eval/<folder "
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
        "--far", type=float, default=DEFAULT_FAR, help="FAR for TAR@FAR (default 0.01)"
    )
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
        "and write the calibration table (see facegrid.similarity for its design).",
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


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--labels", type=Path, help="TOML label manifest (see seeds/eval/)")
    parser.add_argument("--detection", metavar="ADDR", help="running detection service")
    parser.add_argument("--embedding", metavar="ADDR", help="running embedding service")
    parser.add_argument(
        "--upsample",
        type=int,
        default=0,
        choices=[0, 1, 2],
        help="detector upsampling where the labels do not set it (default 0)",
    )
    add_overrides_argument(
        parser, "setting for services started here, e.g. inference.model_repository=PATH"
    )


def _console() -> Console:
    return Console(width=None if sys.stdout.isatty() else 200)


def embed_labelled(args: argparse.Namespace, folder: Path) -> tuple[LabelSet, FaceSet]:
    label_set = labels.discover(folder, args.labels)
    with face_client(args.detection, args.embedding, list(args.overrides)) as client:
        return label_set, client.embed_set(label_set, args.upsample)


# ------------------------------------------------------------------------ eval


def eval_command(args: argparse.Namespace) -> int:
    console = _console()
    try:
        label_set, faces = embed_labelled(args, args.folder)
        record = (
            CalibrationRecord.from_json(args.calibration.read_text(encoding="utf-8"))
            if args.calibration
            else load_calibration(faces.embedding_version)
        )
    except (LabelError, RuntimeError, OSError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    calibration = record.calibration if record is not None else None
    threshold = args.threshold if args.threshold is not None else math.nan
    if record is not None and args.threshold is None:
        threshold = record.default_threshold
    result = evaluate.evaluate(faces, calibration, threshold, args.far)
    report.print_evaluation(console, label_set, result, record)
    if args.strict:
        wrong = [p for p in result.probes if not p.correct(threshold)]
        return 1 if wrong or not result.probes else 0
    return 0


# ------------------------------------------------------------------- calibrate


def calibrate_command(args: argparse.Namespace) -> int:
    console = _console()
    command = f"facegrid calibrate --faces {args.faces}"
    if args.labels is not None:
        command += f" --labels {args.labels}"
    if args.upsample:
        command += f" --upsample {args.upsample}"
    if args.out is not None:
        command += f" --out {args.out}"
    try:
        label_set, faces = embed_labelled(args, args.faces)
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
