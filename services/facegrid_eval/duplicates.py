"""Faces that come from one capture: never a genuine pair, counted once.

Test photo sets hold copies: the same file twice, one photo at several resolutions,
crops of it, an RGBA re-encoding. Pairing such copies as "two photos of one person"
would report near-1 cosines that say nothing about recognising a person, and counting
each copy against every stranger would weigh one photo several times. So faces are
grouped into captures, and each capture is represented by its first face.

Faces join one capture when the labels say so (the same ``source``), when they come from
byte-identical files at the same box, or when their embeddings have a cosine of at
least 0.999 (measured here: the same photo at 240p-1080p gave 0.997-0.9995, crops of it
0.98, two different photos of one person at most 0.97, so resized and cropped copies
must be labelled with a ``source``; 0.999 only catches copies nobody labelled).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from facegrid_eval.faces import Face
from facegrid_eval.labels import LabelError

SAME_CAPTURE_COSINE = 0.999
BLOCK_ROWS = 1024


@dataclass(frozen=True)
class Captures:
    ids: NDArray[np.intp]  # capture of each face, numbered by first appearance
    representatives: NDArray[np.intp]  # first face of each capture, in order

    @property
    def count(self) -> int:
        return len(self.representatives)

    def members(self) -> list[list[int]]:
        groups: list[list[int]] = [[] for _ in range(self.count)]
        for face, capture in enumerate(self.ids):
            groups[int(capture)].append(face)
        return groups


def group_captures(faces: Sequence[Face], embeddings: NDArray[np.float64]) -> Captures:
    """Group faces into captures; raise LabelError when one capture has two labels."""
    parent = list(range(len(faces)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        a, b = find(i), find(j)
        if a != b:
            parent[max(a, b)] = min(a, b)

    first_of: dict[tuple[str, ...], int] = {}
    for i, face in enumerate(faces):
        for key in (("source", face.source), ("file", face.file_sha256, str(face.box))):
            union(i, first_of.setdefault(key, i))
    vectors = np.asarray(embeddings, np.float32)
    for start in range(0, len(faces), BLOCK_ROWS):  # blocks: memory stays bounded
        block = vectors[start : start + BLOCK_ROWS] @ vectors.T
        rows, cols = np.nonzero(block >= SAME_CAPTURE_COSINE)
        for row, col in zip(rows + start, cols, strict=True):
            if col > row:
                union(int(row), int(col))
    roots = [find(i) for i in range(len(faces))]
    numbering: dict[int, int] = {}
    ids = np.array([numbering.setdefault(r, len(numbering)) for r in roots], np.intp)
    representatives = np.array(sorted(numbering), np.intp)
    captures = Captures(ids, representatives)
    for members in captures.members():
        labels = {faces[m].label for m in members}
        if len(labels) > 1:
            names = ", ".join(f"{faces[m].name} ({faces[m].label})" for m in members)
            raise LabelError(f"one capture carries different labels: {names}")
    return captures
