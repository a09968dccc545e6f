"""The MMOD detector's pre/post-processing (facegrid_detection.mmod) against dlib itself.

Fast unit tests check the tiled pyramid geometry, dlib's bilinear resize (bit for bit),
the mapping of score-map cells to boxes and the non-maximum suppression, on synthetic data.
The parity tests run the ONNX trunk that ``facegrid models build`` writes (or
$FACEGRID_DETECTOR_ONNX) through ``detect_faces`` and compare every face with
``dlib.cnn_face_detection_model_v1`` on the same pixels: the same number of faces, boxes at
IoU >= 0.95, scores within 1e-3.  They skip, saying why, when the model, dlib or the test
photographs are missing.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from facegrid.models.repository import onnx_path
from facegrid.models.weights import detector_weights
from facegrid_detection.mmod import (
    INPUT_MEAN_RGB,
    PYRAMID_OUTER_PADDING,
    PYRAMID_PADDING,
    Detection,
    LevelRect,
    TiledPyramid,
    build_tiled_pyramid,
    decode_detections,
    detect_faces,
    non_max_suppression,
    pyramid_level_sizes,
    pyramid_up,
    tile_pyramid_levels,
    trunk_output_size,
)
from numpy.typing import NDArray

IOU_MIN = 0.95
SCORE_TOLERANCE = 1e-3
# dlib's CNN takes about 1.6 s per 512x512 image on two cores: bigger photographs are
# shrunk (the same array goes to dlib and to us) to keep the suite quick.
MAX_SIDE = int(os.environ.get("FACEGRID_PARITY_MAX_SIDE", "800"))
# Small photographs also run with upsample_num_times=1, as the Python binding does it.
UPSAMPLE_ONCE = {"misc/obama-240p.jpg", "misc/obama_small.jpg"}
ASTRONAUT_BOX = (168, 69, 263, 164)  # dlib's own answer on skimage.data.astronaut()
ASTRONAUT_SCORE = 1.0625

FACES_DIR = Path(
    os.environ.get(
        "FACEGRID_TEST_FACES", Path(__file__).resolve().parents[3] / "shared" / "data" / "faces"
    )
)
DETECTOR_ONNX_ENV = "FACEGRID_DETECTOR_ONNX"

Box = tuple[int, int, int, int]
Image = NDArray[np.uint8]


# ---------------------------------------------------------------------------------------
# Helpers


def _box(d: Detection) -> Box:
    return (round(d.left), round(d.top), round(d.right), round(d.bottom))


def _iou(a: Box, b: Box) -> float:
    """Intersection over union of two inclusive pixel rectangles."""
    width = min(a[2], b[2]) - max(a[0], b[0]) + 1
    height = min(a[3], b[3]) - max(a[1], b[1]) + 1
    inner = max(width, 0) * max(height, 0)
    area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
    area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    return inner / (area_a + area_b - inner)


def _unmatched(faces: list[Detection], others: list[Detection]) -> list[str]:
    """Faces with no face among `others` at IoU >= 0.95 and a score within 1e-3."""
    problems = []
    for face in faces:
        best = max(others, key=lambda other: _iou(_box(face), _box(other)), default=None)
        if best is None:
            problems.append(f"{_box(face)} score {face.score:.5f}: nothing to match")
            continue
        iou = _iou(_box(face), _box(best))
        score_diff = abs(face.score - best.score)
        if iou < IOU_MIN or score_diff > SCORE_TOLERANCE:
            problems.append(
                f"{_box(face)} score {face.score:.5f} vs {_box(best)} score {best.score:.5f}:"
                f" IoU {iou:.3f}, score difference {score_diff:.1e}"
            )
    return problems


def _assert_same_faces(ours: list[Detection], dlib_faces: list[Detection]) -> None:
    problems = [f"ours {p}" for p in _unmatched(ours, dlib_faces)]
    problems += [f"dlib's {p}" for p in _unmatched(dlib_faces, ours)]
    assert len(ours) == len(dlib_faces), f"{len(ours)} faces, dlib found {len(dlib_faces)}"
    assert not problems, "\n".join(problems)


def _hot_scores(pyramid: TiledPyramid, cells: dict[tuple[int, int], float]) -> NDArray[Any]:
    scores = np.full(trunk_output_size(*pyramid.size), -1.0, dtype=np.float32)
    for (row, col), value in cells.items():
        scores[row, col] = value
    return scores


def _cell_at(x: int, y: int) -> tuple[int, int]:
    """The score-map cell whose window is centred on tiled-image pixel (x, y)."""
    assert (x - 14) % 8 == 0, x
    assert (y - 14) % 8 == 0, y
    return (y - 14) // 8, (x - 14) // 8


def _blank(height: int, width: int) -> Image:
    return np.zeros((height, width, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------
# Tiled pyramid geometry


def test_level_sizes_shrink_by_five_sixths_down_to_five_rows() -> None:
    heights = [h for h, _ in pyramid_level_sizes(100, 100)]
    assert heights == [100, 83, 69, 57, 47, 39, 32, 26, 21, 17, 14, 11, 9, 7, 5]
    assert pyramid_level_sizes(4, 100) == [(4, 100)]  # the input itself is always kept
    assert pyramid_level_sizes(0, 10) == []
    # A level whose width reaches 0 ends the pyramid too.
    assert pyramid_level_sizes(200, 2) == [(200, 2), (166, 1)]


@pytest.mark.parametrize(("height", "width"), [(512, 512), (480, 640), (640, 480), (37, 900)])
def test_tiled_levels_are_disjoint_padded_and_inside(height: int, width: int) -> None:
    levels, (tiled_h, tiled_w) = tile_pyramid_levels(height, width)
    outer = PYRAMID_OUTER_PADDING
    assert levels[0] == LevelRect(outer, outer, outer + width - 1, outer + height - 1)
    assert tiled_w == width + 2 * outer
    sizes = pyramid_level_sizes(height, width)
    for level, (h, w) in zip(levels, sizes, strict=False):
        assert (level.height, level.width) == (h, w)
        assert outer <= level.left
        assert outer <= level.top
        assert level.right < tiled_w - outer
        assert level.bottom < tiled_h - outer
    for a, b in itertools.combinations(levels, 2):
        gap_x = max(a.left, b.left) - min(a.right, b.right) - 1
        gap_y = max(a.top, b.top) - min(a.bottom, b.bottom) - 1
        assert max(gap_x, gap_y) >= 0, f"{a} overlaps {b}"
    # Successive levels in the first column are exactly `padding` apart.
    first_column = [level for level in levels if level.left == outer]
    for upper, lower in itertools.pairwise(first_column):
        assert lower.top - upper.bottom - 1 == PYRAMID_PADDING


def test_tiled_pyramid_of_astronaut_size() -> None:
    # Worked by hand from dlib's compute_tiled_image_pyramid_details(): 24 levels (512 down
    # to 5); the first column stops after the 245-row level, once the next one fits beside
    # it and the column holds at least half of the total height.
    levels, size = tile_pyramid_levels(512, 512)
    assert size == (1895, 534)
    assert len(levels) == 24
    assert levels[:5] == (
        LevelRect(11, 11, 522, 522),
        LevelRect(11, 533, 436, 958),
        LevelRect(11, 969, 365, 1323),
        LevelRect(11, 1334, 305, 1628),
        LevelRect(11, 1639, 255, 1883),
    )
    # The second column climbs from the bottom, right-aligned.
    assert levels[5:7] == (LevelRect(319, 1680, 522, 1883), LevelRect(353, 1500, 522, 1669))
    assert levels[-1] == LevelRect(518, 559, 522, 563)


def test_pyramid_holds_the_image_and_mean_padding() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    pyramid = build_tiled_pyramid(image)
    first = pyramid.levels[0]
    np.testing.assert_array_equal(
        pyramid.image[first.top : first.bottom + 1, first.left : first.right + 1], image
    )
    # dlib zeroes its normalised tensor: the padding is the mean colour, not black.
    np.testing.assert_array_equal(pyramid.normalized[0, 0], 0)
    np.testing.assert_array_equal(pyramid.pixels[0, 0], np.array(INPUT_MEAN_RGB, np.float32))
    np.testing.assert_array_equal(pyramid.image[0, 0], np.rint(INPUT_MEAN_RGB))
    mean = np.asarray(INPUT_MEAN_RGB, dtype=np.float32)
    np.testing.assert_allclose(pyramid.normalized * 256 + mean, pyramid.pixels, atol=1e-4)
    np.testing.assert_array_equal(np.rint(pyramid.pixels), pyramid.image)
    assert pyramid.trunk_input().shape == (1, *pyramid.size, 3)
    assert pyramid.trunk_input().dtype == np.uint8
    assert pyramid.trunk_input(np.float32).dtype == np.float32


def test_grey_images_are_copied_into_rgb() -> None:
    grey = (np.arange(40 * 50) % 251).reshape(40, 50).astype(np.uint8)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(build_tiled_pyramid(grey).image, build_tiled_pyramid(rgb).image)


def test_pyramid_up_size_follows_rect_up() -> None:
    # pyramid_down<2>::rect_up() of the image rectangle, rounded: 2H+1 rows, 2W+2 columns.
    assert pyramid_up(_blank(7, 10)).shape == (15, 22, 3)


# ---------------------------------------------------------------------------------------
# dlib's bilinear resize, bit for bit (dlib is the reference)


@pytest.fixture(scope="module")
def dlib_module() -> Any:
    return pytest.importorskip("dlib", reason="dlib (dlib-bin) is the reference")


def test_pyramid_levels_match_dlib_resize(dlib_module: Any) -> None:
    rng = np.random.default_rng(1)
    pyramid = build_tiled_pyramid(rng.integers(0, 256, (97, 131, 3), dtype=np.uint8))
    for prev, level, plane in zip(
        pyramid.planes, pyramid.levels[1:], pyramid.planes[1:], strict=False
    ):
        for channel in range(3):
            src = np.ascontiguousarray(prev[:, :, channel])
            want = dlib_module.resize_image(src, level.height, level.width)
            np.testing.assert_array_equal(plane[:, :, channel], want)


@pytest.mark.parametrize(("height", "width"), [(5, 7), (33, 57), (120, 97)])
def test_pyramid_up_matches_dlib_resize(dlib_module: Any, height: int, width: int) -> None:
    rng = np.random.default_rng(height)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    want = dlib_module.resize_image(image, 2 * height + 1, 2 * width + 2)
    np.testing.assert_array_equal(pyramid_up(image), want)


# ---------------------------------------------------------------------------------------
# Score map -> boxes, and NMS


def test_cell_in_level_zero_is_an_80px_window() -> None:
    pyramid = build_tiled_pyramid(_blank(200, 300))
    (face,) = decode_detections(_hot_scores(pyramid, {_cell_at(110, 94): 2.0}), pyramid)
    # Centre (110, 94) of the tiled image is (99, 83) in the image; the window spans
    # +-39.5 around it, rounded half up.
    assert (face.left, face.top, face.right, face.bottom) == (60.0, 44.0, 139.0, 123.0)
    assert face.score == 2.0
    assert face.width == face.height == 80


def test_cell_in_level_one_is_scaled_up() -> None:
    pyramid = build_tiled_pyramid(_blank(200, 300))
    level = pyramid.levels[1]
    x = 8 * ((level.left + 60 - 14) // 8) + 14
    y = 8 * ((level.top + 60 - 14) // 8) + 14
    (face,) = decode_detections(_hot_scores(pyramid, {_cell_at(x, y): 1.0}), pyramid)
    # pyramid_down<6>::point_up(): p * 6/5 + 0.3, then rounded half up.
    lx, ly = x - level.left, y - level.top
    corners = [lx - 39.5, ly - 39.5, lx + 39.5, ly + 39.5]
    expected = [float(np.floor(v * 1.2 + 0.3 + 0.5)) for v in corners]
    assert [face.left, face.top, face.right, face.bottom] == expected


def test_threshold_is_strict_and_scores_come_best_first() -> None:
    pyramid = build_tiled_pyramid(_blank(300, 400))
    cells = {_cell_at(30, 30): 0.5, _cell_at(302, 30): 0.75, _cell_at(30, 206): 0.25}
    scores = _hot_scores(pyramid, cells)
    assert [d.score for d in decode_detections(scores, pyramid, 0.0)] == [0.75, 0.5, 0.25]
    assert [d.score for d in decode_detections(scores, pyramid, 0.5)] == [0.75]
    assert decode_detections(scores, pyramid, 0.75) == []


def test_overlapping_windows_keep_the_best() -> None:
    pyramid = build_tiled_pyramid(_blank(300, 400))
    cells = {_cell_at(110, 110): 1.0, _cell_at(126, 110): 3.0, _cell_at(302, 110): 0.5}
    faces = decode_detections(_hot_scores(pyramid, cells), pyramid)
    assert [d.score for d in faces] == [3.0, 0.5]


def test_nms_keeps_the_best_of_overlapping_boxes() -> None:
    a = [0, 0, 99, 99]
    # Shifted by 45: 5500 / (145*100) = 0.379 > 0.338, dropped.  The one shifted by 50
    # (5000/15000 = 0.333) stays: it is only compared with the boxes kept.
    boxes = np.array([a, [45, 0, 144, 99], [50, 0, 149, 99]], dtype=np.int64)
    np.testing.assert_array_equal(non_max_suppression(boxes), [0, 2])
    # Shifted by 25 both ways: 75*75 / (125*125) = 0.36, dropped.
    diagonal = np.array([a, [25, 25, 124, 124]], dtype=np.int64)
    np.testing.assert_array_equal(non_max_suppression(diagonal), [0])
    # Touching is not overlapping.
    apart = np.array([a, [100, 0, 199, 99]], dtype=np.int64)
    np.testing.assert_array_equal(non_max_suppression(apart), [0, 1])
    # A box inside another only goes through the percent-covered test, off at 1.0.
    nested = np.array([a, [40, 40, 59, 59]], dtype=np.int64)
    np.testing.assert_array_equal(non_max_suppression(nested), [0, 1])
    np.testing.assert_array_equal(non_max_suppression(nested, 0.338, 0.5), [0])


def test_nms_divides_by_the_bounding_box_not_the_union() -> None:
    # Shifted by 28 both ways: intersection 72*72 = 5184.  Over the union (14816) that is
    # 0.350, which would suppress; dlib divides by the bounding box, 128*128 = 16384:
    # 0.316 < 0.338, so both boxes stay.
    boxes = np.array([[0, 0, 99, 99], [28, 28, 127, 127]], dtype=np.int64)
    np.testing.assert_array_equal(non_max_suppression(boxes), [0, 1])


def test_detect_faces_maps_upsampled_boxes_back() -> None:
    seen: list[tuple[int, ...]] = []

    def trunk(tiled: NDArray[Any]) -> NDArray[np.float32]:
        seen.append(tiled.shape)
        scores = np.full((1, 1, *trunk_output_size(*tiled.shape[1:3])), -1.0, np.float32)
        scores[0, 0, 12, 12] = 1.5  # centred on (110, 110): (99, 99) in level 0
        return scores

    (face,) = detect_faces(_blank(100, 120), trunk)
    assert (face.left, face.top, face.right, face.bottom) == (60.0, 60.0, 139.0, 139.0)
    (small,) = detect_faces(_blank(100, 120), trunk, upsample_num_times=1)
    assert seen[1][2] == 2 * 120 + 2 + 2 * PYRAMID_OUTER_PADDING
    # pyramid_down<2>::rect_down(): p / 2 - (1.25, 0.75), rounded half up.
    assert (small.left, small.top, small.right, small.bottom) == (29.0, 29.0, 68.0, 69.0)
    assert small.score == 1.5
    detect_faces(_blank(100, 120), trunk, trunk_dtype=np.float32)
    assert len(seen) == 3


def test_tiny_images_never_reach_the_trunk() -> None:
    def trunk(tiled: NDArray[Any]) -> NDArray[np.float32]:
        raise AssertionError("the trunk should not run")

    assert detect_faces(_blank(3, 3), trunk) == []


# ---------------------------------------------------------------------------------------
# Parity with dlib, through the ONNX trunk


@dataclass
class OnnxTrunk:
    """The detector trunk in onnxruntime, fed the pixel type its input declares."""

    session: Any
    input_name: str
    dtype: type[np.generic]

    def __call__(self, tiled: NDArray[Any]) -> NDArray[np.float32]:
        scores = self.session.run(None, {self.input_name: tiled})[0]
        return np.asarray(scores, dtype=np.float32)

    def detect(self, image: Image, upsample_num_times: int = 0) -> list[Detection]:
        return detect_faces(image, self, upsample_num_times, trunk_dtype=self.dtype)


@pytest.fixture(scope="module")
def trunk(model_repo: Path) -> OnnxTrunk:
    path = Path(os.environ.get(DETECTOR_ONNX_ENV, onnx_path(model_repo, "face_detector")))
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (feed,) = session.get_inputs()
    dtypes: dict[str, type[np.generic]] = {"tensor(uint8)": np.uint8, "tensor(float)": np.float32}
    if feed.type not in dtypes:
        pytest.fail(f"the detector's input is {feed.type}; expected uint8 or float pixels")
    return OnnxTrunk(session, feed.name, dtypes[feed.type])


@dataclass
class DlibDetector:
    """dlib.cnn_face_detection_model_v1, answering in our Detection type."""

    model: Callable[[Image, int], Any]

    def __call__(self, image: Image, upsample_num_times: int = 0) -> list[Detection]:
        return [
            Detection(
                float(found.rect.left()),
                float(found.rect.top()),
                float(found.rect.right()),
                float(found.rect.bottom()),
                float(found.confidence),
            )
            for found in self.model(image, upsample_num_times)
        ]


@pytest.fixture(scope="module")
def dlib_detector(dlib_module: Any) -> DlibDetector:
    return DlibDetector(dlib_module.cnn_face_detection_model_v1(str(detector_weights())))


@pytest.fixture(scope="module")
def astronaut() -> Image:
    data = pytest.importorskip("skimage.data")
    return np.ascontiguousarray(data.astronaut(), dtype=np.uint8)


def test_astronaut_matches_dlib_reference(trunk: OnnxTrunk, astronaut: Image) -> None:
    (face,) = trunk.detect(astronaut)
    assert _box(face) == ASTRONAUT_BOX
    assert face.score == pytest.approx(ASTRONAUT_SCORE, abs=SCORE_TOLERANCE)


def test_astronaut_matches_dlib(
    trunk: OnnxTrunk, dlib_detector: DlibDetector, astronaut: Image
) -> None:
    _assert_same_faces(trunk.detect(astronaut), dlib_detector(astronaut))


def _photos() -> Iterator[tuple[str, int]]:
    """(path under FACES_DIR, upsample_num_times) of each distinct test photograph."""
    if not FACES_DIR.is_dir():
        return
    patterns = ["knn/train/*/*", "knn/test/*", "misc/*.jpg"]
    seen: set[str] = set()
    for path in (p for pattern in patterns for p in sorted(FACES_DIR.glob(pattern))):
        digest = hashlib.sha1(path.read_bytes()).hexdigest()
        if digest in seen:
            continue  # the same photograph under another name
        seen.add(digest)
        name = path.relative_to(FACES_DIR).as_posix()
        yield name, 0
        if name in UPSAMPLE_ONCE:
            yield name, 1


PHOTOS = list(_photos())


def _load(name: str) -> Image:
    from PIL import Image as PILImage

    with PILImage.open(FACES_DIR / name) as photo:
        rgb = photo.convert("RGB")
    scale = MAX_SIDE / max(rgb.size)
    if scale < 1:
        size = (round(rgb.width * scale), round(rgb.height * scale))
        rgb = rgb.resize(size, PILImage.Resampling.LANCZOS)
    return np.asarray(rgb, dtype=np.uint8)


@pytest.mark.skipif(not PHOTOS, reason=f"no test photographs under {FACES_DIR}")
@pytest.mark.parametrize(("name", "upsample"), PHOTOS or [("none", 0)])
def test_photo_matches_dlib(
    trunk: OnnxTrunk, dlib_detector: DlibDetector, name: str, upsample: int
) -> None:
    image = _load(name)
    _assert_same_faces(trunk.detect(image, upsample), dlib_detector(image, upsample))
