"""Pre- and post-processing around dlib's MMOD CNN face detector.

The network itself (the "trunk": three stride-2 5x5 convolutions, three 5x5 and one 9x9
convolution) runs elsewhere, in onnxruntime or Triton.  This module does what dlib does
around it, so that the same trunk gives the same faces as
``dlib.cnn_face_detection_model_v1``:

1. optional upsampling, as the Python binding's ``upsample_num_times`` does it;
2. the *tiled image pyramid* of ``input_rgb_image_pyramid<pyramid_down<6>>``: every level
   (5/6 of the previous one) is packed into one image, so that a single pass of the
   fully convolutional trunk scans all scales at once;
3. ``loss_mmod_::to_label``: every score-map cell above the threshold becomes an 80x80
   window in the tiled image, mapped back to the level it lies in and up to the original
   image, then greedy non-maximum suppression.

Only numpy is needed.  The arithmetic follows dlib 20.0 (``dlib-bin``, CPU build) closely
enough to reproduce its float pyramid bit for bit, and its integer rectangles exactly.

dlib builds the pyramid in float, in the network's input space.  Fed as float32 pixels
(``TiledPyramid.pixels``), the trunk reproduces dlib's scores to about 2e-6.  Fed as uint8
(``TiledPyramid.image``), the smaller levels are rounded to whole grey levels, which moves
scores by up to about 1.5e-3 and can swap two neighbouring windows whose scores nearly tie
(one photo of the test set: a box 10 pixels off).

Conventions: images are H x W x 3 RGB ``uint8``.  Rectangles are dlib's: inclusive integer
pixel coordinates, so ``width = right - left + 1``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any

import numpy as np
from numpy.typing import DTypeLike, NDArray

# input_rgb_image_pyramid<pyramid_down<6>>: each level is 5/6 of the one above.
PYRAMID_DOWNSAMPLING = 6
PYRAMID_RATE = (PYRAMID_DOWNSAMPLING - 1.0) / PYRAMID_DOWNSAMPLING
# dlib's defaults for an "input_rgb_image_pyramid" record (the .dat file predates the
# "input_rgb_image_pyramid2" record that stores them).
PYRAMID_PADDING = 10
PYRAMID_OUTER_PADDING = 11
# compute_tiled_image_pyramid_details() stops before a level lower than this.
MIN_LEVEL_HEIGHT = 5
# The input layer's per-channel mean; the network sees (pixel - mean) / 256.
INPUT_MEAN_RGB = (122.782, 117.001, 104.298)

# loss_mmod_ options stored in mmod_human_face_detector.dat (mmod_options version 1).
# They are parameters below so that a reader of the .dat file can pass its own values.
WINDOW_WIDTH = 80
WINDOW_HEIGHT = 80
NMS_IOU_THRESHOLD = 0.3382761351109955
NMS_PERCENT_COVERED_THRESHOLD = 1.0

# Three stride-2 5x5 convolutions without padding: output cell c sees input pixel 8c+14.
TRUNK_STRIDE = 8
TRUNK_OFFSET = 14

Float32Array = NDArray[np.float32]
UInt8Image = NDArray[np.uint8]
RunTrunk = Callable[[NDArray[Any]], Float32Array]


@dataclass(frozen=True)
class LevelRect:
    """Where one pyramid level lies in the tiled image (inclusive pixel coordinates)."""

    left: int
    top: int
    right: int
    bottom: int

    @property
    def width(self) -> int:
        return self.right - self.left + 1

    @property
    def height(self) -> int:
        return self.bottom - self.top + 1


@dataclass(frozen=True, eq=False)
class TiledPyramid:
    """dlib's tiled image pyramid, and the trunk input made from it.

    dlib builds the pyramid in the network's input space, (pixel - mean) / 256, with zeros
    (the mean colour) between the levels; ``planes`` hold each level that way, bit for bit
    as dlib computes them.  ``pixels`` turns the tiled tensor back into float32 pixel values
    (exact up to float rounding: what a float32 trunk input needs to reproduce dlib);
    ``image`` rounds it to uint8 (level 0 stays the input image, the padding becomes
    123/117/104, the smaller levels lose up to half a grey level).
    """

    levels: tuple[LevelRect, ...]  # levels[0] holds the input image, then 5/6 each
    size: tuple[int, int]  # (height, width) of the tiled image
    source: UInt8Image  # level 0: the H x W x 3 RGB image the pyramid was built from
    planes: tuple[Float32Array, ...]  # every level, h x w x 3, (pixel - mean) / 256

    @cached_property
    def image(self) -> UInt8Image:
        """The tiled pyramid as uint8 RGB, H x W x 3."""
        tiled = _filled(self.size, np.rint(_mean()).astype(np.uint8))
        for level, plane in zip(self.levels[1:], self.planes[1:], strict=True):
            pixels = np.rint(_to_pixel_values(plane))
            _level_view(tiled, level)[:] = np.clip(pixels, 0, 255)
        if self.levels:
            _level_view(tiled, self.levels[0])[:] = self.source
        return tiled

    @cached_property
    def pixels(self) -> Float32Array:
        """The tiled pyramid as float32 RGB pixel values, H x W x 3."""
        tiled = _filled(self.size, _mean())
        for level, plane in zip(self.levels[1:], self.planes[1:], strict=True):
            _level_view(tiled, level)[:] = _to_pixel_values(plane)
        if self.levels:
            _level_view(tiled, self.levels[0])[:] = self.source
        return tiled

    @cached_property
    def normalized(self) -> Float32Array:
        """dlib's input tensor, H x W x 3 (channels last): (pixel - mean) / 256."""
        tiled = np.zeros((*self.size, 3), dtype=np.float32)
        for level, plane in zip(self.levels, self.planes, strict=True):
            _level_view(tiled, level)[:] = plane
        return tiled

    def trunk_input(self, dtype: DTypeLike = np.uint8) -> NDArray[Any]:
        """The [1, H, W, 3] batch for the trunk, uint8 (``image``) or float32 (``pixels``)."""
        kind = np.dtype(dtype)
        if kind == np.uint8:
            return self.image[None]
        if kind == np.float32:
            return self.pixels[None]
        raise ValueError(f"the trunk takes uint8 or float32 pixels, not {kind}")


