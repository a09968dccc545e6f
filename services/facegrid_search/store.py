"""Every Milvus call of the search service, through pymilvus ``MilvusClient`` only.

One Milvus collection per facegrid collection holds its faces, one holds its subjects,
and a registry collection holds the collections' definitions, so Milvus is the whole
system of record. Milvus (2.3) needs a vector field in every collection: the registry
and subject collections carry a 2-d placeholder vector.

Only calls that behave the same on Milvus Lite and a Milvus server are used: ``upsert``
(never ``insert``, whose duplicate keys Lite overwrites and a server keeps twice),
delete by primary keys or by expression, ``query`` with an explicit ``limit`` or a
count, ``get`` by primary keys, and ``search`` with the index's own metric.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from facegrid import tls
from facegrid.config import StoreSettings, TlsSettings
from pymilvus import DataType, MilvusClient

from facegrid_search.expressions import and_, filter_expression, quote
from facegrid_search.records import (
    ALL_FACES,
    CollectionSpec,
    FaceFilter,
    FaceRow,
    SubjectRow,
    Vectors,
)

log = logging.getLogger(__name__)

REGISTRY = "facegrid_collections"
PLACEHOLDER_DIM = 2
PLACEHOLDER_VECTOR = [1.0, 0.0]
FACE_FIELDS = [
    "face_id",
    "subject_id",
    "source_id",
    "external_image_id",
    "image_id",
    "create_time",
    "attrs",
]
SUBJECT_FIELDS = ["subject_id", "display_name", "metadata", "create_time"]
QUERY_BATCH = 16_384  # pymilvus caps an iterator batch here
LITE_REBUILD_CHUNK = 100_000
DELETE_BATCH = 1_000


def _tls_arguments(uri: str, tls_settings: TlsSettings) -> dict[str, object]:
    """pymilvus's TLS arguments for a Milvus server at ``uri``."""
    if not tls_settings.ca_file:
        tls.check_plaintext_client_allowed("search", uri)
        return {}
    if tls_settings.client_cert_file:
        return {
            "secure": True,
            "ca_pem_path": tls_settings.ca_file,
            "client_pem_path": tls_settings.client_cert_file,
            "client_key_path": tls_settings.client_key_file,
        }
    return {"secure": True, "server_pem_path": tls_settings.ca_file}  # pymilvus: the CA


def faces_collection(collection_id: str) -> str:
    # Collection ids are [a-z0-9-]; Milvus names allow [A-Za-z0-9_]: '-' -> '_' is 1:1.
    return f"faces_{collection_id.replace('-', '_')}"


def subjects_collection(collection_id: str) -> str:
    return f"subjects_{collection_id.replace('-', '_')}"


# pymilvus pings every 10 s even without calls; Milvus Lite's gRPC server allows one ping
# in 5 minutes without data and answers the third with GOAWAY "too_many_pings", which
# gRPC logs as an error (not JSON) on every idle half-minute. Pings only during calls.
_LITE_OPTIONS: dict[str, Any] = {"grpc_options": {"grpc.keepalive_permit_without_calls": False}}


