"""The face tracker on synthetic detections: geometry, appearance, gaps, best shots and bounds."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from facegrid_ingest.tracker import (
    Box,
    Detection,
    Embedding,
    Track,
    Tracker,
    TrackUpdate,
    box_iou,
)

DIM = 128


def _person(seed: int) -> Embedding:
    """A random unit vector: two of them in 128-d have a cosine near 0 (different people)."""
    vector = np.random.default_rng(seed).standard_normal(DIM)
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def _shot_of(person: Embedding, seed: int, noise: float = 0.05) -> Embedding:
    """Another photo of the same person: cosine with `person` about 0.99."""
    rng = np.random.default_rng(seed)
    vector = person + noise * rng.standard_normal(DIM) / np.sqrt(DIM)
    result: Embedding = (vector / np.linalg.norm(vector)).astype(np.float32)
    return result


def _with_cosine(person: Embedding, cosine: float, seed: int) -> Embedding:
    """A unit vector whose cosine with `person` is exactly `cosine`."""
    other = np.random.default_rng(seed).standard_normal(DIM)
    other -= float(other @ person) * person
    other /= np.linalg.norm(other)
    vector = cosine * person.astype(np.float64) + np.sqrt(1.0 - cosine**2) * other
    result: Embedding = vector.astype(np.float32)
    return result


def _cos(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _det(
    x: float,
    y: float = 100.0,
    *,
    size: float = 40.0,
    embedding: Embedding | None = None,
    quality: float = 1.0,
    payload: object = None,
) -> Detection:
    return Detection(box=(x, y, size, size), embedding=embedding, quality=quality, payload=payload)


def _only(update: TrackUpdate) -> Track:
    """The single track an update touched (matched or started)."""
    tracks = [t for t, _ in update.matched] + [t for t, _ in update.started]
    assert len(tracks) == 1
    return tracks[0]


def test_linear_motion_is_one_track() -> None:
    tracker = Tracker()
    updates = [tracker.update(i * 0.2, i, [_det(100.0 + 20.0 * i, payload=i)]) for i in range(10)]

    assert [len(u.started) for u in updates] == [1] + [0] * 9
    assert [len(u.matched) for u in updates] == [0] + [1] * 9
    assert all(not u.ended for u in updates)
    assert {_only(u).track_number for u in updates} == {1}
    (track,) = tracker.tracks
    assert track.hits == 10
    assert track.first_time_s == 0.0
    assert track.last_time_s == pytest.approx(1.8)
    assert track.last_frame_number == 9
    assert track.box == (280.0, 100.0, 40.0, 40.0)
    assert track.velocity == pytest.approx((100.0, 0.0))  # 20 px per 0.2 s
    assert track.embedding is None
    assert track.predicted_box(2.3) == pytest.approx((330.0, 100.0, 40.0, 40.0))


def test_velocity_is_exponentially_smoothed() -> None:
    tracker = Tracker(velocity_smoothing=0.5)
    tracker.update(0.0, 0, [_det(100.0)])
    tracker.update(1.0, 1, [_det(110.0)])  # first measurement is taken as is: 10 px/s
    (track,) = tracker.tracks
    assert track.velocity == pytest.approx((10.0, 0.0))
    tracker.update(2.0, 2, [_det(140.0, 104.0)])  # measured (30, 4) px/s
    assert track.velocity == pytest.approx((20.0, 2.0))


def test_prediction_carries_a_track_past_a_zero_overlap_step() -> None:
    """Steps of 36 px on 40 px boxes overlap by IoU 0.05 (< 0.1): only the prediction links them."""
    assert box_iou((0.0, 0.0, 40.0, 40.0), (36.0, 0.0, 40.0, 40.0)) < 0.1
    tracker = Tracker()
    xs = [100.0, 120.0, 156.0, 192.0, 228.0]  # 20 px, then 36 px per step: speed picked up
    updates = [tracker.update(float(i), i, [_det(x)]) for i, x in enumerate(xs)]
    assert [len(u.started) for u in updates] == [1, 0, 0, 0, 0]
    assert len(tracker.tracks) == 1


def test_crossing_faces_keep_their_identities() -> None:
    alice, bob = _person(1), _person(2)
    assert _cos(alice, bob) < 0.5
    tracker = Tracker()
    seen: dict[int, set[str]] = {}
    for i in range(9):
        a = _det(100.0 + 25.0 * i, embedding=_shot_of(alice, 100 + i), payload="alice")
        b = _det(300.0 - 25.0 * i, embedding=_shot_of(bob, 200 + i), payload="bob")
        # At i == 4 the boxes coincide; list Bob first so a tie would swap the identities.
        update = tracker.update(i * 0.5, i, [b, a] if i == 4 else [a, b])
        for track, detection in update.matched + update.started:
            seen.setdefault(track.track_number, set()).add(str(detection.payload))
    assert seen == {1: {"alice"}, 2: {"bob"}}


def test_faces_that_meet_and_turn_back_follow_appearance_not_momentum() -> None:
    """After meeting, constant-velocity prediction points at the other face; the floor vetoes it."""
    alice, bob = _person(3), _person(4)
    alice_x = [100.0, 130.0, 160.0, 190.0, 160.0, 130.0]
    bob_x = [280.0, 250.0, 220.0, 190.0, 220.0, 250.0]

    def run(with_embeddings: bool) -> dict[int, set[str]]:
        tracker = Tracker()
        seen: dict[int, set[str]] = {}
        for i, (ax, bx) in enumerate(zip(alice_x, bob_x, strict=True)):
            a_emb = _shot_of(alice, 300 + i) if with_embeddings else None
            b_emb = _shot_of(bob, 400 + i) if with_embeddings else None
            update = tracker.update(
                float(i),
                i,
                [
                    _det(ax, embedding=a_emb, payload="alice"),
                    _det(bx, embedding=b_emb, payload="bob"),
                ],
            )
            for track, detection in update.matched + update.started:
                seen.setdefault(track.track_number, set()).add(str(detection.payload))
        return seen

    assert run(with_embeddings=True) == {1: {"alice"}, 2: {"bob"}}
    # The control: geometry alone swaps them, so the assertion above is the embeddings' doing.
    assert run(with_embeddings=False) != {1: {"alice"}, 2: {"bob"}}


def test_same_place_but_different_person_starts_a_new_track() -> None:
    """Perfect overlap does not join faces whose cosine is under the floor (0.75)."""
    alice = _person(5)
    tracker = Tracker()
    tracker.update(0.0, 0, [_det(100.0, embedding=alice)])
    update = tracker.update(0.5, 1, [_det(100.0, embedding=_with_cosine(alice, 0.7, seed=6))])
    assert [t.track_number for t, _ in update.started] == [2]
    assert update.matched == []
    # Between the floor and min_join_cosine, overlap is what allows the join.
    update = tracker.update(1.0, 2, [_det(100.0, embedding=_with_cosine(alice, 0.8, seed=7))])
    assert [t.track_number for t, _ in update.matched] == [1]


def test_cost_weighs_appearance_against_overlap() -> None:
    """Two allowed candidates: the better-looking one wins over the better-overlapping one."""
    alice = _person(18)
    tracker = Tracker()
    tracker.update(0.0, 0, [_det(100.0, embedding=alice)])
    # cost 1 * (1 - 0.82) + 4 * (1 - 0.80) = 0.98 against 1 * (1 - 0.54) + 4 * (1 - 0.99) = 0.50
    close = _det(104.0, embedding=_with_cosine(alice, 0.80, seed=19), payload="close")
    alike = _det(112.0, embedding=_with_cosine(alice, 0.99, seed=20), payload="alike")
    update = tracker.update(0.5, 1, [close, alike])
    assert [(t.track_number, d.payload) for t, d in update.matched] == [(1, "alike")]


def test_unknown_appearance_is_priced_as_a_borderline_match() -> None:
    """A detection without embedding costs 4 * (1 - 0.9) = 0.4 on the appearance term."""
    alice = _person(21)
    tracker = Tracker()
    tracker.update(0.0, 0, [_det(100.0, embedding=alice)])
    # cost 0.18 + 0.40 = 0.58 against 1 * (1 - 0.67) + 4 * (1 - 0.99) = 0.37
    unknown = _det(104.0, payload="unknown")
    alike = _det(108.0, embedding=_with_cosine(alice, 0.99, seed=22), payload="alike")
    update = tracker.update(0.5, 1, [unknown, alike])
    assert [(t.track_number, d.payload) for t, d in update.matched] == [(1, "alike")]


def test_a_missed_frame_keeps_the_track() -> None:
    tracker = Tracker(max_gap_s=2.0)
    numbers: list[int] = []
    for i in range(8):
        if i == 4:
            update = tracker.update(i * 0.5, i, [])
            assert update == TrackUpdate(matched=[], started=[], ended=[])
            assert len(tracker.tracks) == 1
            continue
        update = tracker.update(i * 0.5, i, [_det(100.0 + 10.0 * i)])
        assert not update.ended
        numbers.append(_only(update).track_number)
    assert numbers == [1] * 7
    assert tracker.tracks[0].hits == 7


def test_a_long_absence_ends_the_track_and_a_return_gets_a_new_number() -> None:
    alice = _person(8)
    tracker = Tracker(max_gap_s=2.0)
    tracker.update(0.0, 0, [_det(100.0, embedding=alice)])
    tracker.update(1.0, 1, [_det(100.0, embedding=_shot_of(alice, 9))])
    assert tracker.update(3.0, 2, []).ended == []  # exactly max_gap_s: still live
    first = tracker.tracks[0]

    update = tracker.update(3.5, 3, [_det(100.0, embedding=_shot_of(alice, 10))])
    assert update.ended == [first]
    assert [t.track_number for t, _ in update.started] == [2]
    assert update.matched == []
    assert [t.track_number for t in tracker.tracks] == [2]
    assert tracker.update(4.0, 4, []).ended == []  # ended is reported once


def test_a_fast_jump_with_a_matching_embedding_rejoins() -> None:
    alice = _person(11)
    tracker = Tracker()
    for i in range(3):
        tracker.update(i * 0.5, i, [_det(100.0 + 10.0 * i, embedding=_shot_of(alice, 20 + i))])
    (track,) = tracker.tracks
    assert track.velocity != (0.0, 0.0)

    far = _det(600.0, 300.0, embedding=_shot_of(alice, 30))
    assert box_iou(track.predicted_box(1.5), far.box) == 0.0
    update = tracker.update(1.5, 3, [far])
    assert update.matched == [(track, far)]
    assert update.started == []
    assert track.box == far.box
    assert track.velocity == (0.0, 0.0)  # a relocation, not a speed to extrapolate


def test_a_jump_with_a_different_embedding_starts_a_new_track() -> None:
    alice, bob = _person(12), _person(13)
    tracker = Tracker()
    tracker.update(0.0, 0, [_det(100.0, embedding=alice)])
    update = tracker.update(0.5, 1, [_det(600.0, 300.0, embedding=bob)])
    assert update.matched == []
    assert [t.track_number for t, _ in update.started] == [2]
    assert update.ended == []
    assert [t.track_number for t in tracker.tracks] == [1, 2]


def test_a_jump_without_embeddings_starts_a_new_track() -> None:
    tracker = Tracker()
    tracker.update(0.0, 0, [_det(100.0)])
    update = tracker.update(0.5, 1, [_det(600.0, 300.0)])
    assert [t.track_number for t, _ in update.started] == [2]


def test_the_centre_jump_gate() -> None:
    """With min_iou 0 only the centre jump gates geometry: 2 box widths is over 1.5, under 3."""
    for max_jump, expected_number in [(1.5, 2), (3.0, 1)]:
        tracker = Tracker(min_iou=0.0, max_centre_jump=max_jump)
        tracker.update(0.0, 0, [_det(100.0)])
        update = tracker.update(0.5, 1, [_det(180.0)])
        assert _only(update).track_number == expected_number


def test_best_shots_are_the_top_qualities_earlier_first_on_ties() -> None:
    qualities = [0.5, 2.0, 1.0, 2.0, 3.0, 0.1, 1.0]
    tracker = Tracker(best_shot_count=3)
    for i, quality in enumerate(qualities):
        tracker.update(i * 0.2, i, [_det(100.0 + i, quality=quality, payload=i)])
    (track,) = tracker.tracks
    assert [s.detection.quality for s in track.best_shots] == [3.0, 2.0, 2.0]
    assert [s.frame_number for s in track.best_shots] == [4, 1, 3]
    assert [s.detection.payload for s in track.best_shots] == [4, 1, 3]
    assert track.best_shots[0].time_s == pytest.approx(0.8)


def test_running_embedding_is_the_normalised_mean() -> None:
    alice = _person(14)
    first, second = _with_cosine(alice, 0.95, seed=15), _with_cosine(alice, 0.95, seed=16)
    tracker = Tracker()
    tracker.update(0.0, 0, [_det(100.0, embedding=first)])
    tracker.update(0.5, 1, [_det(102.0)])  # no embedding: the mean is unchanged
    (track,) = tracker.tracks
    assert track.embedding is not None
    np.testing.assert_allclose(track.embedding, first, atol=1e-6)
    tracker.update(1.0, 2, [_det(104.0, embedding=second)])
    expected = (first + second) / np.linalg.norm(first + second)
    assert track.embedding.dtype == np.float32
    np.testing.assert_allclose(track.embedding, expected, atol=1e-6)
    assert float(np.linalg.norm(track.embedding)) == pytest.approx(1.0, abs=1e-6)
    assert _cos(track.embedding, alice) > 0.95  # the mean is closer to the person than either


def test_time_going_backwards_raises_and_changes_nothing() -> None:
    tracker = Tracker()
    tracker.update(1.0, 10, [_det(100.0)])
    with pytest.raises(ValueError, match="backwards"):
        tracker.update(0.5, 11, [_det(100.0)])
    assert [(t.track_number, t.hits) for t in tracker.tracks] == [(1, 1)]
    update = tracker.update(1.0, 12, [_det(100.0)])  # the same time is allowed
    assert [t.track_number for t, _ in update.matched] == [1]


def test_max_tracks_ends_the_least_recently_seen_first() -> None:
    tracker = Tracker(max_tracks=3, max_gap_s=100.0)
    for i in range(3):
        tracker.update(float(i), i, [_det(100.0 + 200.0 * i)])
    tracker.update(3.0, 3, [_det(100.0)])  # track 1 seen again: track 2 is now the oldest-seen
    update = tracker.update(4.0, 4, [_det(900.0)])
    assert [t.track_number for t in update.ended] == [2]
    assert [t.track_number for t, _ in update.started] == [4]
    assert [t.track_number for t in tracker.tracks] == [1, 3, 4]

    many = [_det(100.0 + 100.0 * i, 600.0) for i in range(5)]
    update = tracker.update(5.0, 5, many)
    assert len(tracker.tracks) == 3
    assert [t.track_number for t in update.ended] == [3, 1, 4, 5, 6]
    assert [t.track_number for t in tracker.tracks] == [7, 8, 9]


def test_flush_ends_every_track_and_numbers_are_never_reused() -> None:
    tracker = Tracker()
    tracker.update(0.0, 0, [_det(100.0), _det(400.0)])
    ended = tracker.flush()
    assert [t.track_number for t in ended] == [1, 2]
    assert tracker.tracks == []
    assert tracker.flush() == []
    update = tracker.update(1.0, 1, [_det(100.0)])
    assert [t.track_number for t, _ in update.started] == [3]


def test_same_input_gives_the_same_tracks() -> None:
    def run() -> list[tuple[int, int]]:
        rng = np.random.default_rng(17)
        people = [_person(40 + p) for p in range(6)]
        tracker = Tracker()
        out: list[tuple[int, int]] = []
        for frame in range(30):
            present = rng.random(6) < 0.7
            detections = [
                _det(
                    50.0 + 120.0 * p + rng.normal(0, 5),
                    100.0 + rng.normal(0, 5),
                    embedding=_shot_of(people[p], 1000 * frame + p),
                    payload=p,
                )
                for p in range(6)
                if present[p]
            ]
            update = tracker.update(frame * 0.3, frame, detections)
            for track, detection in update.matched + update.started:
                assert isinstance(detection.payload, int)
                out.append((track.track_number, detection.payload))
        return out

    first = run()
    assert first == run()
    # Six well-separated people, never away for max_gap_s: one track each, one person each.
    assert len(set(first)) == 6
    assert len({number for number, _ in first}) == 6


@pytest.mark.parametrize(
    ("box", "quality", "embedding", "message"),
    [
        ((0.0, 0.0, 0.0, 10.0), 1.0, None, "width and height"),
        ((0.0, 0.0, 10.0, -1.0), 1.0, None, "width and height"),
        ((0.0, float("nan"), 10.0, 10.0), 1.0, None, "finite"),
        ((0.0, 0.0, 10.0, 10.0), -0.1, None, "quality"),
        ((0.0, 0.0, 10.0, 10.0), 1.0, np.zeros(DIM, dtype=np.float32), "non-zero"),
        ((0.0, 0.0, 10.0, 10.0), 1.0, np.ones((2, 64), dtype=np.float32), "1-d"),
    ],
)
def test_invalid_detections_are_rejected(
    box: Box, quality: float, embedding: Embedding | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Detection(box=box, embedding=embedding, quality=quality)


def test_embedding_size_change_is_rejected_before_any_change() -> None:
    tracker = Tracker()
    tracker.update(0.0, 0, [_det(100.0, embedding=_person(50))])
    short = np.ones(64, dtype=np.float32) / 8.0
    with pytest.raises(ValueError, match="embedding size"):
        tracker.update(0.5, 1, [_det(100.0), _det(300.0, embedding=short)])
    assert [(t.track_number, t.hits) for t in tracker.tracks] == [(1, 1)]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_gap_s": -1.0}, "max_gap_s"),
        ({"min_iou": 1.5}, "min_iou"),
        ({"min_join_cosine": 0.5}, "cosine_floor"),  # below the default floor of 0.75
        ({"best_shot_count": 0}, "best_shot_count"),
        ({"max_tracks": 0}, "max_tracks"),
        ({"velocity_smoothing": 0.0}, "velocity_smoothing"),
    ],
)
def test_invalid_settings_are_rejected(settings: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Tracker(**settings)  # type: ignore[arg-type]


def test_geometric_candidates_name_the_tracks_a_box_could_continue() -> None:
    tracker = Tracker()
    first = _only(tracker.update(0.0, 0, [_det(100.0, embedding=_person(1))]))
    second = _only(tracker.update(0.0, 0, [_det(400.0, embedding=_person(2))]))
    near_first = (105.0, 100.0, 40.0, 40.0)
    between = (250.0, 100.0, 40.0, 40.0)
    candidates = tracker.geometric_candidates(0.5, [near_first, between])
    assert candidates == [[first], []]
    # Nothing changed: the same question gives the same answer, and the tracks are as they were.
    assert tracker.geometric_candidates(0.5, [near_first]) == [[first]]
    assert first.last_time_s == 0.0
    assert second.last_time_s == 0.0
    # A track past the gap is no candidate.
    assert tracker.geometric_candidates(10.0, [near_first]) == [[]]
