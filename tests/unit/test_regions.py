"""Where ingest looks for faces between full-frame detections (facegrid_ingest.regions)."""

from __future__ import annotations

from facegrid.v1 import common_pb2
from facegrid_ingest.regions import MAX_REGION_SHARE, REGION_FACES, Region, regions_around, to_frame


def test_a_region_is_centred_on_the_face_with_a_face_of_margin() -> None:
    regions = regions_around([(1000.0, 500.0, 100.0, 100.0)], 1920, 1080, 80)
    assert regions == [Region(925, 425, 1176, 676)]
    assert regions[0].right - regions[0].left >= REGION_FACES * 100


def test_small_faces_get_at_least_two_detector_windows() -> None:
    (region,) = regions_around([(1000.0, 500.0, 20.0, 20.0)], 1920, 1080, 80) or []
    assert region.right - region.left >= 160
    assert region.bottom - region.top >= 160


def test_regions_are_clipped_to_the_frame() -> None:
    (region,) = regions_around([(-30.0, 1040.0, 100.0, 100.0)], 1920, 1080, 80) or []
    assert region.left == 0
    assert region.bottom == 1080
    assert region.top >= 0
    assert region.right <= 1920


def test_a_box_predicted_off_the_frame_gives_no_region() -> None:
    assert regions_around([(5000.0, 5000.0, 100.0, 100.0)], 1920, 1080, 80) == []


def test_overlapping_regions_merge_until_none_overlap() -> None:
    # a and b overlap; their union reaches c; d is far away.
    boxes = [
        (100.0, 100.0, 60.0, 60.0),
        (250.0, 100.0, 60.0, 60.0),
        (400.0, 150.0, 60.0, 60.0),
        (1500.0, 800.0, 60.0, 60.0),
    ]
    regions = regions_around(boxes, 1920, 1080, 80) or []
    assert len(regions) == 2
    for i, a in enumerate(regions):
        for b in regions[i + 1 :]:
            assert not a.overlaps(b)
    first = regions[0]
    assert first.left <= 100
    assert first.right >= 460


def test_regions_covering_most_of_the_frame_mean_the_whole_frame() -> None:
    # One face so large that its region is most of a 640x360 frame.
    assert regions_around([(220.0, 80.0, 200.0, 200.0)], 640, 360, 80) is None
    small = regions_around([(300.0, 150.0, 60.0, 60.0)], 640, 360, 80)
    assert small is not None
    assert sum(r.area for r in small) <= MAX_REGION_SHARE * 640 * 360


def test_faces_found_in_a_region_are_moved_into_the_frame() -> None:
    face = common_pb2.FaceDetail(
        bounding_box=common_pb2.BoundingBox(left=10, top=20, width=50, height=60),
        landmarks=[common_pb2.Landmark(type=common_pb2.Landmark.TYPE_NOSE, x=30.5, y=50.0)],
        confidence=90.0,
    )
    moved = to_frame(face, Region(100, 200, 400, 500), 1000, 800)
    box = moved.bounding_box
    assert (box.left, box.top, box.width, box.height) == (110, 220, 50, 60)
    assert abs(box.left_ratio - 0.11) < 1e-6
    assert abs(box.top_ratio - 0.275) < 1e-6
    assert abs(box.width_ratio - 0.05) < 1e-6
    assert abs(box.height_ratio - 0.075) < 1e-6
    nose = moved.landmarks[0]
    assert (nose.x, nose.y) == (130.5, 250.0)
    assert abs(nose.x_ratio - 0.1305) < 1e-6
    assert abs(nose.y_ratio - 0.3125) < 1e-6
    assert moved.confidence == 90.0
    assert face.bounding_box.left == 10  # the original is untouched
