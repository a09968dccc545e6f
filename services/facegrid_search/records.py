"""The search service's own records: faces, subjects, collections and filters.

Protobuf messages are converted to these at the edge (``convert.py``); the store and
the in-memory index work only with these plain types.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray


@dataclass
class FaceRow:
    """One stored face, without its embedding."""

    face_id: str
    subject_id: str = ""
    source_id: str = ""
    external_image_id: str = ""
    image_id: str = ""
    create_time_us: int = 0
    # metadata, bounding_box, confidence, quality, model_version, as JSON-able values
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class SubjectRow:
    subject_id: str
    display_name: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    create_time_us: int = 0


@dataclass(frozen=True)
class CollectionSpec:
    """What a collection is, as stored in the registry (counts are computed)."""

    collection_id: str
    dimension: int
    model_version: str
    create_time_us: int
    # The Collection message as JSON (display name, calibration, index config, ...).
    definition: dict[str, Any]


@dataclass(frozen=True)
class FaceFilter:
    """Which faces a list, search or purge applies to. Empty fields do not filter."""

    subject_ids: tuple[str, ...] = ()
    source_ids: tuple[str, ...] = ()
    external_image_ids: tuple[str, ...] = ()
    image_ids: tuple[str, ...] = ()
    start_time_us: int | None = None  # inclusive
    end_time_us: int | None = None  # exclusive
    has_subject: bool | None = None

    def with_subject(self) -> FaceFilter:
        """The same filter, keeping only faces that belong to a subject."""
        return replace(self, has_subject=True)

    def is_empty(self) -> bool:
        return self == FaceFilter()

    def matches(self, row: FaceRow) -> bool:
        return (
            (not self.subject_ids or row.subject_id in self.subject_ids)
            and (not self.source_ids or row.source_id in self.source_ids)
            and (not self.external_image_ids or row.external_image_id in self.external_image_ids)
            and (not self.image_ids or row.image_id in self.image_ids)
            and (self.start_time_us is None or row.create_time_us >= self.start_time_us)
            and (self.end_time_us is None or row.create_time_us < self.end_time_us)
            and (self.has_subject is None or bool(row.subject_id) == self.has_subject)
        )


ALL_FACES = FaceFilter()


@dataclass(frozen=True)
class Match:
    row: FaceRow
    cosine: float


Vectors = NDArray[np.float32]
