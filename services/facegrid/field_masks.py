"""Update masks (AIP-134), checked the same way by every service that takes one."""

from __future__ import annotations

from google.protobuf import field_mask_pb2

from facegrid.errors import invalid_argument

# Collection fields UpdateCollection may change (FaceService and SearchService).
COLLECTION_UPDATABLE = (
    "display_name",
    "description",
    "min_match_threshold",
    "production",
    "face_retention",
)


def update_paths(
    mask: field_mask_pb2.FieldMask, allowed: tuple[str, ...], field: str = "update_mask"
) -> list[str]:
    """The mask's paths, each one of ``allowed``: an empty mask or any other path
    (output-only fields, '*') is INVALID_ARGUMENT, so nothing changes by accident."""
    paths = list(dict.fromkeys(mask.paths))
    if not paths:
        raise invalid_argument(field, f"name the fields to change: {', '.join(allowed)}")
    unknown = [p for p in paths if p not in allowed]
    if unknown:
        raise invalid_argument(
            field, f"cannot change {', '.join(unknown)}; updatable: {', '.join(allowed)}"
        )
    return paths
