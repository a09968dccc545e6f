"""Protobuf messages <-> the search service's records, with input validation."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from facegrid import limits, names, validation
from facegrid.errors import invalid_argument, invalid_arguments
from facegrid.similarity import Calibration
from facegrid.v1 import common_pb2, resources_pb2
from google.protobuf import json_format
from google.protobuf.message import Message

from facegrid_search.records import CollectionSpec, FaceFilter, FaceRow, SubjectRow, Vectors

MAX_FILTER_VALUES = 100
UNIT_NORM_TOLERANCE = 1e-3
# Fields of Collection that are computed, not stored.
COLLECTION_OUTPUT_ONLY = ("name", "face_count", "subject_count", "create_time")


def now_us() -> int:
    return time.time_ns() // 1000


def to_json(message: Message) -> dict[str, Any]:
    return dict(json_format.MessageToDict(message))


# ---------------------------------------------------------------- collections


def collection_definition(collection: resources_pb2.Collection) -> dict[str, Any]:
    stored = resources_pb2.Collection()
    stored.CopyFrom(collection)
    for name in COLLECTION_OUTPUT_ONLY:
        stored.ClearField(name)
    return to_json(stored)


def index_config(
    index_type: str, hnsw_m: int, hnsw_ef_construction: int
) -> resources_pb2.IndexConfig:
    """The index built for a new collection's faces (``MilvusStore.index_type``)."""
    if index_type == "HNSW":
        return resources_pb2.IndexConfig(
            type=resources_pb2.IndexConfig.TYPE_HNSW,
            hnsw_m=hnsw_m,
            hnsw_ef_construction=hnsw_ef_construction,
        )
    return resources_pb2.IndexConfig(type=resources_pb2.IndexConfig.TYPE_FLAT)


MIN_FACE_RETENTION_S = 3600
MAX_FACE_RETENTION_S = 100 * 365 * 24 * 3600


def check_collection_fields(
    collection: resources_pb2.Collection, paths: Sequence[str], prefix: str = "collection"
) -> None:
    """Limits of a collection's settable fields (those in ``paths``)."""
    violations = []
    if "display_name" in paths and len(collection.display_name) > limits.MAX_DISPLAY_NAME:
        violations.append(
            (f"{prefix}.display_name", f"at most {limits.MAX_DISPLAY_NAME} characters")
        )
    if "description" in paths and len(collection.description) > limits.MAX_DESCRIPTION:
        violations.append((f"{prefix}.description", f"at most {limits.MAX_DESCRIPTION} characters"))
    if "min_match_threshold" in paths and collection.HasField("min_match_threshold"):
        value = collection.min_match_threshold
        if not (math.isfinite(value) and 0 <= value <= 100):
            violations.append((f"{prefix}.min_match_threshold", f"must be 0 to 100, got {value}"))
    if "face_retention" in paths and collection.HasField("face_retention"):
        retention = collection.face_retention
        seconds = retention.seconds + retention.nanos / 1e9
        if not MIN_FACE_RETENTION_S <= seconds <= MAX_FACE_RETENTION_S:
            violations.append(
                (
                    f"{prefix}.face_retention",
                    f"must be 1 hour to 100 years, got {seconds:g} s",
                )
            )
    if violations:
        raise invalid_arguments(violations)


def calibration_of(spec: CollectionSpec) -> Calibration:
    message = json_format.ParseDict(
        spec.definition.get("similarityCalibration", {}), common_pb2.SimilarityCalibration()
    )
    return Calibration.from_proto(message)


def collection_message(
    spec: CollectionSpec, face_count: int, subject_count: int
) -> resources_pb2.Collection:
    message = json_format.ParseDict(spec.definition, resources_pb2.Collection())
    message.name = names.collection_name(spec.collection_id)
    message.face_count = face_count
    message.subject_count = subject_count
    message.create_time.FromMicroseconds(spec.create_time_us)
    return message


# ---------------------------------------------------------------- faces


