"""LFW's 10-fold protocol: facegrid beside the face_recognition library, on the same photos.

Run by hand (not part of the test suite), after `make all` and `make bench-venv`:

    .venv/bin/python loadtest/bench_lfw_pairs.py ../shared/data/lfw-dev \
        --pairs ../shared/data/lfw-dev/pairs-dev.txt --json var/bench_lfw_pairs.json

facegrid's figure comes from its own services (started here, with the embedding cache
of `facegrid eval`), exactly as `facegrid eval --pairs` computes it. face_recognition
(1.3.0, in .venv-bench) runs its own pipeline on the same photo files: its HOG detector
with one upsampling (its default), `face_encodings` (5-point landmarks, no jitter),
and Euclidean distances between raw descriptors. Both pick, in each photo, the face
nearest the centre (LFW's labels; --face largest for the largest face), both count a
photo without a face as "different", and both use facegrid_eval.protocol for the
folds and thresholds (the worker imports only that module, numpy and the standard
library from this checkout).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))

from facegrid_eval import protocol  # noqa: E402

BENCH_PYTHON = ROOT / ".venv-bench" / "bin" / "python"


def _rank(box: tuple[int, int, int, int], shape: tuple[int, ...], face: str) -> float:
    """Sort key of a (top, right, bottom, left) box: off-centre distance, or -area."""
    top, right, bottom, left = box
    if face == "largest":
        return -float((bottom - top) * (right - left))
    x = (left + right) / 2 / shape[1] - 0.5
    y = (top + bottom) / 2 / shape[0] - 0.5
    return x * x + y * y


def face_recognition_worker(folder: Path, pairs_file: Path, face: str, model: str) -> None:
    """Under .venv-bench: face_recognition's 10-fold figure on the same pairs (JSON)."""
    import face_recognition  # only in .venv-bench

    pairs = protocol.read_pairs(pairs_file)
    photos = sorted({p for pair in pairs for p in (pair.first, pair.second)})
    encodings: dict[str, np.ndarray] = {}
    started = time.perf_counter()
    for name in photos:
        path = folder / name
        if not path.is_file():
            continue
        image = face_recognition.load_image_file(str(path))
        found = face_recognition.face_locations(image, number_of_times_to_upsample=1, model=model)
        if not found:
            continue
        chosen = min(found, key=lambda box: _rank(box, image.shape, face))
        encodings[name] = face_recognition.face_encodings(image, [chosen])[0]
    seconds = time.perf_counter() - started
    scores = np.full(len(pairs), -np.inf)
    unscored = 0
    for k, pair in enumerate(pairs):
        if pair.first in encodings and pair.second in encodings:
            scores[k] = -float(np.linalg.norm(encodings[pair.first] - encodings[pair.second]))
        else:
            unscored += 1
    folds = protocol.ten_fold_of(scores, pairs, unscored)
    print(
        json.dumps(
            {
                "photos": len(photos),
                "photos_with_a_face": len(encodings),
                "seconds": seconds,
                "folds": list(folds.accuracies),
                "mean": folds.mean,
                "standard_error": folds.standard_error,
                "unscored_pairs": folds.unscored_pairs,
            }
        )
    )


def facegrid_figure(folder: Path, pairs_file: Path, face: str) -> dict[str, Any]:
    from facegrid_eval import labels
    from facegrid_eval.faces import DEFAULT_CACHE_DIR, face_client

    pairs = protocol.read_pairs(pairs_file)
    label_set = labels.discover(folder)
    started = time.perf_counter()
    with face_client(None, None, ["inference.model_repository=model_repository"]) as client:
        faces = client.embed_set(label_set, cache_dir=DEFAULT_CACHE_DIR, central=face == "central")
    folds = protocol.ten_fold(faces, pairs)
    return {
        "model_version": faces.embedding_version,
        "seconds_with_cache": time.perf_counter() - started,
        "folds": list(folds.accuracies),
        "mean": folds.mean,
        "standard_error": folds.standard_error,
        "unscored_pairs": folds.unscored_pairs,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--pairs", type=Path, required=True)
    parser.add_argument("--face", choices=("central", "largest"), default="central")
    parser.add_argument("--model", choices=("hog", "cnn"), default="hog")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--face-recognition-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.face_recognition_worker:
        face_recognition_worker(args.folder, args.pairs, args.face, args.model)
        return 0
    ours = facegrid_figure(args.folder, args.pairs, args.face)
    worker = subprocess.run(
        [
            str(BENCH_PYTHON),
            __file__,
            str(args.folder),
            "--pairs",
            str(args.pairs),
            "--face",
            args.face,
            "--model",
            args.model,
            "--face-recognition-worker",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    theirs = json.loads(worker.stdout.strip().splitlines()[-1])
    for name, figure in (
        (f"facegrid ({ours['model_version']})", ours),
        (f"face_recognition ({args.model}, upsample 1)", theirs),
    ):
        print(
            f"{name:40} {figure['mean'] * 100:6.2f}% ± {figure['standard_error'] * 100:.2f} "
            f"({figure['unscored_pairs']} pairs without a face)"
        )
    result = {"face": args.face, "facegrid": ours, "face_recognition": theirs}
    print(json.dumps(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
