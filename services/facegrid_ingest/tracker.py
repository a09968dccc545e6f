"""Multi-object face tracking across the sampled frames of one video source.

The ingest service samples each source at about 0.5 to 10 frames per second and detects faces in
every sampled frame. Without tracking, one person standing in view for a minute would become
hundreds of face records and as many watch-list searches. The tracker links the detections of one
face across frames into a `Track`, so the caller can keep (and search with) only a few best shots
per track, and knows when a person has left the view.

Use one `Tracker` per video source; it is not thread-safe and it needs no clock of its own: time
only moves when `update` is called, so a source that stops delivering frames should still be given
empty updates (or `flush`) for its tracks to end.

Association, per frame, is a minimum-cost assignment (`scipy.optimize.linear_sum_assignment`) of
live tracks to detections. A track/detection pair is *allowed* when

* geometry explains it: the IoU of the track's constant-velocity predicted box with the detection
  box is >= `min_iou` AND the centre jump (predicted-to-detected centre distance divided by the
  track box's width) is <= `max_centre_jump`; or
* appearance explains it: both embeddings are present and their cosine is >= `min_join_cosine`.
  At low frame rates a face can move a long way between samples, or be missed for a frame; this
  is what re-joins it to its track;

and never when both embeddings are present and their cosine is below `cosine_floor`: two
different people crossing overlap well, and geometry alone would happily swap them.

The cost of an allowed pair is::

    IOU_WEIGHT * (1 - IoU) + COSINE_WEIGHT * (1 - cosine)

with IOU_WEIGHT = 1 and COSINE_WEIGHT = 4. Allowed pairs have cosine >= cosine_floor (0.75 by
default), so (1 - cosine) spans about [0, 0.25]; the weight 4 stretches it onto the same [0, 1]
scale as (1 - IoU), so position and appearance count about equally. When either embedding is
missing, (1 - cosine) is priced at (1 - min_join_cosine), a borderline appearance match: a
detection of unknown appearance neither beats nor loses to every detection of known appearance.

Pairs that are not allowed get a cost larger than any sum of allowed costs, and are dropped from
the solution; so the solver first maximises the number of allowed matches, then minimises their
cost. Detections left unmatched start new tracks; tracks unmatched for more than `max_gap_s`
end. Everything is deterministic: same input, same tracks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from scipy.optimize import linear_sum_assignment

__all__ = [
    "COSINE_WEIGHT",
    "DEFAULT_COSINE_FLOOR",
    "DEFAULT_VELOCITY_SMOOTHING",
    "IOU_WEIGHT",
    "Box",
    "Detection",
    "Embedding",
    "Shot",
    "Track",
    "TrackUpdate",
    "Tracker",
    "box_iou",
]

Box = tuple[float, float, float, float]
"""left, top, width, height in pixels."""

Embedding = npt.NDArray[np.float32]

IOU_WEIGHT = 1.0
"""Weight of (1 - IoU) in the association cost."""

COSINE_WEIGHT = 4.0
"""Weight of (1 - cosine): maps the allowed cosine span [0.75, 1] onto the IoU term's [0, 1]."""

DEFAULT_COSINE_FLOOR = 0.75
"""Below this cosine two faces are taken for different people, however well their boxes overlap."""

DEFAULT_VELOCITY_SMOOTHING = 0.5
"""Weight of the newest velocity measurement in the exponential smoothing."""


@dataclass(frozen=True, eq=False)
class Detection:
    """One face found in one frame, as the detector and embedder saw it.

    Compared and hashed by identity (`eq=False`): the embedding is a numpy array, for which
    value equality is ambiguous, and a detection is an event, not a value.
    """

    box: Box
    embedding: Embedding | None
    quality: float
    payload: object = None

    def __post_init__(self) -> None:
        """Reject boxes and embeddings the geometry would divide by zero on, or turn into NaN."""
        if len(self.box) != 4:
            raise ValueError(f"box must be (left, top, width, height), got {self.box!r}")
        box = tuple(float(value) for value in self.box)
        if not all(math.isfinite(value) for value in box):
            raise ValueError(f"box must be finite, got {self.box!r}")
        if box[2] <= 0 or box[3] <= 0:
            raise ValueError(f"box width and height must be > 0, got {self.box!r}")
        object.__setattr__(self, "box", box)
        quality = float(self.quality)
        if not math.isfinite(quality) or quality < 0:
            raise ValueError(f"quality must be finite and >= 0, got {self.quality!r}")
        object.__setattr__(self, "quality", quality)
        if self.embedding is not None:
            embedding = self.embedding
            if not isinstance(embedding, np.ndarray) or embedding.ndim != 1 or embedding.size == 0:
                raise ValueError("embedding must be a non-empty 1-d numpy array or None")
            if not np.all(np.isfinite(embedding)) or not np.any(embedding):
                raise ValueError("embedding must be finite and non-zero")