@dataclass(frozen=True)
class Detection:
    """A face box in dlib's inclusive-rectangle convention, in original image pixels.

    The coordinates are whole numbers, as dlib's ``rectangle`` is; they are floats only so
    that callers can treat them as continuous coordinates.
    """

    left: float
    top: float
    right: float
    bottom: float
    score: float

    @property
    def width(self) -> float:
        return self.right - self.left + 1

    @property
    def height(self) -> float:
        return self.bottom - self.top + 1


# ---------------------------------------------------------------------------------------
# Tiled pyramid geometry


def pyramid_level_sizes(height: int, width: int) -> list[tuple[int, int]]:
    """(height, width) of every level dlib keeps, largest first."""
    if height * width == 0:
        return []
    sizes = [(height, width)]
    while True:
        height = math.floor(PYRAMID_RATE * height)
        width = math.floor(PYRAMID_RATE * width)
        if height * width == 0 or height < MIN_LEVEL_HEIGHT:
            return sizes
        sizes.append((height, width))


def tile_pyramid_levels(
    height: int,
    width: int,
    padding: int = PYRAMID_PADDING,
    outer_padding: int = PYRAMID_OUTER_PADDING,
) -> tuple[tuple[LevelRect, ...], tuple[int, int]]:
    """Place the pyramid levels in one image, as compute_tiled_image_pyramid_details().

    The levels go down a first column until the rest can fold back up a second column,
    right-aligned, from the bottom.  Returns the level rectangles and the tiled image's
    (height, width).  Levels that would overlap the first one are dropped, as in dlib.
    """
    sizes = pyramid_level_sizes(height, width)
    if not sizes:
        return (), (0, 0)
    first_h, first_w = sizes[0]
    total_height = sum(h + padding for h, _ in sizes) - 2 * padding
    column_height = 0
    prev_width = 0
    for h, w in sizes:
        fits_beside = w <= first_w - prev_width - padding
        if fits_beside and (column_height - first_h) * 2 >= total_height - first_h:
            break
        column_height += h + padding
        prev_width = w
    column_height -= padding

    rects: list[LevelRect] = []
    y = outer_padding
    for h, w in sizes:
        if y >= column_height + outer_padding:
            break
        rects.append(LevelRect(outer_padding, y, outer_padding + w - 1, y + h - 1))
        y += h + padding
    y -= padding
    right = outer_padding + first_w - 1
    for h, w in sizes[len(rects) :]:
        rect = LevelRect(right - w + 1, y - h, right, y - 1)
        if _intersects(rects[0], rect):
            break
        rects.append(rect)
        y -= h + padding
    return tuple(rects), (column_height + 2 * outer_padding, first_w + 2 * outer_padding)


