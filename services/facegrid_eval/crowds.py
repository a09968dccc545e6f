"""Face-detection ground truth and its scoring: boxes matched at IoU >= 0.5.

Three kinds of annotated photos (see ../shared/data/MANIFEST.md):

* dlib's imglab XML (``crowds/dlib/testing.xml``): ``<image file=...>`` with ``<box
  top left width height>`` per face; boxes marked ``ignore='1'`` are neither required
  nor counted as false detections;
* WIDER FACE boxes (``crowds/wider/boxes.txt``): ``# file`` then ``x y w h`` per face;
* CompreFace's sample photos (``crowds/compreface``): the face count is in the file name
  (``NNN_K.jpg``, a letter for one face) and ``annotations.py`` lists a nose point per
  face, read here with :mod:`ast` (the file is not imported).

Only the standard library and numpy are used, so that the face_recognition comparison
(loadtest/bench_detection.py, in its own environment) scores with this same code.
"""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

Box = tuple[float, float, float, float]  # left, top, width, height
IOU_MATCH = 0.5


@dataclass(frozen=True)
class AnnotatedPhoto:
    path: Path
    boxes: tuple[Box, ...] = ()  # ground truth; empty where only counts are known
    ignored: tuple[Box, ...] = ()  # detections here count neither way
    face_count: int | None = None  # where the annotation gives a count
    noses: tuple[tuple[float, float], ...] = ()


@dataclass
class Score:
    """Matches of detections to ground-truth boxes over a set of photos."""

    true_positives: int = 0
    false_positives: int = 0
    ground_truth: int = 0
    seconds: list[float] = field(default_factory=list)
    counted_right: int = 0  # photos whose face count is right (count-only sets)
    noses_covered: int = 0
    noses: int = 0

    @property
    def recall(self) -> float:
        return self.true_positives / self.ground_truth if self.ground_truth else float("nan")

    @property
    def precision(self) -> float:
        found = self.true_positives + self.false_positives
        return self.true_positives / found if found else float("nan")

    @property
    def seconds_per_photo(self) -> float:
        return sum(self.seconds) / len(self.seconds) if self.seconds else float("nan")

    def row(self, dataset: str, setting: str, photos: int) -> dict[str, object]:
        """The figures as one JSON-able row (what eval-detection --json writes)."""
        return {
            "dataset": dataset,
            "setting": setting,
            "photos": photos,
            "ground_truth": self.ground_truth,
            "true_positives": self.true_positives,
            "false_positives": self.false_positives,
            "recall": self.recall,
            "precision": self.precision,
            "counted_right": self.counted_right,
            "noses": self.noses,
            "noses_covered": self.noses_covered,
            "seconds_per_photo": self.seconds_per_photo,
        }


def iou(a: Box, b: Box) -> float:
    width = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    height = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def match(
    detections: list[tuple[Box, float]], truth: tuple[Box, ...], ignored: tuple[Box, ...] = ()
) -> tuple[int, int]:
    """(true positives, false positives): detections, most confident first, each take the
    unmatched truth box they overlap most if the IoU is at least 0.5; one that matches
    nothing but an ignored box is not counted."""
    used: set[int] = set()
    true_pos = false_pos = 0
    for box, _ in sorted(detections, key=lambda d: -d[1]):
        best, best_iou = -1, IOU_MATCH
        for i, other in enumerate(truth):
            overlap = iou(box, other)
            if i not in used and overlap >= best_iou:
                best, best_iou = i, overlap
        if best >= 0:
            used.add(best)
            true_pos += 1
        elif not any(iou(box, other) >= IOU_MATCH for other in ignored):
            false_pos += 1
    return true_pos, false_pos


def add_photo(
    score: Score, photo: AnnotatedPhoto, detections: list[tuple[Box, float]], seconds: float
) -> None:
    """Score one photo's detections (box, confidence) into ``score``."""
    score.seconds.append(seconds)
    if photo.boxes:
        true_pos, false_pos = match(detections, photo.boxes, photo.ignored)
        score.true_positives += true_pos
        score.false_positives += false_pos
        score.ground_truth += len(photo.boxes)
    if photo.face_count is not None:
        score.counted_right += int(len(detections) == photo.face_count)
    for x, y in photo.noses:
        score.noses += 1
        score.noses_covered += int(
            any(b[0] <= x <= b[0] + b[2] and b[1] <= y <= b[1] + b[3] for b, _ in detections)
        )


def dlib_xml(path: Path) -> list[AnnotatedPhoto]:
    photos = []
    for image in ElementTree.parse(path).getroot().iter("image"):
        boxes: list[Box] = []
        ignored: list[Box] = []
        for element in image.iter("box"):
            left, top, width, height = (
                float(element.get(k, "0")) for k in ("left", "top", "width", "height")
            )
            box = (left, top, width, height)
            (ignored if element.get("ignore") == "1" else boxes).append(box)
        photos.append(
            AnnotatedPhoto(path.parent / str(image.get("file")), tuple(boxes), tuple(ignored))
        )
    return photos


def wider_boxes(path: Path) -> list[AnnotatedPhoto]:
    photos: dict[str, list[Box]] = {}
    current: list[Box] | None = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if line.startswith("#"):
            current = photos.setdefault(line[1:].strip(), [])
        elif line:
            values = line.split()
            if current is None or len(values) != 4:
                raise ValueError(f"{path} line {number}: expected '# file' or 'x y w h'")
            x, y, w, h = (float(v) for v in values)
            current.append((x, y, w, h))
    return [AnnotatedPhoto(path.parent / name, tuple(boxes)) for name, boxes in photos.items()]


_COUNT = re.compile(r"\d+_(\d+|[A-Z])\.jpg")


def compreface(folder: Path) -> list[AnnotatedPhoto]:
    """Counts from the file names, nose points from annotations.py where it has them."""
    noses = _compreface_noses(folder / "annotations.py")
    photos = []
    for file in sorted(folder.glob("*.jpg")):
        found = _COUNT.fullmatch(file.name)
        if found is None:
            continue
        count = int(found.group(1)) if found.group(1).isdigit() else 1
        photos.append(AnnotatedPhoto(file, face_count=count, noses=tuple(noses.get(file.name, ()))))
    return photos


def _compreface_noses(path: Path) -> dict[str, list[tuple[float, float]]]:
    """``Row('name.jpg', [(x, y), ...])`` calls in the file, read without running it."""
    if not path.is_file():
        return {}
    out: dict[str, list[tuple[float, float]]] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "Row" and node.args:
            try:
                name = ast.literal_eval(node.args[0])
                points = ast.literal_eval(node.args[1]) if len(node.args) > 1 else []
            except ValueError:
                continue
            out[str(name)] = [(float(x), float(y)) for x, y in points]
    return out


SETS = ("dlib", "wider", "compreface")


def datasets(root: Path, names: tuple[str, ...] = SETS) -> dict[str, list[AnnotatedPhoto]]:
    """The annotated sets under ``root`` (../shared/data/crowds) among ``names``, those
    present: "dlib" (testing.xml), "wider" (boxes.txt), "compreface" (counted photos)."""
    found: dict[str, list[AnnotatedPhoto]] = {}
    if "dlib" in names and (root / "dlib" / "testing.xml").is_file():
        found["dlib"] = dlib_xml(root / "dlib" / "testing.xml")
    if "wider" in names and (root / "wider" / "boxes.txt").is_file():
        found["wider"] = wider_boxes(root / "wider" / "boxes.txt")
    if "compreface" in names and (root / "compreface").is_dir():
        found["compreface"] = compreface(root / "compreface")
    return found
