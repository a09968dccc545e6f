"""Where to look for faces in a sampled frame: the whole frame, or only around tracks.

Detection is most of the cost of a processed frame (about 95 ms of a core for 640x360
on the CPU, more than decoding, embedding and search together). Between full-frame
detections, a face that is already tracked can only be near where its track predicts
it, so only a region around each such track is searched: a square of
``REGION_FACES`` (2.5) times the face's size, centred on the predicted box, which is a small
part of the frame. Overlapping squares are merged into their bounding rectangle; when
the regions would cover most of the frame, the whole frame is searched instead.

The detector returns boxes and landmarks in the region's pixels; `to_frame` moves them
back into the frame's. Sizes, quality measures and the aligned chip do not depend on
where the face was cut from, as long as the region holds the whole face and some
context, which the margin guarantees for a face that moved less than its own size.
"""

from __future__ import annotations

from dataclasses import dataclass

from facegrid.v1 import common_pb2

from facegrid_ingest.tracker import Box

# Side of a region in face sizes: three quarters of a face of margin on each side.
REGION_FACES = 2.5
# Smallest region side in detector windows of the smallest findable face.
MIN_REGION_FACES = 2.0
# Above this share of the frame, the regions are not worth it: search the whole frame.
MAX_REGION_SHARE = 0.6


@dataclass(frozen=True)
class Region:
    """A rectangle of the frame, in whole pixels: left, top, right, bottom (exclusive)."""

    left: int
    top: int
    right: int
    bottom: int

    @property
    def area(self) -> int:
        return (self.right - self.left) * (self.bottom - self.top)

    def overlaps(self, other: Region) -> bool:
        return (
            self.left < other.right
            and other.left < self.right
            and self.top < other.bottom
            and other.top < self.bottom
        )

    def union(self, other: Region) -> Region:
        return Region(
            min(self.left, other.left),
            min(self.top, other.top),
            max(self.right, other.right),
            max(self.bottom, other.bottom),
        )


def regions_around(
    boxes: list[Box], width: int, height: int, min_face_size: int
) -> list[Region] | None:
    """Regions that hold these predicted face boxes with a margin; None: search it all."""
    if width <= 0 or height <= 0:
        return None
    found: list[Region] = []
    smallest_side = MIN_REGION_FACES * min_face_size
    for left, top, box_width, box_height in boxes:
        side = max(REGION_FACES * max(box_width, box_height), smallest_side)
        centre_x, centre_y = left + box_width / 2.0, top + box_height / 2.0
        region = Region(
            max(0, int(centre_x - side / 2.0)),
            max(0, int(centre_y - side / 2.0)),
            min(width, int(centre_x + side / 2.0 + 1)),
            min(height, int(centre_y + side / 2.0 + 1)),
        )
        if region.right - region.left < 1 or region.bottom - region.top < 1:
            continue  # predicted off the frame: left it, found again by a full detection
        found.append(region)
    merged = _merge(found)
    if sum(region.area for region in merged) > MAX_REGION_SHARE * width * height:
        return None
    return merged


def _merge(regions: list[Region]) -> list[Region]:
    """Merge overlapping regions until none overlap (a union can reach a third one)."""
    pending = list(regions)
    merged: list[Region] = []
    while pending:
        current = pending.pop()
        changed = True
        while changed:
            changed = False
            for other in list(pending):
                if current.overlaps(other):
                    current = current.union(other)
                    pending.remove(other)
                    changed = True
            for other in list(merged):
                if current.overlaps(other):
                    current = current.union(other)
                    merged.remove(other)
                    changed = True
        merged.append(current)
    return sorted(merged, key=lambda r: (r.top, r.left))


def to_frame(
    face: common_pb2.FaceDetail, region: Region, width: int, height: int
) -> common_pb2.FaceDetail:
    """The face found in ``region``, with its box and landmarks in the frame's pixels."""
    moved = common_pb2.FaceDetail()
    moved.CopyFrom(face)
    box = moved.bounding_box
    box.left += region.left
    box.top += region.top
    box.left_ratio = box.left / width
    box.top_ratio = box.top / height
    box.width_ratio = box.width / width
    box.height_ratio = box.height / height
    for landmark in moved.landmarks:
        landmark.x += region.left
        landmark.y += region.top
        landmark.x_ratio = landmark.x / width
        landmark.y_ratio = landmark.y / height
    return moved
