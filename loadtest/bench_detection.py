"""Face detection in crowds: facegrid's settings beside face_recognition's detectors.

Run by hand (not part of the test suite), after `make all` and `make bench-venv`:

    .venv/bin/python loadtest/bench_detection.py ../shared/data/crowds \
        --json var/bench_detection.json

facegrid's rows are `facegrid eval-detection` (its own detection service, started here,
at each smallest face size: 80, 40 and 20 pixels). face_recognition's rows run in
.venv-bench on the same files: `face_locations` with the HOG detector at upsample 0, 1
and 2, and the CNN detector (dlib's MMOD, the same network as facegrid's) at upsample 0
and 1 (not 1 on the CompreFace set: minutes a photo on 2 cores). Photos longer than
1,600 pixels are shrunk to that first for face_recognition too, as facegrid's detection
does (`images.detect_max_side`), and boxes scaled back. Both are scored by
facegrid_eval.crowds (IoU >= 0.5 against the boxes, counts, nose points), which
the worker imports alone from this checkout. Time per photo is wall time; facegrid's
includes the gRPC call, face_recognition's its own decode.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))

from facegrid_eval import crowds  # noqa: E402

BENCH_PYTHON = ROOT / ".venv-bench" / "bin" / "python"
FACE_RECOGNITION_SETTINGS = (("hog", 0), ("hog", 1), ("hog", 2), ("cnn", 0), ("cnn", 1))
MAX_SIDE = 1600  # facegrid's images.detect_max_side


def face_recognition_worker(root: Path, settings: list[tuple[str, int]]) -> None:
    """Under .venv-bench: one JSON row per (set, detector, upsample)."""
    import face_recognition  # only in .venv-bench

    rows = []
    import numpy as np
    from PIL import Image, ImageOps

    for name, photos in crowds.datasets(root).items():
        for model, upsample in settings:
            if name == "compreface" and model == "cnn" and upsample > 0:
                continue
            score = crowds.Score()
            for photo in photos:
                started = time.perf_counter()
                picture = ImageOps.exif_transpose(Image.open(photo.path)).convert("RGB")
                scale = max(1.0, max(picture.size) / MAX_SIDE)
                if scale > 1.0:
                    size = (round(picture.width / scale), round(picture.height / scale))
                    picture = picture.resize(size, Image.Resampling.BOX)
                found = face_recognition.face_locations(
                    np.asarray(picture), number_of_times_to_upsample=upsample, model=model
                )
                seconds = time.perf_counter() - started
                boxes = [
                    (
                        (
                            left * scale,
                            top * scale,
                            (right - left) * scale,
                            (bottom - top) * scale,
                        ),
                        1.0,
                    )
                    for top, right, bottom, left in found
                ]
                crowds.add_photo(score, photo, boxes, seconds)
            rows.append(
                score.row(name, f"face_recognition {model}, upsample {upsample}", len(photos))
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps(rows))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("crowds", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--skip-face-recognition", action="store_true")
    parser.add_argument("--face-recognition-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--settings", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.face_recognition_worker:
        settings = [(m, int(u)) for m, u in (s.split(":") for s in args.settings.split(","))]
        face_recognition_worker(args.crowds, settings)
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        ours_file = Path(scratch) / "facegrid.json"
        subprocess.run(
            [
                str(ROOT / ".venv" / "bin" / "facegrid"),
                "eval-detection",
                str(args.crowds),
                "--json",
                str(ours_file),
                "--set",
                "inference.model_repository=model_repository",
            ],
            check=True,
        )
        rows: list[dict[str, Any]] = json.loads(ours_file.read_text())
    if not args.skip_face_recognition:
        worker = subprocess.run(
            [
                str(BENCH_PYTHON),
                __file__,
                str(args.crowds),
                "--face-recognition-worker",
                "--settings",
                ",".join(f"{m}:{u}" for m, u in FACE_RECOGNITION_SETTINGS),
            ],
            check=True,
            stdout=subprocess.PIPE,
            text=True,
        )
        rows += json.loads(worker.stdout.strip().splitlines()[-1])
    rows.sort(key=lambda r: r["dataset"])
    for row in rows:
        boxes = row["ground_truth"] > 0
        found = (
            f"recall {row['recall']:.3f} precision {row['precision']:.3f}"
            if boxes
            else (
                f"counts right {row['counted_right']}/{row['photos']}, noses "
                f"{row['noses_covered']}/{row['noses']}"
            )
        )
        print(
            f"{row['dataset']:18} {row['setting']:34} {found:36} {row['seconds_per_photo']:7.2f} s"
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