def face_row(face: resources_pb2.Face, face_id: str, field: str) -> FaceRow:
    checks = (
        (face.subject_id, names.SUBJECT_ID, "subject_id", "subject id"),
        (face.external_image_id, names.EXTERNAL_IMAGE_ID, "external_image_id", "external id"),
        (face.image_id, names.IMAGE_ID, "image_id", "image id (a UUID)"),
        (face.source_id, names.SOURCE_ID, "source_id", "source id"),
    )
    for value, pattern, name, what in checks:
        if value:
            names.check_id(value, pattern, f"{field}.{name}", what)
    # Kept verbatim in the Milvus row's JSON "attrs".
    attrs = resources_pb2.Face(confidence=face.confidence, model_version=face.model_version)
    for name in ("metadata", "bounding_box", "quality"):
        if face.HasField(name):
            getattr(attrs, name).CopyFrom(getattr(face, name))
    if face.HasField("create_time"):
        validation.timestamp(face.create_time, f"{field}.create_time")
    created = face.create_time.ToMicroseconds() if face.HasField("create_time") else now_us()
    return FaceRow(
        face_id=face_id,
        subject_id=face.subject_id,
        source_id=face.source_id,
        external_image_id=face.external_image_id,
        image_id=face.image_id,
        create_time_us=created,
        attrs=to_json(attrs),
    )


def face_message(
    collection_id: str, row: FaceRow, vector: Vectors | None = None
) -> resources_pb2.Face:
    face = json_format.ParseDict(row.attrs, resources_pb2.Face(), ignore_unknown_fields=True)
    face.name = str(names.FaceName(collection_id, row.face_id))
    face.face_id = row.face_id
    face.subject_id = row.subject_id
    face.external_image_id = row.external_image_id
    face.image_id = row.image_id
    face.source_id = row.source_id
    face.create_time.FromMicroseconds(row.create_time_us)
    if vector is not None:
        face.embedding.values.extend(float(v) for v in vector)
    return face


def unit_vectors(embeddings: Sequence[common_pb2.Embedding], dimension: int, field: str) -> Vectors:
    """The embeddings as an (N, dimension) float32 matrix, each checked to be unit length."""
    violations = []
    for index, embedding in enumerate(embeddings):
        values = embedding.values
        where = f"{field}[{index}].values"
        if len(values) != dimension:
            violations.append(
                (where, f"has {len(values)} values; the collection's dimension is {dimension}")
            )
            continue
        array = np.asarray(values, np.float64)
        if not np.all(np.isfinite(array)):
            violations.append((where, "contains NaN or infinity"))
            continue
        norm = float(np.linalg.norm(array))
        if abs(norm - 1.0) > UNIT_NORM_TOLERANCE:
            violations.append((where, f"must be unit length (L2 norm 1), has norm {norm:.6g}"))
    if violations:
        raise invalid_arguments(violations, reason="INVALID_EMBEDDING")
    return np.asarray([list(e.values) for e in embeddings], np.float32)


# ---------------------------------------------------------------- filters


def face_filter(message: resources_pb2.FaceFilter, field: str = "filter") -> FaceFilter:
    checks = (
        ("subject_ids", names.SUBJECT_ID, "subject id"),
        ("source_ids", names.SOURCE_ID, "source id"),
        ("external_image_ids", names.EXTERNAL_IMAGE_ID, "external image id"),
        ("image_ids", names.IMAGE_ID, "image id"),
    )
    values: dict[str, tuple[str, ...]] = {}
    for name, pattern, what in checks:
        items = tuple(getattr(message, name))
        if len(items) > MAX_FILTER_VALUES:
            raise invalid_argument(f"{field}.{name}", f"at most {MAX_FILTER_VALUES} values")
        for index, item in enumerate(items):
            names.check_id(item, pattern, f"{field}.{name}[{index}]", what)
        values[name] = items
    start = end = None
    if message.HasField("create_time_range"):
        window = message.create_time_range
        validation.time_range(window, f"{field}.create_time_range")
        start = window.start_time.ToMicroseconds() if window.HasField("start_time") else None
        end = window.end_time.ToMicroseconds() if window.HasField("end_time") else None
    return FaceFilter(
        subject_ids=values["subject_ids"],
        source_ids=values["source_ids"],
        external_image_ids=values["external_image_ids"],
        image_ids=values["image_ids"],
        start_time_us=start,
        end_time_us=end,
        has_subject=message.has_subject if message.HasField("has_subject") else None,
    )


# ---------------------------------------------------------------- subjects


def subject_message(collection_id: str, row: SubjectRow, face_count: int) -> resources_pb2.Subject:
    subject = resources_pb2.Subject(
        name=str(names.SubjectName(collection_id, row.subject_id)),
        subject_id=row.subject_id,
        display_name=row.display_name,
        face_count=face_count,
    )
    if row.metadata:
        json_format.ParseDict(row.metadata, subject.metadata)
    subject.create_time.FromMicroseconds(row.create_time_us)
    return subject
