"""Resource names and ids of the public API, validated in one place.

Every id that reaches a Milvus filter expression has been checked against one of these
patterns first, so caller input is always data and can never change a query's shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from facegrid.errors import invalid_argument

COLLECTION_ID = re.compile(r"^[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?$")  # AIP-122
FACE_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
SUBJECT_ID = re.compile(r"^[a-zA-Z0-9_.\-:]{1,128}$")
EXTERNAL_IMAGE_ID = re.compile(r"^[a-zA-Z0-9_.\-:]{1,255}$")
SOURCE_ID = re.compile(r"^[a-zA-Z0-9_.\-:]{1,128}$")
STREAM_PROCESSOR_ID = COLLECTION_ID  # the same AIP-122 form
IMAGE_ID = FACE_ID


@dataclass(frozen=True)
class FaceName:
    collection: str
    face_id: str

    def __str__(self) -> str:
        return f"collections/{self.collection}/faces/{self.face_id}"


@dataclass(frozen=True)
class SubjectName:
    collection: str
    subject_id: str

    def __str__(self) -> str:
        return f"collections/{self.collection}/subjects/{self.subject_id}"


def collection_name(collection_id: str) -> str:
    return f"collections/{collection_id}"


def check_id(value: str, pattern: re.Pattern[str], field: str, what: str) -> str:
    if not pattern.fullmatch(value):
        raise invalid_argument(field, f"{value!r} is not a valid {what}", reason="INVALID_NAME")
    return value


def parse_collection(name: str, field: str = "name") -> str:
    prefix, _, collection = name.partition("/")
    if prefix != "collections" or not COLLECTION_ID.fullmatch(collection):
        raise invalid_argument(
            field, f"{name!r} is not a collection name (collections/{{collection}})", "INVALID_NAME"
        )
    return collection


def parse_face(name: str, field: str = "name", collection: str | None = None) -> FaceName:
    parts = name.split("/")
    if (
        len(parts) != 4
        or parts[0] != "collections"
        or parts[2] != "faces"
        or not COLLECTION_ID.fullmatch(parts[1])
        or not FACE_ID.fullmatch(parts[3])
    ):
        raise invalid_argument(
            field,
            f"{name!r} is not a face name (collections/{{collection}}/faces/{{uuid}})",
            "INVALID_NAME",
        )
    if collection is not None and parts[1] != collection:
        raise invalid_argument(
            field, f"{name!r} is not in collections/{collection}", "INVALID_NAME"
        )
    return FaceName(parts[1], parts[3])


def parse_subject(name: str, field: str = "name") -> SubjectName:
    parts = name.split("/")
    if (
        len(parts) != 4
        or parts[0] != "collections"
        or parts[2] != "subjects"
        or not COLLECTION_ID.fullmatch(parts[1])
        or not SUBJECT_ID.fullmatch(parts[3])
    ):
        raise invalid_argument(
            field,
            f"{name!r} is not a subject name (collections/{{collection}}/subjects/{{subject}})",
            "INVALID_NAME",
        )
    return SubjectName(parts[1], parts[3])
