"""How to score a subject with several faces: its best face, or something else?

Run by hand (not part of the test suite), after `make all`:

    .venv/bin/python loadtest/bench_subject_rules.py ../shared/data/lfw-dev

SearchSubjectsByImage ranks each subject by its most similar face ("best face"). This
measures that rule against three others on a labelled folder of people (LFW's half in
../shared/data/lfw-dev), with the services started here and the embedding cache of
`facegrid eval` (var/eval-cache):

* every person with at least 3 photos gives one probe (their first photo); their other
  photos form their own subject (the genuine score);
* every other person with at least 2 photos is a subject too (impostor scores);
* rules: best face (max cosine), mean cosine, the cosine to the subject's centroid (the
  normalised mean embedding), and the mean of the two best cosines.

A rule is better when it accepts more genuine probe-subject pairs at the same false
match rate over probe-subject pairs (TAR at FMR 1e-3 and 1e-4). Prints a table and
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services"))

from facegrid_eval import labels, metrics
from facegrid_eval.faces import DEFAULT_CACHE_DIR, face_client

Rule = Callable[[NDArray[np.float64], NDArray[np.float64]], float]


def best_face(probe: NDArray[np.float64], faces: NDArray[np.float64]) -> float:
    return float((faces @ probe).max())


def mean_cosine(probe: NDArray[np.float64], faces: NDArray[np.float64]) -> float:
    return float((faces @ probe).mean())


def centroid(probe: NDArray[np.float64], faces: NDArray[np.float64]) -> float:
    mean = faces.mean(axis=0)
    return float(mean @ probe / np.linalg.norm(mean))


def top_two(probe: NDArray[np.float64], faces: NDArray[np.float64]) -> float:
    scores = np.sort(faces @ probe)[::-1]
    return float(scores[:2].mean())


RULES: dict[str, Rule] = {
    "best face (today)": best_face,
    "mean cosine": mean_cosine,
    "centroid": centroid,
    "mean of the best two": top_two,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--face", choices=("largest", "central"), default="central")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    label_set = labels.discover(args.folder)
    overrides = args.overrides or ["inference.model_repository=model_repository"]
    with face_client(None, None, overrides) as client:
        faces = client.embed_set(
            label_set, cache_dir=DEFAULT_CACHE_DIR, central=args.face == "central"
        )
    by_person: dict[str, list[int]] = defaultdict(list)
    for index, face in enumerate(faces.faces):
        by_person[face.label].append(index)
    subjects = {p: idx for p, idx in by_person.items() if len(idx) >= 2}
    probes = {p: idx[0] for p, idx in by_person.items() if len(idx) >= 3}
    vectors = faces.embeddings
    results = {}
    for name, rule in RULES.items():
        genuine, impostor = [], []
        for person, probe_index in probes.items():
            probe = vectors[probe_index]
            for subject, members in subjects.items():
                rest = [m for m in members if m != probe_index]
                score = rule(probe, vectors[rest])
                (genuine if subject == person else impostor).append(score)
        row = {"genuine": len(genuine), "impostor": len(impostor)}
        for far in (1e-3, 1e-4):
            tar, _ = metrics.tar_at_far(genuine, impostor, far)
            row[f"tar_at_{far:g}"] = tar
        row["auc"] = metrics.roc_auc(genuine, impostor)
        results[name] = row
    print(f"{len(probes)} probes, {len(subjects)} subjects ({args.folder}, face {args.face})")
    print(f"{'rule':24} {'TAR@1e-3':>9} {'TAR@1e-4':>9} {'ROC AUC':>9}")
    for name, row in results.items():
        print(f"{name:24} {row['tar_at_0.001']:9.4f} {row['tar_at_0.0001']:9.4f} {row['auc']:9.5f}")
    print(json.dumps({"probes": len(probes), "subjects": len(subjects), "rules": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