def _intersects(a: LevelRect, b: LevelRect) -> bool:
    return max(a.left, b.left) <= min(a.right, b.right) and max(a.top, b.top) <= min(
        a.bottom, b.bottom
    )


# ---------------------------------------------------------------------------------------
# dlib's bilinear resize_image(), reproduced bit for bit
#
# dlib vectorises the columns four at a time in float32 (SSE), accumulating the sample
# position in float32 and truncating it, and finishes the last few columns in double
# precision.  The same operations in the same order give the same bits, which matters
# because each pyramid level is resized from the previous one.  Images are H x W x C and
# handled as H x (W*C) rows, every channel of a column sharing its weights.


@dataclass(frozen=True)
class _Axis:
    """Sample positions of one axis: dlib maps output i to input i*(n_in-1)/(n_out-1)."""

    low: NDArray[np.intp]
    high: NDArray[np.intp]
    frac: NDArray[np.float64]  # fraction towards `high`, as dlib computes it

    def spread(self, channels: int) -> _Axis:
        """The same positions over interleaved channels (indices into W*C)."""
        offsets = np.arange(channels)
        return _Axis(
            (self.low[:, None] * channels + offsets).ravel(),
            (self.high[:, None] * channels + offsets).ravel(),
            np.repeat(self.frac, channels),
        )


@dataclass(frozen=True)
class _ColumnPlan:
    simd: _Axis  # columns done four at a time in float32 (frac holds float32 values)
    tail: _Axis  # the remaining columns, done in double precision


def _row_axis(n_in: int, n_out: int) -> _Axis:
    scale = (n_in - 1) / max(n_out - 1, 1)
    # dlib accumulates y += scale in double, starting from -scale.
    steps = np.full(n_out + 1, scale)
    steps[0] = -scale
    y = np.cumsum(steps)[1:]
    low = np.floor(y).astype(np.intp)
    return _Axis(low, np.minimum(low + 1, n_in - 1), y - low)


@lru_cache(maxsize=1024)  # an image's levels have the same sizes every time
def _column_plan(n_in: int, n_out: int, channels: int) -> _ColumnPlan:
    scale = (n_in - 1) / max(n_out - 1, 1)
    groups = n_out // 4 + 2
    start = -4 * scale
    steps = np.empty((groups + 1, 4), dtype=np.float32)
    steps[0] = [start + k * scale for k in range(4)]
    steps[1:] = np.float32(4 * scale)
    x = np.cumsum(steps, axis=0, dtype=np.float32)[1:]  # sequential float32 sums
    left = x.astype(np.int32)  # truncation, as _mm_cvttps_epi32
    frac = x - left.astype(np.float32)
    # The vector loop stops at the first group whose last lane would read past the edge.
    past_edge = left[:, 3] + 1 >= n_in
    n_simd = min(4 * int(np.argmax(past_edge)) if past_edge.any() else n_out, n_out)
    simd_left = left.reshape(-1)[:n_simd].astype(np.intp)
    simd = _Axis(simd_left, simd_left + 1, frac.reshape(-1)[:n_simd].astype(np.float64))
    # The scalar loop restarts at x = -scale + n_simd*scale and accumulates in double.
    tail_steps = np.full(n_out - n_simd + 1, scale)
    tail_steps[0] = -scale + n_simd * scale
    tail_x = np.cumsum(tail_steps)[1:]
    tail_left = np.floor(tail_x).astype(np.intp)
    tail = _Axis(tail_left, np.minimum(tail_left + 1, n_in - 1), tail_x - tail_left)
    return _ColumnPlan(simd.spread(channels), tail.spread(channels))