class MilvusStore:
    """Synchronous; the service calls it from a worker thread."""

    def __init__(
        self,
        settings: StoreSettings,
        searches_here: bool | None = None,
        tls_settings: TlsSettings | None = None,
    ) -> None:
        """``searches_here``: whether Milvus itself answers searches (no cache in front).
        A Milvus server is reached over TLS when ``tls_settings.ca_file`` is set (with
        the client certificate, for a server in tlsMode 2), else in plaintext and only on
        a loopback address."""
        self.settings = settings
        self.is_lite = self.is_lite_uri(settings.uri)
        if self.is_lite:
            Path(settings.uri).parent.mkdir(parents=True, exist_ok=True)
        self.client = MilvusClient(
            uri=settings.uri,
            token=settings.token,
            timeout=settings.timeout_s,
            **(
                _LITE_OPTIONS
                if self.is_lite
                else _tls_arguments(settings.uri, tls_settings or TlsSettings())
            ),
        )
        self._consistency = settings.consistency_level
        self.index_type = _index_type(settings.index_type, searches_here)
        self._ensure_registry()

    @staticmethod
    def is_lite_uri(uri: str) -> bool:
        return not uri.startswith(("http://", "https://", "tcp://"))

    def close(self) -> None:
        self.client.close()
        if self.is_lite:
            # pymilvus leaves Milvus Lite open until the process exits; close it now, so
            # that the database is flushed and unlocked when this returns.
            from milvus_lite.server_manager import server_manager_instance  # type: ignore[import-untyped]

            server_manager_instance.release_server(self.settings.uri)

    # ---------------------------------------------------------------- registry

    def _ensure_registry(self) -> None:
        if self.client.has_collection(REGISTRY):
            self.client.load_collection(REGISTRY)
            return
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("collection_id", DataType.VARCHAR, is_primary=True, max_length=64)
        schema.add_field("definition", DataType.JSON)
        schema.add_field("create_time", DataType.INT64)
        schema.add_field("placeholder", DataType.FLOAT_VECTOR, dim=PLACEHOLDER_DIM)
        self._create(REGISTRY, schema, "placeholder", "FLAT", {})

    def _create(
        self, name: str, schema: Any, vector_field: str, index_type: str, params: dict[str, Any]
    ) -> None:
        index = self.client.prepare_index_params()
        index.add_index(
            field_name=vector_field, index_type=index_type, metric_type="IP", params=params
        )
        self.client.create_collection(
            name, schema=schema, index_params=index, consistency_level=self._consistency
        )
        self.client.load_collection(name)

    def list_specs(self) -> list[CollectionSpec]:
        rows = self._query_all(REGISTRY, "", ["collection_id", "definition", "create_time"])
        return sorted((_spec(row) for row in rows), key=lambda s: s.collection_id)

    def get_spec(self, collection_id: str) -> CollectionSpec | None:
        # has_collection is a metadata call that sees a drop at once on a server, where a
        # Session read can still return a deleted row; Strong would cost 200-400 ms a call.
        if not self.client.has_collection(faces_collection(collection_id)):
            return None
        fields = ["collection_id", "definition", "create_time"]
        rows = self.client.get(
            REGISTRY, ids=[collection_id], output_fields=fields, consistency_level="Session"
        )
        if not rows and not self.is_lite:
            # Session sees this client's own writes only: a collection another replica
            # has just created exists (has_collection said so) but its registry row may
            # not be visible yet. Read it with Strong, which only such a miss pays for.
            rows = self.client.get(
                REGISTRY, ids=[collection_id], output_fields=fields, consistency_level="Strong"
            )
        return _spec(rows[0]) if rows else None

    def create_collection(self, spec: CollectionSpec) -> None:
        faces = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        faces.add_field("face_id", DataType.VARCHAR, is_primary=True, max_length=64)
        faces.add_field("subject_id", DataType.VARCHAR, max_length=128)
        faces.add_field("source_id", DataType.VARCHAR, max_length=128)
        faces.add_field("external_image_id", DataType.VARCHAR, max_length=256)
        faces.add_field("image_id", DataType.VARCHAR, max_length=64)
        faces.add_field("create_time", DataType.INT64)
        faces.add_field("attrs", DataType.JSON)
        faces.add_field("embedding", DataType.FLOAT_VECTOR, dim=spec.dimension)
        index_type, params = self._face_index()
        self._create(faces_collection(spec.collection_id), faces, "embedding", index_type, params)

        subjects = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        subjects.add_field("subject_id", DataType.VARCHAR, is_primary=True, max_length=128)
        subjects.add_field("display_name", DataType.VARCHAR, max_length=512)
        subjects.add_field("metadata", DataType.JSON)
        subjects.add_field("create_time", DataType.INT64)
        subjects.add_field("placeholder", DataType.FLOAT_VECTOR, dim=PLACEHOLDER_DIM)
        self._create(subjects_collection(spec.collection_id), subjects, "placeholder", "FLAT", {})
        # Registered last: a collection is visible only once its parts exist.
        self.update_spec(spec)

    def update_spec(self, spec: CollectionSpec) -> None:
        """Replace a registered collection's definition (its parts stay as they are)."""
        self.client.upsert(
            REGISTRY,
            [
                {
                    "collection_id": spec.collection_id,
                    "definition": spec.definition,
                    "create_time": spec.create_time_us,
                    "placeholder": PLACEHOLDER_VECTOR,
                }
            ],
        )

    def _face_index(self) -> tuple[str, dict[str, Any]]:
        kind = self.index_type
        if kind == "HNSW":
            return kind, {
                "M": self.settings.hnsw_m,
                "efConstruction": self.settings.hnsw_ef_construction,
            }
        return kind, {}

    def load(self, collection_id: str) -> None:
        """Load a collection's parts for reading (after a restart they are released)."""
        for name in (faces_collection(collection_id), subjects_collection(collection_id)):
            self.client.load_collection(name)

    def drop_collection(self, collection_id: str) -> None:
        # Unregistered first: a half-dropped collection is never visible.
        self.client.delete(REGISTRY, ids=[collection_id])
        for name in (faces_collection(collection_id), subjects_collection(collection_id)):
            if self.client.has_collection(name):
                self.client.drop_collection(name)

    # ---------------------------------------------------------------- faces

    def upsert_faces(self, collection_id: str, rows: Sequence[FaceRow], vectors: Vectors) -> None:
        data = [
            {
                "face_id": row.face_id,
                "subject_id": row.subject_id,
                "source_id": row.source_id,
                "external_image_id": row.external_image_id,
                "image_id": row.image_id,
                "create_time": row.create_time_us,
                "attrs": row.attrs,
                "embedding": vector.tolist(),
            }
            for row, vector in zip(rows, vectors, strict=True)
        ]
        self.client.upsert(faces_collection(collection_id), data)

    def delete_faces(self, collection_id: str, face_ids: Sequence[str]) -> None:
        name = faces_collection(collection_id)
        for start in range(0, len(face_ids), DELETE_BATCH):
            self.client.delete(name, ids=list(face_ids[start : start + DELETE_BATCH]))

    def get_faces(
        self, collection_id: str, face_ids: Sequence[str], with_vectors: bool = False
    ) -> dict[str, tuple[FaceRow, Vectors | None]]:
        if not face_ids:
            return {}
        fields = FACE_FIELDS + (["embedding"] if with_vectors else [])
        rows = self.client.get(
            faces_collection(collection_id),
            ids=list(face_ids),
            output_fields=fields,
            consistency_level=self._consistency,
        )
        return {
            row["face_id"]: (
                _face(row),
                np.asarray(row["embedding"], np.float32) if with_vectors else None,
            )
            for row in rows
        }

    def face_ids(self, collection_id: str, face_filter: FaceFilter, after: str = "") -> list[str]:
        """Ids of matching faces (after ``after``), sorted."""
        expression = and_(filter_expression(face_filter), f'face_id > "{after}"' if after else "")
        rows = self._query_all(faces_collection(collection_id), expression, ["face_id"])
        return sorted(row["face_id"] for row in rows)

    def count_faces(self, collection_id: str, face_filter: FaceFilter = ALL_FACES) -> int:
        return self._count(faces_collection(collection_id), filter_expression(face_filter))

    def iterate_faces(self, collection_id: str) -> Iterator[tuple[list[FaceRow], Vectors]]:
        """Every face with its embedding, in primary-key order (for rebuilding the cache)."""
        name = faces_collection(collection_id)
        fields = [*FACE_FIELDS, "embedding"]
        if not self.is_lite:
            yield from _batches(self._iterate(name, "", fields))
            return
        # Milvus Lite scans every row for every query, and pymilvus caps an iterator's
        # batch at 16,384 rows: iterating 1M faces took over ten minutes. Lite accepts a
        # larger limit, so read the ids in one scan, then the rows in a few key ranges.
        count = self.count_faces(collection_id)
        rows = self.client.query(name, filter="", output_fields=["face_id"], limit=max(count, 1))
        ids = sorted(row["face_id"] for row in rows)
        for start in range(0, len(ids), LITE_REBUILD_CHUNK):
            chunk = ids[start : start + LITE_REBUILD_CHUNK]
            expression = f"face_id >= {quote(chunk[0])} and face_id <= {quote(chunk[-1])}"
            found = self.client.query(
                name, filter=expression, output_fields=fields, limit=len(chunk)
            )
            yield from _batches(iter([found]))

    def _iterate(
        self, name: str, expression: str, fields: list[str]
    ) -> Iterator[list[dict[str, Any]]]:
        iterator = self.client.query_iterator(
            name, batch_size=QUERY_BATCH, filter=expression, output_fields=fields
        )
        try:
            while batch := iterator.next():
                yield batch
        finally:
            iterator.close()

    def search(
        self,
        collection_id: str,
        queries: Vectors,
        top_k: int,
        face_filter: FaceFilter,
        ef_search: int,
    ) -> list[list[tuple[str, float]]]:
        """(face_id, inner product) per query, best first, from Milvus itself."""
        params: dict[str, Any] = {"metric_type": "IP"}
        if self.index_type == "HNSW":
            params["params"] = {"ef": max(ef_search, top_k)}
        results = self.client.search(
            faces_collection(collection_id),
            data=[q.tolist() for q in queries],
            limit=top_k,
            filter=filter_expression(face_filter),
            output_fields=["face_id"],
            search_params=params,
            consistency_level=self._consistency,
        )
        # The hit's own id key differs (Lite: the field name, server: "id"); the output
        # field is the same on both.
        return [[(hit["face_id"], float(hit["distance"])) for hit in hits] for hits in results]

    def set_subject(self, collection_id: str, face_ids: Sequence[str], subject_id: str) -> None:
        found = self.get_faces(collection_id, face_ids, with_vectors=True)
        rows = []
        vectors = []
        for face_id in face_ids:
            row, vector = found[face_id]
            assert vector is not None
            row.subject_id = subject_id
            rows.append(row)
            vectors.append(vector)
        if rows:
            self.upsert_faces(collection_id, rows, np.stack(vectors).astype(np.float32))

    # ---------------------------------------------------------------- subjects

    def upsert_subject(self, collection_id: str, subject: SubjectRow) -> None:
        self.client.upsert(
            subjects_collection(collection_id),
            [
                {
                    "subject_id": subject.subject_id,
                    "display_name": subject.display_name,
                    "metadata": subject.metadata,
                    "create_time": subject.create_time_us,
                    "placeholder": PLACEHOLDER_VECTOR,
                }
            ],
        )

    def get_subject(self, collection_id: str, subject_id: str) -> SubjectRow | None:
        rows = self.client.get(
            subjects_collection(collection_id),
            ids=[subject_id],
            output_fields=SUBJECT_FIELDS,
            consistency_level=self._consistency,
        )
        return _subject(rows[0]) if rows else None

    def list_subjects(self, collection_id: str, after: str, limit: int) -> list[SubjectRow]:
        expression = f'subject_id > "{after}"' if after else ""
        rows = self._query_all(subjects_collection(collection_id), expression, SUBJECT_FIELDS)
        return sorted((_subject(r) for r in rows), key=lambda s: s.subject_id)[:limit]

    def count_subjects(self, collection_id: str) -> int:
        return self._count(subjects_collection(collection_id), "")

    def compact(self, collection_id: str) -> None:
        """Flush a collection's faces and subjects and start their compaction (a server
        rewrites the segments without the deleted rows; Milvus Lite does nothing)."""
        for name in (faces_collection(collection_id), subjects_collection(collection_id)):
            self.client.flush(name)
            self.client.compact(name)

    def delete_subject(self, collection_id: str, subject_id: str) -> None:
        self.client.delete(subjects_collection(collection_id), ids=[subject_id])

    # ---------------------------------------------------------------- helpers

    def _count(self, name: str, expression: str) -> int:
        rows = self.client.query(
            name,
            filter=expression,
            output_fields=["count(*)"],
            consistency_level=self._consistency,
        )
        return int(rows[0]["count(*)"]) if rows else 0

    def _query_all(self, name: str, expression: str, fields: list[str]) -> list[dict[str, Any]]:
        """Every row matching ``expression``, in primary-key order.

        A server returns at most 16,384 rows per query, in no particular order, so paging
        by key would skip rows: the query iterator pages in key order. Milvus Lite takes
        any limit, and its iterator would rescan every row per batch (and log an
        AllocTimestamp error it does not implement): one counted query there.
        """
        if not self.is_lite:
            return [row for batch in self._iterate(name, expression, fields) for row in batch]
        count = self._count(name, expression)
        if count == 0:
            return []
        rows = self.client.query(name, filter=expression, output_fields=fields, limit=count)
        return sorted(rows, key=lambda row: row[fields[0]])