@dataclass
class Shot:
    """A detection kept as one of a track's best, with when it was seen."""

    time_s: float
    frame_number: int
    detection: Detection


@dataclass(eq=False)
class Track:
    """One face followed across frames. Mutated in place by its `Tracker`; compared by identity."""

    track_number: int
    first_time_s: float
    last_time_s: float
    box: Box
    velocity: tuple[float, float] = (0.0, 0.0)
    embedding: Embedding | None = None
    hits: int = 1
    best_shots: list[Shot] = field(default_factory=list)
    last_frame_number: int = 0
    # Unnormalised sum of the unit embeddings seen: the mean's direction, without drift from
    # re-normalising a running value.
    embedding_sum: npt.NDArray[np.float64] | None = field(default=None, repr=False)
    # False until two geometric matches have measured a speed (and again after a relocation),
    # so the first measurement replaces the zero instead of being averaged with it.
    velocity_known: bool = field(default=False, repr=False)

    def predicted_box(self, time_s: float) -> Box:
        """The last box moved at constant velocity to `time_s`; its size is the last observed."""
        dt = time_s - self.last_time_s
        left, top, width, height = self.box
        vx, vy = self.velocity
        return (left + vx * dt, top + vy * dt, width, height)


@dataclass(frozen=True)
class TrackUpdate:
    """What one frame changed; `matched` and `started` follow the order of the detections."""

    matched: list[tuple[Track, Detection]]
    started: list[tuple[Track, Detection]]
    ended: list[Track]


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two (left, top, width, height) boxes."""
    return float(
        _iou_matrix(np.array([a], dtype=np.float64), np.array([b], dtype=np.float64))[0, 0]
    )


def _iou_matrix(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """IoU of every box in `a` (n x 4) with every box in `b` (m x 4), as n x m."""
    a_left, a_top = a[:, None, 0], a[:, None, 1]
    a_right, a_bottom = a_left + a[:, None, 2], a_top + a[:, None, 3]
    b_left, b_top = b[None, :, 0], b[None, :, 1]
    b_right, b_bottom = b_left + b[None, :, 2], b_top + b[None, :, 3]
    inter_w = np.clip(np.minimum(a_right, b_right) - np.maximum(a_left, b_left), 0.0, None)
    inter_h = np.clip(np.minimum(a_bottom, b_bottom) - np.maximum(a_top, b_top), 0.0, None)
    inter = inter_w * inter_h
    union = a[:, None, 2] * a[:, None, 3] + b[None, :, 2] * b[None, :, 3] - inter
    result: npt.NDArray[np.float64] = inter / union
    return result


def _centre(box: Box) -> tuple[float, float]:
    left, top, width, height = box
    return (left + width / 2.0, top + height / 2.0)


def _unit(vector: Embedding) -> npt.NDArray[np.float64]:
    as_float = np.asarray(vector, dtype=np.float64)
    result: npt.NDArray[np.float64] = as_float / np.linalg.norm(as_float)
    return result


@dataclass(frozen=True)
class _Pair:
    track_index: int
    detection_index: int
    geometric: bool


class Tracker:
    """Links the face detections of one video source into tracks, frame by frame."""

    def __init__(
        self,
        *,
        max_gap_s: float = 2.0,
        min_iou: float = 0.1,
        min_join_cosine: float = 0.9,
        max_centre_jump: float = 1.5,
        best_shot_count: int = 3,
        max_tracks: int = 256,
        cosine_floor: float = DEFAULT_COSINE_FLOOR,
        velocity_smoothing: float = DEFAULT_VELOCITY_SMOOTHING,
    ) -> None:
        """Check the settings up front: a bad one would otherwise show only as odd tracks."""
        if not max_gap_s >= 0:
            raise ValueError(f"max_gap_s must be >= 0, got {max_gap_s!r}")
        if not 0.0 <= min_iou <= 1.0:
            raise ValueError(f"min_iou must be in [0, 1], got {min_iou!r}")
        if not -1.0 <= cosine_floor <= min_join_cosine <= 1.0:
            raise ValueError(
                "need -1 <= cosine_floor <= min_join_cosine <= 1, got "
                f"{cosine_floor!r} and {min_join_cosine!r}"
            )
        if not max_centre_jump >= 0:
            raise ValueError(f"max_centre_jump must be >= 0, got {max_centre_jump!r}")
        if best_shot_count < 1:
            raise ValueError(f"best_shot_count must be >= 1, got {best_shot_count!r}")
        if max_tracks < 1:
            raise ValueError(f"max_tracks must be >= 1, got {max_tracks!r}")
        if not 0.0 < velocity_smoothing <= 1.0:
            raise ValueError(f"velocity_smoothing must be in (0, 1], got {velocity_smoothing!r}")
        self.max_gap_s = float(max_gap_s)
        self.min_iou = float(min_iou)
        self.min_join_cosine = float(min_join_cosine)
        self.max_centre_jump = float(max_centre_jump)
        self.best_shot_count = best_shot_count
        self.max_tracks = max_tracks
        self.cosine_floor = float(cosine_floor)
        self.velocity_smoothing = float(velocity_smoothing)
        self._tracks: dict[int, Track] = {}  # insertion order == track_number order
        self._next_number = 1
        self._last_time_s: float | None = None
        self._embedding_size: int | None = None

    @property
    def tracks(self) -> list[Track]:
        """The live tracks, oldest track number first (a copy; the tracks themselves are live)."""
        return list(self._tracks.values())

    def update(self, time_s: float, frame_number: int, detections: list[Detection]) -> TrackUpdate:
        """Feed one sampled frame's detections (possibly none); time must not go backwards.

        Tracks unseen for more than `max_gap_s` are ended before association, so they cannot be
        matched; a detection exactly `max_gap_s` after a track's last one still joins it.
        """
        time_s = float(time_s)
        if not math.isfinite(time_s):
            raise ValueError(f"time_s must be finite, got {time_s!r}")
        if self._last_time_s is not None and time_s < self._last_time_s:
            raise ValueError(
                f"time went backwards: {time_s} s after {self._last_time_s} s "
                "(use a new Tracker when a source restarts)"
            )
        self._check_embedding_sizes(detections)
        self._last_time_s = time_s

        ended = self._expire(time_s)
        tracks = list(self._tracks.values())
        matched_by_detection: dict[int, Track] = {}
        for pair in self._associate(tracks, detections, time_s):
            track = tracks[pair.track_index]
            detection = detections[pair.detection_index]
            self._observe(track, detection, time_s, frame_number, geometric=pair.geometric)
            matched_by_detection[pair.detection_index] = track

        matched: list[tuple[Track, Detection]] = []
        started: list[tuple[Track, Detection]] = []
        for index, detection in enumerate(detections):
            if index in matched_by_detection:
                matched.append((matched_by_detection[index], detection))
            else:
                started.append((self._start(detection, time_s, frame_number), detection))
        ended.extend(self._evict())
        return TrackUpdate(matched=matched, started=started, ended=ended)

    def flush(self) -> list[Track]:
        """End and return every live track (the source closed). Track numbers stay unused."""
        ended = list(self._tracks.values())
        self._tracks.clear()
        return ended

    def _check_embedding_sizes(self, detections: list[Detection]) -> None:
        """Fail before any state changes: a size change means a different embedding model."""
        size = self._embedding_size
        for detection in detections:
            if detection.embedding is None:
                continue
            if size is None:
                size = detection.embedding.size
            elif detection.embedding.size != size:
                raise ValueError(
                    f"embedding size {detection.embedding.size} differs from {size} seen before"
                )
        self._embedding_size = size

    def _expire(self, time_s: float) -> list[Track]:
        ended = [t for t in self._tracks.values() if time_s - t.last_time_s > self.max_gap_s]
        for track in ended:
            del self._tracks[track.track_number]
        return ended

    def _evict(self) -> list[Track]:
        """Bound memory: end the least recently seen tracks (lowest track number on ties)."""
        excess = len(self._tracks) - self.max_tracks
        if excess <= 0:
            return []
        order = sorted(self._tracks.values(), key=lambda t: (t.last_time_s, t.track_number))
        victims = order[:excess]
        for track in victims:
            del self._tracks[track.track_number]
        return victims

    def geometric_candidates(self, time_s: float, boxes: list[Box]) -> list[list[Track]]:
        """For each box, the live tracks its position alone could continue (no state changes).

        A caller that must pay for embeddings can skip them where this is unambiguous: one
        box, one track, and no other box near that track.
        """
        tracks = [t for t in self._tracks.values() if time_s - t.last_time_s <= self.max_gap_s]
        if not tracks or not boxes:
            return [[] for _ in boxes]
        _, geometric = self._geometry(tracks, np.array(boxes, dtype=np.float64), time_s)
        return [[tracks[i] for i in np.flatnonzero(geometric[:, j])] for j in range(len(boxes))]

    def _geometry(
        self, tracks: list[Track], boxes: npt.NDArray[np.float64], time_s: float
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
        """IoU of predicted track boxes with the boxes, and which pairs geometry allows."""
        predicted = np.array([t.predicted_box(time_s) for t in tracks], dtype=np.float64)
        iou = _iou_matrix(predicted, boxes)
        predicted_centres = predicted[:, :2] + predicted[:, 2:] / 2.0
        detected_centres = boxes[:, :2] + boxes[:, 2:] / 2.0
        distance = np.linalg.norm(
            predicted_centres[:, None, :] - detected_centres[None, :, :], axis=2
        )
        jump = distance / predicted[:, None, 2]
        return iou, (iou >= self.min_iou) & (jump <= self.max_centre_jump)

    def _associate(
        self, tracks: list[Track], detections: list[Detection], time_s: float
    ) -> list[_Pair]:
        """Gate every track/detection pair, then solve the assignment over the allowed ones."""
        if not tracks or not detections:
            return []
        boxes = np.array([d.box for d in detections], dtype=np.float64)
        iou, geometric = self._geometry(tracks, boxes, time_s)

        cosine = np.zeros_like(iou)
        track_vectors = {i: e for i, t in enumerate(tracks) if (e := t.embedding) is not None}
        detection_vectors = {
            j: e for j, d in enumerate(detections) if (e := d.embedding) is not None
        }
        both = np.zeros(iou.shape, dtype=bool)
        if track_vectors and detection_vectors:
            rows_with, cols_with = list(track_vectors), list(detection_vectors)
            left = np.stack([_unit(track_vectors[i]) for i in rows_with])
            right = np.stack([_unit(detection_vectors[j]) for j in cols_with])
            block = np.ix_(rows_with, cols_with)
            cosine[block] = np.clip(left @ right.T, -1.0, 1.0)
            both[block] = True
        appearance = both & (cosine >= self.min_join_cosine)
        vetoed = both & (cosine < self.cosine_floor)
        allowed = (geometric | appearance) & ~vetoed
        if not allowed.any():
            return []

        appearance_cost = np.where(both, 1.0 - cosine, 1.0 - self.min_join_cosine)
        cost = IOU_WEIGHT * (1.0 - iou) + COSINE_WEIGHT * appearance_cost
        # Larger than the sum of any full set of allowed pairs: the solver never trades an
        # allowed match for a cheaper-looking configuration that needs a forbidden one.
        forbidden_cost = (float(cost[allowed].max()) + 1.0) * (min(cost.shape) + 1)
        rows, cols = linear_sum_assignment(np.where(allowed, cost, forbidden_cost))
        return [
            _Pair(int(r), int(c), geometric=bool(geometric[r, c]))
            for r, c in zip(rows, cols, strict=True)
            if allowed[r, c]
        ]

    def _observe(
        self,
        track: Track,
        detection: Detection,
        time_s: float,
        frame_number: int,
        *,
        geometric: bool,
    ) -> None:
        """Fold a matched detection into its track: box, velocity, embedding, best shots."""
        dt = time_s - track.last_time_s
        if not geometric:
            # Only appearance explains the match: a jump (camera cut, re-entry, a walk hidden by
            # missed frames), not evidence of speed; extrapolating it would fling the prediction.
            track.velocity = (0.0, 0.0)
            track.velocity_known = False
        elif dt > 0:
            old_x, old_y = _centre(track.box)
            new_x, new_y = _centre(detection.box)
            measured = ((new_x - old_x) / dt, (new_y - old_y) / dt)
            if track.velocity_known:
                alpha = self.velocity_smoothing
                vx, vy = track.velocity
                track.velocity = (
                    alpha * measured[0] + (1.0 - alpha) * vx,
                    alpha * measured[1] + (1.0 - alpha) * vy,
                )
            else:
                track.velocity = measured
                track.velocity_known = True
        track.box = detection.box
        track.last_time_s = time_s
        track.last_frame_number = frame_number
        track.hits += 1
        self._add_embedding(track, detection)
        self._add_shot(track, Shot(time_s, frame_number, detection))

    def _start(self, detection: Detection, time_s: float, frame_number: int) -> Track:
        track = Track(
            track_number=self._next_number,
            first_time_s=time_s,
            last_time_s=time_s,
            box=detection.box,
            last_frame_number=frame_number,
        )
        self._next_number += 1
        self._add_embedding(track, detection)
        self._add_shot(track, Shot(time_s, frame_number, detection))
        self._tracks[track.track_number] = track
        return track

    @staticmethod
    def _add_embedding(track: Track, detection: Detection) -> None:
        """Mean of unit embeddings, re-normalised: steadier than any single frame's embedding."""
        if detection.embedding is None:
            return
        unit = _unit(detection.embedding)
        track.embedding_sum = unit if track.embedding_sum is None else track.embedding_sum + unit
        norm = float(np.linalg.norm(track.embedding_sum))
        if norm > 1e-12:  # opposite embeddings could cancel only with a negative cosine_floor
            track.embedding = (track.embedding_sum / norm).astype(np.float32)

    def _add_shot(self, track: Track, shot: Shot) -> None:
        """Keep the top `best_shot_count` by quality; a stable sort keeps the earlier of ties."""
        shots = sorted([*track.best_shots, shot], key=lambda s: -s.detection.quality)
        track.best_shots = shots[: self.best_shot_count]