# Rows are blended a band at a time: small temporaries stay in cache and are recycled by
# the allocator instead of being freshly mapped (page faults dominate otherwise).
_BAND_ELEMENTS = 1 << 16


def _resize(src: NDArray[Any], n_rows: int, n_cols: int, out_dtype: type[Any]) -> NDArray[Any]:
    """dlib's resize_image() of an H x W x C image, float32 or uint8 (truncated) out."""
    height, width, channels = src.shape
    rows = _row_axis(height, n_rows)
    cols = _column_plan(width, n_cols, channels)
    flat = src.reshape(height, width * channels)
    out = np.empty((n_rows, n_cols * channels), dtype=out_dtype)
    n_simd = cols.simd.low.size
    # dlib's scalar loop blends along x in float32 for float images, in double for RGB.
    x_type = np.float32 if out_dtype == np.float32 else np.float64
    band = max(1, _BAND_ELEMENTS // out.shape[1])
    for start in range(0, n_rows, band):
        stop = min(start + band, n_rows)
        first, last = int(rows.low[start]), int(rows.high[stop - 1])
        part = flat[first : last + 1]
        local = _Axis(
            rows.low[start:stop] - first, rows.high[start:stop] - first, rows.frac[start:stop]
        )
        if n_simd:
            out[start:stop, :n_simd] = _blend_simd(part, local, cols.simd)  # uint8: truncates
        if cols.tail.low.size:
            out[start:stop, n_simd:] = _blend_scalar(part, local, cols.tail, x_type)
    return out.reshape(n_rows, n_cols, channels)


def _corners(src: NDArray[Any], rows: _Axis, cols: _Axis) -> tuple[Float32Array, ...]:
    """Top-left, top-right, bottom-left and bottom-right samples, as float32."""
    # Columns first: the row gathers that follow copy whole rows, which is cheap.
    left = np.take(src, cols.low, axis=1)
    right = np.take(src, cols.high, axis=1)
    return tuple(
        np.take(side, r, axis=0).astype(np.float32, copy=False)
        for r in (rows.low, rows.high)
        for side in (left, right)
    )


def _blend_simd(src: NDArray[Any], rows: _Axis, cols: _Axis) -> Float32Array:
    # Four float32 weights per pixel, products summed left to right, as the SSE loop.
    tb = rows.frac.astype(np.float32)[:, None]
    inv_tb = (1.0 - rows.frac).astype(np.float32)[:, None]
    lr = cols.frac.astype(np.float32)[None, :]
    inv_lr = np.float32(1.0) - lr
    corners = _corners(src, rows, cols)
    out: Float32Array = np.multiply(inv_tb, inv_lr)
    out *= corners[0]
    term = np.empty_like(out)
    for (row_w, col_w), sample in zip(
        [(inv_tb, lr), (tb, inv_lr), (tb, lr)], corners[1:], strict=True
    ):
        np.multiply(row_w, col_w, out=term)
        term *= sample
        out += term
    return out


def _blend_scalar(
    src: NDArray[Any], rows: _Axis, cols: _Axis, x_type: type[np.floating[Any]]
) -> NDArray[np.float64]:
    # A blend along x (in x_type), then one along y in double precision.
    top_left, top_right, bottom_left, bottom_right = (
        c.astype(x_type) for c in _corners(src, rows, cols)
    )
    lr = cols.frac.astype(x_type)[None, :]
    inv_lr = x_type(1.0) - lr
    top = (inv_lr * top_left + lr * top_right).astype(np.float64)
    bottom = (inv_lr * bottom_left + lr * bottom_right).astype(np.float64)
    tb = rows.frac[:, None]
    blended: NDArray[np.float64] = (1.0 - tb) * top + tb * bottom
    return blended


# ---------------------------------------------------------------------------------------
# Pre-processing


def pyramid_up(image: UInt8Image) -> UInt8Image:
    """Double an RGB image as dlib's pyramid_up(img, pyramid_down<2>) does.

    The output size comes from pyramid_down<2>::rect_up() of the image rectangle, which
    gives 2*H+1 rows and 2*W+2 columns; the whole image is stretched over it bilinearly.
    """
    rgb = _as_rgb(image)
    height, width = rgb.shape[:2]
    bottom = int(_round_half_up((height - 1 + 0.75) * 2))
    right = int(_round_half_up((width - 1 + 1.25) * 2))
    return _resize(np.ascontiguousarray(rgb), bottom + 1, right + 1, np.uint8)


def build_tiled_pyramid(
    image: UInt8Image,
    *,
    padding: int = PYRAMID_PADDING,
    outer_padding: int = PYRAMID_OUTER_PADDING,
) -> TiledPyramid:
    """The tiled pyramid that dlib's input_rgb_image_pyramid<pyramid_down<6>> builds.

    Why tiled: the detector has one 80x80 window; scale invariance comes from scanning
    smaller and smaller copies of the image.  Packing the copies into one image, with
    padding so that windows do not straddle two levels, lets one trunk pass do them all.
    """
    rgb = np.ascontiguousarray(_as_rgb(image))
    levels, size = tile_pyramid_levels(rgb.shape[0], rgb.shape[1], padding, outer_padding)
    planes: list[Float32Array] = []
    if levels:
        # As dlib: (pixel - mean) in float32, then / 256; each level resized from the last.
        planes.append(_to_normalized(rgb))
    for level in levels[1:]:
        planes.append(_resize(planes[-1], level.height, level.width, np.float32))
    return TiledPyramid(levels, size, rgb, tuple(planes))


# Per-pixel colour arithmetic is done on H x (W*3) rows against a whole row of colour:
# numpy is several times faster at that than at broadcasting a 3-vector.


def _colour_row(colour: NDArray[Any], width: int) -> NDArray[Any]:
    return np.tile(colour, width)


def _filled(size: tuple[int, int], colour: NDArray[Any]) -> NDArray[Any]:
    """An H x W x 3 image of one colour."""
    height, width = size
    tiled = np.empty((height, width * 3), dtype=colour.dtype)
    tiled[:] = _colour_row(colour, width)
    return tiled.reshape(height, width, 3)


def _to_normalized(rgb: UInt8Image) -> Float32Array:
    height, width = rgb.shape[:2]
    rows = rgb.reshape(height, width * 3).astype(np.float32)
    rows -= _colour_row(_mean(), width)
    rows /= np.float32(256)
    return rows.reshape(height, width, 3)


def _to_pixel_values(plane: Float32Array) -> Float32Array:
    height, width = plane.shape[:2]
    rows = plane.reshape(height, width * 3) * np.float32(256)
    rows += _colour_row(_mean(), width)
    return rows.reshape(height, width, 3)


def _mean() -> Float32Array:
    return np.asarray(INPUT_MEAN_RGB, dtype=np.float32)


def _as_rgb(image: UInt8Image) -> UInt8Image:
    # dlib's binding accepts 8-bit grey images too, and copies grey into R, G and B.
    if image.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 RGB image, got shape {image.shape}")
    return image


def _level_view(tiled: NDArray[Any], level: LevelRect) -> NDArray[Any]:
    return tiled[level.top : level.bottom + 1, level.left : level.right + 1]


# ---------------------------------------------------------------------------------------
# Post-processing


def decode_detections(
    scores: Float32Array,
    pyramid: TiledPyramid,
    threshold: float = 0.0,
    *,
    window_width: int = WINDOW_WIDTH,
    window_height: int = WINDOW_HEIGHT,
    nms_iou_threshold: float = NMS_IOU_THRESHOLD,
    nms_percent_covered_threshold: float = NMS_PERCENT_COVERED_THRESHOLD,
) -> list[Detection]:
    """Score map (H', W') of the trunk -> faces in the image the pyramid was built from.

    As loss_mmod_::to_label: cells scoring above ``threshold`` become windows centred on
    their input pixel, mapped to the nearest pyramid level and up to level-0 pixels, rounded
    to dlib's integer rectangles; then greedy non-maximum suppression, best score first.
    The window size and NMS thresholds are loss_mmod_ options stored in the model file;
    the defaults are those of mmod_human_face_detector.dat.
    """
    if scores.ndim != 2:
        raise ValueError(f"expected a 2-D score map, got shape {scores.shape}")
    rows, cols = np.nonzero(scores > threshold)
    if rows.size == 0 or not pyramid.levels:
        return []
    confidence = scores[rows, cols].astype(np.float64)
    boxes = _cells_to_image_boxes(rows, cols, pyramid.levels, window_width, window_height)
    order = np.argsort(-confidence, kind="stable")
    keep = non_max_suppression(boxes[order], nms_iou_threshold, nms_percent_covered_threshold)
    return [_detection(boxes[i], confidence[i]) for i in order[keep]]


def _cells_to_image_boxes(
    rows: NDArray[np.intp],
    cols: NDArray[np.intp],
    levels: Sequence[LevelRect],
    window_width: int,
    window_height: int,
) -> NDArray[np.int64]:
    """(N, 4) integer boxes (left, top, right, bottom) in level-0 pixels."""
    cx = (TRUNK_STRIDE * cols + TRUNK_OFFSET).astype(np.float64)
    cy = (TRUNK_STRIDE * rows + TRUNK_OFFSET).astype(np.float64)
    half_w = (window_width - 1) / 2  # centered_drect() spans width-1 between corners
    half_h = (window_height - 1) / 2
    left, right, top, bottom = cx - half_w, cx + half_w, cy - half_h, cy + half_h
    level = _nearest_level(_round_half_up(cx), _round_half_up(cy), levels)
    origin_x = np.array([r.left for r in levels], dtype=np.float64)[level]
    origin_y = np.array([r.top for r in levels], dtype=np.float64)[level]
    corners = np.stack([left - origin_x, top - origin_y, right - origin_x, bottom - origin_y])
    return _round_half_up(_point_up(corners, level)).T


def _nearest_level(
    x: NDArray[np.int64], y: NDArray[np.int64], levels: Sequence[LevelRect]
) -> NDArray[np.intp]:
    """Index of the level rectangle nearest each point, first one on ties (nearest_rect)."""
    lefts = np.array([[r.left] for r in levels])
    tops = np.array([[r.top] for r in levels])
    rights = np.array([[r.right] for r in levels])
    bottoms = np.array([[r.bottom] for r in levels])
    dx = np.clip(x[None, :], lefts, rights) - x[None, :]
    dy = np.clip(y[None, :], tops, bottoms) - y[None, :]
    nearest: NDArray[np.intp] = np.argmin(dx * dx + dy * dy, axis=0)
    return nearest


def _point_up(points: NDArray[np.float64], level: NDArray[np.intp]) -> NDArray[np.float64]:
    """pyramid_down<6>::point_up() applied `level` times, column by column."""
    ratio = PYRAMID_DOWNSAMPLING / (PYRAMID_DOWNSAMPLING - 1.0)
    points = points.copy()
    for step in range(int(level.max(initial=0))):
        up = level > step
        points[:, up] = points[:, up] * ratio + 0.3
    return points


def _round_half_up(values: NDArray[np.float64] | float) -> NDArray[np.int64]:
    # dlib converts drectangle/dpoint to integers with floor(x + 0.5).
    return np.floor(np.asarray(values, dtype=np.float64) + 0.5).astype(np.int64)


def _detection(box: NDArray[np.int64], score: np.float64) -> Detection:
    left, top, right, bottom = (float(v) for v in box)
    return Detection(left, top, right, bottom, float(score))


def non_max_suppression(
    boxes: NDArray[np.int64],
    iou_threshold: float = NMS_IOU_THRESHOLD,
    percent_covered_threshold: float = NMS_PERCENT_COVERED_THRESHOLD,
) -> NDArray[np.intp]:
    """Greedy NMS over (N, 4) inclusive boxes already sorted best first; kept indices.

    A box is dropped when it overlaps an already kept one by dlib's test_box_overlap:
    intersection over the area of the two boxes' *bounding box* (not their union) above
    ``iou_threshold``, or intersection over either box's area above
    ``percent_covered_threshold``.
    """
    suppressed = np.zeros(len(boxes), dtype=bool)
    kept: list[int] = []
    for i in range(len(boxes)):
        if suppressed[i]:
            continue
        kept.append(i)
        later = slice(i + 1, None)
        suppressed[later] |= _overlaps(
            boxes[i], boxes[later], iou_threshold, percent_covered_threshold
        )
    return np.asarray(kept, dtype=np.intp)


def _overlaps(
    box: NDArray[np.int64],
    others: NDArray[np.int64],
    iou_threshold: float,
    percent_covered_threshold: float,
) -> NDArray[np.bool_]:
    """dlib's test_box_overlap(box, other) for each of `others`."""
    inner = _area(
        np.maximum(others[:, 0], box[0]),
        np.maximum(others[:, 1], box[1]),
        np.minimum(others[:, 2], box[2]),
        np.minimum(others[:, 3], box[3]),
    ).astype(np.float64)
    bounding = _area(
        np.minimum(others[:, 0], box[0]),
        np.minimum(others[:, 1], box[1]),
        np.maximum(others[:, 2], box[2]),
        np.maximum(others[:, 3], box[3]),
    )
    own = _area(box[0], box[1], box[2], box[3])
    theirs = _area(others[:, 0], others[:, 1], others[:, 2], others[:, 3])
    with np.errstate(divide="ignore", invalid="ignore"):
        hit = (
            (inner / bounding > iou_threshold)
            | (inner / own > percent_covered_threshold)
            | (inner / theirs > percent_covered_threshold)
        )
    return hit & (inner > 0)


def _area(
    left: NDArray[np.int64] | np.int64,
    top: NDArray[np.int64] | np.int64,
    right: NDArray[np.int64] | np.int64,
    bottom: NDArray[np.int64] | np.int64,
) -> NDArray[np.int64]:
    # dlib's rectangle::area(): 0 for an empty rectangle, else inclusive width*height.
    width = np.asarray(right - left + 1)
    height = np.asarray(bottom - top + 1)
    return np.where((width > 0) & (height > 0), width * height, 0)


# ---------------------------------------------------------------------------------------
# The whole pipeline


def trunk_output_size(height: int, width: int) -> tuple[int, int]:
    """Score-map size for a tiled image of this size (three valid stride-2 5x5 convs)."""
    for _ in range(3):
        height = (height - 5) // 2 + 1
        width = (width - 5) // 2 + 1
    return max(height, 0), max(width, 0)


def detect_faces(
    image: UInt8Image,
    run_trunk: RunTrunk,
    upsample_num_times: int = 0,
    threshold: float = 0.0,
    *,
    trunk_dtype: DTypeLike = np.uint8,
) -> list[Detection]:
    """Faces in an RGB (or grey) uint8 image, as dlib.cnn_face_detection_model_v1 finds them.

    ``run_trunk`` takes the [1, H, W, 3] tiled pyramid and returns the [1, 1, H', W'] float32
    score map, so onnxruntime in-process and a Triton client fit alike.  The pyramid goes in
    as ``trunk_dtype`` pixels: uint8, or float32, which keeps the smaller levels unrounded
    and reproduces dlib's scores to about 1e-6 instead of about 1e-3.  The image is first
    upsampled ``upsample_num_times`` times, as the dlib binding does, to find faces smaller
    than the 80x80 window; boxes are mapped back to the original image.
    """
    if upsample_num_times < 0:
        raise ValueError("upsample_num_times must be >= 0")
    rgb = _as_rgb(image)
    for _ in range(upsample_num_times):
        rgb = pyramid_up(rgb)
    pyramid = build_tiled_pyramid(rgb)
    if min(trunk_output_size(*pyramid.size)) < 1:
        return []  # too small for the trunk to produce a single cell
    scores = np.asarray(run_trunk(pyramid.trunk_input(trunk_dtype)))
    if scores.ndim != 4 or scores.shape[:2] != (1, 1):
        raise ValueError(f"expected a [1, 1, H', W'] score map, got shape {scores.shape}")
    detections = decode_detections(scores[0, 0], pyramid, threshold)
    return [rect_down(d, upsample_num_times) for d in detections]


def rect_down(detection: Detection, levels: int) -> Detection:
    """pyramid_down<2>::rect_down(rect, levels), rounded back to integers."""
    if levels == 0:
        return detection
    corners = np.array(
        [detection.left, detection.top, detection.right, detection.bottom], dtype=np.float64
    )
    offset = np.array([1.25, 0.75, 1.25, 0.75])
    for _ in range(levels):
        corners = corners / 2.0 - offset
    left, top, right, bottom = (float(v) for v in _round_half_up(corners))
    return Detection(left, top, right, bottom, detection.score)