def _batches(
    pages: Iterator[list[dict[str, Any]]],
) -> Iterator[tuple[list[FaceRow], Vectors]]:
    for page in pages:
        if page:
            vectors = np.asarray([row["embedding"] for row in page], np.float32)
            yield [_face(row) for row in page], vectors


def _index_type(configured: str, searches_here: bool | None) -> str:
    kind = configured.upper()
    if kind == "AUTO":
        return "HNSW" if searches_here else "FLAT"
    if kind not in ("HNSW", "FLAT"):
        raise ValueError(f"store.index_type must be AUTO, HNSW or FLAT, not {configured!r}")
    return kind


def _spec(row: dict[str, Any]) -> CollectionSpec:
    definition = dict(row["definition"])
    return CollectionSpec(
        collection_id=row["collection_id"],
        dimension=int(definition.get("dimension", 0)),
        model_version=str(definition.get("modelVersion", "")),
        create_time_us=int(row["create_time"]),
        definition=definition,
    )


def _face(row: dict[str, Any]) -> FaceRow:
    return FaceRow(
        face_id=row["face_id"],
        subject_id=row["subject_id"],
        source_id=row["source_id"],
        external_image_id=row["external_image_id"],
        image_id=row["image_id"],
        create_time_us=int(row["create_time"]),
        attrs=dict(row["attrs"] or {}),
    )


def _subject(row: dict[str, Any]) -> SubjectRow:
    return SubjectRow(
        subject_id=row["subject_id"],
        display_name=row["display_name"],
        metadata=dict(row["metadata"] or {}),
        create_time_us=int(row["create_time"]),
    )
