"""``facegrid eval-detection``: recall, precision and time of the served face detector.

Every annotated photo of ../shared/data/crowds (see :mod:`facegrid_eval.crowds`)
goes through DetectionService.DetectFaces once per setting of the smallest face size
(80 pixels, the detector's own; 40 and 20, by enlarging the image 2 and 4 times), and
each setting reports recall and precision at IoU >= 0.5 against the ground-truth
boxes, face counts and nose points, and the time per photo as the caller sees it.
face_recognition's HOG and CNN detectors on the same photos are measured by
loadtest/bench_detection.py, in their own environment, with the same scoring code.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from facegrid import tls
from facegrid.config import load_settings
from facegrid.internal.v1 import detection_pb2, detection_pb2_grpc
from rich.console import Console
from rich.table import Table

from facegrid_eval import crowds
from facegrid_eval.faces import DEADLINE_S, service_addresses

DEFAULT_CROWDS = Path("../shared/data/crowds")
DEFAULT_SIZES = (80, 40, 20)


def register(
    commands: argparse._SubParsersAction[Any],
    service_arguments: Callable[[argparse.ArgumentParser], None],
) -> None:
    parser = commands.add_parser(
        "eval-detection",
        help="face detection recall, precision and time on annotated crowd photos",
        description="Detect faces in the annotated photos of a crowds folder (dlib's "
        "testing.xml, WIDER FACE boxes, CompreFace's counted group photos) at each "
        "smallest face size, and report recall and precision at IoU >= 0.5, face counts "
        "and the time per photo.",
    )
    parser.add_argument(
        "crowds",
        type=Path,
        nargs="?",
        default=DEFAULT_CROWDS,
        help=f"the crowds folder (default {DEFAULT_CROWDS})",
    )
    parser.add_argument(
        "--min-face-size",
        type=int,
        action="append",
        help="smallest face size to look for, repeatable (default: 80, 40 and 20)",
    )
    parser.add_argument(
        "--only",
        dest="sets",
        action="append",
        choices=crowds.SETS,
        help="only this annotated set, repeatable (default: all of them)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    service_arguments(parser)
    parser.set_defaults(handler=eval_detection_command)


def measure(
    address: str, sets: dict[str, list[crowds.AnnotatedPhoto]], sizes: list[int]
) -> list[dict[str, Any]]:
    """One row per (set, size): the scores, as plain values."""
    rows = []
    options = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
    with tls.channel(address, load_settings().tls, options) as channel:
        stub = detection_pb2_grpc.DetectionServiceStub(channel)
        for name, photos in sets.items():
            for size in sizes:
                score = crowds.Score()
                for photo in photos:
                    started = time.perf_counter()
                    reply = stub.DetectFaces(
                        detection_pb2.DetectFacesRequest(
                            image=photo.path.read_bytes(), min_face_size=size
                        ),
                        timeout=DEADLINE_S,
                    )
                    seconds = time.perf_counter() - started
                    found = [
                        (
                            (
                                float(f.bounding_box.left),
                                float(f.bounding_box.top),
                                float(f.bounding_box.width),
                                float(f.bounding_box.height),
                            ),
                            float(f.confidence),
                        )
                        for f in reply.faces
                    ]
                    crowds.add_photo(score, photo, found, seconds)
                rows.append(score.row(name, f"facegrid, faces >= {size} px", len(photos)))
    return rows


def print_rows(console: Console, rows: list[dict[str, Any]]) -> None:
    table = Table(title="face detection (IoU >= 0.5)", title_justify="left")
    for column in ("set", "detector", "recall", "precision", "counts right", "noses", "s/photo"):
        table.add_column(column, justify="left" if column in ("set", "detector") else "right")
    for row in rows:
        boxes = row["ground_truth"] > 0
        table.add_row(
            row["dataset"],
            row["setting"],
            f"{row['recall']:.3f} ({row['true_positives']}/{row['ground_truth']})"
            if boxes
            else "-",
            (
                f"{row['precision']:.3f} ({row['true_positives']}/"
                f"{row['true_positives'] + row['false_positives']})"
            )
            if boxes and not math.isnan(row["precision"])
            else "-",
            f"{row['counted_right']}/{row['photos']}" if not boxes else "-",
            f"{row['noses_covered']}/{row['noses']}" if row["noses"] else "-",
            f"{row['seconds_per_photo']:.2f}",
        )
    console.print(table)


def eval_detection_command(args: argparse.Namespace) -> int:
    console = Console(width=None if sys.stdout.isatty() else 200)
    sets = crowds.datasets(args.crowds, tuple(args.sets or crowds.SETS))
    if not sets:
        console.print(f"[red]error:[/red] no annotated photos under {args.crowds}")
        return 2
    sizes = args.min_face_size or list(DEFAULT_SIZES)
    try:
        with service_addresses({"detection": args.detection}, list(args.overrides)) as found:
            rows = measure(found["detection"], sets, sizes)
    except (RuntimeError, grpc.RpcError, OSError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    print_rows(console, rows)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0
