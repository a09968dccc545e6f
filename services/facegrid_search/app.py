"""SearchService: collections, faces, subjects and vector search, stored in Milvus."""

from __future__ import annotations

import math
from typing import TypeAlias

import grpc
from facegrid import field_masks, names, paging, telemetry
from facegrid.config import Settings
from facegrid.errors import failed_precondition, invalid_argument, invalid_arguments, not_found
from facegrid.internal.v1 import search_pb2, search_pb2_grpc
from facegrid.server import FacegridServer, ServiceRegistration, run_until_stopped
from facegrid.similarity import Calibration
from facegrid.v1 import resources_pb2

from facegrid_search import convert
from facegrid_search.core import Collection, SearchCore
from facegrid_search.records import CollectionSpec, Match, SubjectRow

MAX_DIMENSION = 4096
MAX_BATCH_FACES = 1000
MAX_ASSOCIATE_FACES = 100
MAX_QUERIES = 64
DEFAULT_TOP_K = 10
MAX_TOP_K = 4096
# Every index compares unit vectors by inner product, which ranks as cosine does; the
# other metrics of the contract are not implemented.
NOT_IMPLEMENTED_METRICS = (resources_pb2.METRIC_INNER_PRODUCT, resources_pb2.METRIC_EUCLIDEAN)

S = search_pb2
Context: TypeAlias = grpc.aio.ServicerContext


class SearchServicer(search_pb2_grpc.SearchServiceServicer):  # type: ignore[misc]
    def __init__(self, settings: Settings, core: SearchCore) -> None:
        self._settings = settings
        self._core = core

    # ---------------------------------------------------------------- collections

    async def CreateCollection(  # noqa: N802
        self, request: S.CreateCollectionRequest, context: Context
    ) -> S.CreateCollectionResponse:
        collection_id = names.check_id(
            request.collection_id, names.COLLECTION_ID, "collection_id", "collection id"
        )
        given = request.collection
        violations = []
        if not 1 <= given.dimension <= MAX_DIMENSION:
            violations.append(("collection.dimension", f"must be 1 to {MAX_DIMENSION}"))
        if not given.model_version:
            violations.append(("collection.model_version", "is required"))
        if given.metric in NOT_IMPLEMENTED_METRICS:
            violations.append(
                ("collection.metric", "not implemented: METRIC_COSINE (or unset) only")
            )
        elif given.metric not in (resources_pb2.METRIC_UNSPECIFIED, resources_pb2.METRIC_COSINE):
            violations.append(("collection.metric", "unknown metric"))
        if given.HasField("index_config"):
            violations.append(
                (
                    "collection.index_config",
                    "output only: the search service's store.index_type and store.hnsw_*"
                    " choose the index",
                )
            )
        if violations:
            raise invalid_arguments(violations)
        convert.check_collection_fields(given, field_masks.COLLECTION_UPDATABLE)
        Calibration.from_proto(given.similarity_calibration, "collection.similarity_calibration")
        stored = resources_pb2.Collection()
        stored.CopyFrom(given)
        stored.metric = resources_pb2.METRIC_COSINE
        stored.index_config.CopyFrom(
            convert.index_config(
                self._core.index_type,
                self._settings.store.hnsw_m,
                self._settings.store.hnsw_ef_construction,
            )
        )
        spec = CollectionSpec(
            collection_id=collection_id,
            dimension=given.dimension,
            model_version=given.model_version,
            create_time_us=convert.now_us(),
            definition=convert.collection_definition(stored),
        )
        await self._core.create_collection(spec)
        return S.CreateCollectionResponse(collection=self._message(spec, 0, 0))

    async def GetCollection(  # noqa: N802
        self, request: S.GetCollectionRequest, context: Context
    ) -> S.GetCollectionResponse:
        collection = await self._core.collection(names.parse_collection(request.name))
        return S.GetCollectionResponse(collection=await self._describe(collection))

    async def _describe(self, collection: Collection) -> resources_pb2.Collection:
        faces, subjects = await self._core.counts(collection)
        return self._message(collection.spec, faces, subjects)

    def _message(
        self, spec: CollectionSpec, face_count: int, subject_count: int
    ) -> resources_pb2.Collection:
        """A collection as callers see it: its HNSW index searched as wide as configured now."""
        message = convert.collection_message(spec, face_count, subject_count)
        if message.index_config.type == resources_pb2.IndexConfig.TYPE_HNSW:
            message.index_config.hnsw_ef_search = self._settings.store.hnsw_ef_search
        return message

    async def ListCollections(  # noqa: N802
        self, request: S.ListCollectionsRequest, context: Context
    ) -> S.ListCollectionsResponse:
        size = paging.page_size(request.page_size)
        fingerprint = paging.request_fingerprint("collections")
        after = paging.decode_page_token(request.page_token, fingerprint)
        specs = [s for s in await self._core.list_specs() if s.collection_id > after]
        page = specs[:size]
        collections = []
        for spec in page:
            collections.append(
                await self._describe(await self._core.collection(spec.collection_id))
            )
        token = ""
        if len(specs) > size:
            token = paging.encode_page_token(page[-1].collection_id, fingerprint)
        return S.ListCollectionsResponse(collections=collections, next_page_token=token)

    async def UpdateCollection(  # noqa: N802
        self, request: S.UpdateCollectionRequest, context: Context
    ) -> S.UpdateCollectionResponse:
        collection_id = names.parse_collection(request.collection.name, "collection.name")
        paths = field_masks.update_paths(request.update_mask, field_masks.COLLECTION_UPDATABLE)
        convert.check_collection_fields(request.collection, paths)
        current = await self._core.collection(collection_id)
        updated = convert.collection_message(current.spec, 0, 0)
        for path in paths:
            if path in ("min_match_threshold", "face_retention") and not (
                request.collection.HasField(path)
            ):
                updated.ClearField(path)  # in the mask but unset: cleared (AIP-134)
            elif path == "face_retention":
                updated.face_retention.CopyFrom(request.collection.face_retention)
            else:
                setattr(updated, path, getattr(request.collection, path))
        collection = await self._core.update_collection(
            collection_id, convert.collection_definition(updated)
        )
        return S.UpdateCollectionResponse(collection=await self._describe(collection))

    async def DeleteCollection(  # noqa: N802
        self, request: S.DeleteCollectionRequest, context: Context
    ) -> S.DeleteCollectionResponse:
        deleted = await self._core.delete_collection(
            names.parse_collection(request.name), request.force
        )
        return S.DeleteCollectionResponse(deleted_face_count=deleted)

    # ---------------------------------------------------------------- faces

    async def BatchUpsertFaces(  # noqa: N802
        self, request: S.BatchUpsertFacesRequest, context: Context
    ) -> S.BatchUpsertFacesResponse:
        collection_id = names.parse_collection(request.parent, "parent")
        count = len(request.faces)
        if not 1 <= count <= MAX_BATCH_FACES:
            raise invalid_argument("faces", f"1 to {MAX_BATCH_FACES} faces, got {count}")
        collection = await self._core.collection(collection_id)
        spec = collection.spec
        rows = []
        seen: set[str] = set()
        for index, face in enumerate(request.faces):
            field = f"faces[{index}]"
            name = names.parse_face(face.name, f"{field}.name", collection_id)
            if name.face_id in seen:
                raise invalid_argument(f"{field}.name", f"{face.name} appears twice")
            seen.add(name.face_id)
            if face.model_version != spec.model_version:
                raise failed_precondition(
                    "MODEL_VERSION",
                    face.name,
                    f"{field}.model_version is {face.model_version!r}; "
                    f"the collection holds {spec.model_version!r}",
                )
            rows.append(convert.face_row(face, name.face_id, field))
        vectors = convert.unit_vectors(
            [face.embedding for face in request.faces], spec.dimension, "faces"
        )
        await self._core.upsert_faces(collection, rows, vectors)
        return S.BatchUpsertFacesResponse(
            faces=[convert.face_message(collection_id, row) for row in rows]
        )

    async def GetFace(  # noqa: N802
        self, request: S.GetFaceRequest, context: Context
    ) -> S.GetFaceResponse:
        name = names.parse_face(request.name)
        collection = await self._core.collection(name.collection)
        full = request.view == S.FACE_VIEW_FULL
        found = await self._core.face_rows(collection, [name.face_id], with_vectors=full)
        if name.face_id not in found:
            raise not_found("facegrid.v1.Face", str(name))
        row, vector = found[name.face_id]
        return S.GetFaceResponse(face=convert.face_message(name.collection, row, vector))

    async def ListFaces(  # noqa: N802
        self, request: S.ListFacesRequest, context: Context
    ) -> S.ListFacesResponse:
        collection_id = names.parse_collection(request.parent, "parent")
        size = paging.page_size(request.page_size)
        face_filter = convert.face_filter(request.filter)
        fingerprint = paging.request_fingerprint(
            collection_id, request.filter.SerializeToString(deterministic=True).hex()
        )
        after = paging.decode_page_token(request.page_token, fingerprint)
        collection = await self._core.collection(collection_id)
        rows, more = await self._core.page(collection, face_filter, after, size)
        full = request.view == S.FACE_VIEW_FULL
        vectors = {}
        if full and rows:
            found = await self._core.face_rows(collection, [r.face_id for r in rows], True)
            vectors = {face_id: vector for face_id, (_, vector) in found.items()}
        token = paging.encode_page_token(rows[-1].face_id, fingerprint) if more else ""
        return S.ListFacesResponse(
            faces=[
                convert.face_message(collection_id, row, vectors.get(row.face_id)) for row in rows
            ],
            next_page_token=token,
        )

    async def BatchDeleteFaces(  # noqa: N802
        self, request: S.BatchDeleteFacesRequest, context: Context
    ) -> S.BatchDeleteFacesResponse:
        collection_id = names.parse_collection(request.parent, "parent")
        count = len(request.names)
        if not 1 <= count <= MAX_BATCH_FACES:
            raise invalid_argument("names", f"1 to {MAX_BATCH_FACES} names, got {count}")
        faces = [
            names.parse_face(n, f"names[{i}]", collection_id) for i, n in enumerate(request.names)
        ]
        collection = await self._core.collection(collection_id)
        ids = list(dict.fromkeys(f.face_id for f in faces))
        existing = await self._core.face_rows(collection, ids)
        missing = [i for i in ids if i not in existing]
        if missing and not request.allow_missing:
            raise not_found("facegrid.v1.Face", str(names.FaceName(collection_id, missing[0])))
        present = [i for i in ids if i in existing]
        await self._core.delete_faces(collection, present)
        return S.BatchDeleteFacesResponse(
            deleted_faces=[str(names.FaceName(collection_id, i)) for i in present]
        )

    async def PurgeFaces(  # noqa: N802
        self, request: S.PurgeFacesRequest, context: Context
    ) -> S.PurgeFacesResponse:
        collection_id = names.parse_collection(request.parent, "parent")
        face_filter = convert.face_filter(request.filter)
        if face_filter.is_empty():
            raise invalid_argument(
                "filter", "an empty filter would purge every face: delete the collection instead"
            )
        collection = await self._core.collection(collection_id)
        ids = await self._core.matching_ids(collection, face_filter)
        if request.force:
            await self._core.delete_faces(collection, ids)
        return S.PurgeFacesResponse(
            purge_count=len(ids),
            purge_sample=[str(names.FaceName(collection_id, i)) for i in ids[:100]],
        )

    # ---------------------------------------------------------------- subjects

    async def CreateSubject(  # noqa: N802
        self, request: S.CreateSubjectRequest, context: Context
    ) -> S.CreateSubjectResponse:
        collection_id = names.parse_collection(request.parent, "parent")
        subject_id = names.check_id(
            request.subject_id, names.SUBJECT_ID, "subject_id", "subject id"
        )
        if len(request.subject.display_name) > 512:
            raise invalid_argument("subject.display_name", "at most 512 characters")
        collection = await self._core.collection(collection_id)
        row = SubjectRow(
            subject_id=subject_id,
            display_name=request.subject.display_name,
            metadata=convert.to_json(request.subject.metadata),
            create_time_us=convert.now_us(),
        )
        await self._core.create_subject(collection, row)
        return S.CreateSubjectResponse(subject=convert.subject_message(collection_id, row, 0))

    async def GetSubject(  # noqa: N802
        self, request: S.GetSubjectRequest, context: Context
    ) -> S.GetSubjectResponse:
        name = names.parse_subject(request.name)
        collection = await self._core.collection(name.collection)
        return S.GetSubjectResponse(
            subject=await self._subject_message(collection, name.subject_id)
        )

    async def _subject_message(
        self, collection: Collection, subject_id: str
    ) -> resources_pb2.Subject:
        row = await self._core.subject(collection, subject_id)
        count = await self._core.subject_face_count(collection, subject_id)
        return convert.subject_message(collection.spec.collection_id, row, count)

    async def ListSubjects(  # noqa: N802
        self, request: S.ListSubjectsRequest, context: Context
    ) -> S.ListSubjectsResponse:
        collection_id = names.parse_collection(request.parent, "parent")
        size = paging.page_size(request.page_size)
        fingerprint = paging.request_fingerprint(collection_id, "subjects")
        after = paging.decode_page_token(request.page_token, fingerprint)
        collection = await self._core.collection(collection_id)
        rows = await self._core.list_subjects(collection, after, size + 1)
        page = rows[:size]
        subjects = [
            convert.subject_message(
                collection_id, row, await self._core.subject_face_count(collection, row.subject_id)
            )
            for row in page
        ]
        token = (
            paging.encode_page_token(page[-1].subject_id, fingerprint) if len(rows) > size else ""
        )
        return S.ListSubjectsResponse(subjects=subjects, next_page_token=token)

    async def DeleteSubject(  # noqa: N802
        self, request: S.DeleteSubjectRequest, context: Context
    ) -> S.DeleteSubjectResponse:
        name = names.parse_subject(request.name)
        collection = await self._core.collection(name.collection)
        deleted = await self._core.delete_subject(collection, name.subject_id, request.force)
        return S.DeleteSubjectResponse(deleted_face_count=deleted)

    async def AssociateFaces(  # noqa: N802
        self, request: S.AssociateFacesRequest, context: Context
    ) -> S.AssociateFacesResponse:
        subject = await self._change_subject(request.subject, list(request.faces), True)
        return S.AssociateFacesResponse(subject=subject)

    async def DisassociateFaces(  # noqa: N802
        self, request: S.DisassociateFacesRequest, context: Context
    ) -> S.DisassociateFacesResponse:
        subject = await self._change_subject(request.subject, list(request.faces), False)
        return S.DisassociateFacesResponse(subject=subject)

    async def _change_subject(
        self, subject_name: str, face_names: list[str], associate: bool
    ) -> resources_pb2.Subject:
        name = names.parse_subject(subject_name, "subject")
        if not 1 <= len(face_names) <= MAX_ASSOCIATE_FACES:
            raise invalid_argument("faces", f"1 to {MAX_ASSOCIATE_FACES} face names")
        faces = [
            names.parse_face(n, f"faces[{i}]", name.collection) for i, n in enumerate(face_names)
        ]
        collection = await self._core.collection(name.collection)
        await self._core.set_subject(collection, name.subject_id, faces, associate)
        return await self._subject_message(collection, name.subject_id)

    # ---------------------------------------------------------------- search

    async def SearchFaces(  # noqa: N802
        self, request: S.SearchFacesRequest, context: Context
    ) -> S.SearchFacesResponse:
        collection_id = names.parse_collection(request.parent, "parent")
        count = len(request.queries)
        if not 1 <= count <= MAX_QUERIES:
            raise invalid_argument("queries", f"1 to {MAX_QUERIES} queries, got {count}")
        top_k = request.top_k or DEFAULT_TOP_K
        if not 1 <= top_k <= MAX_TOP_K:
            raise invalid_argument("top_k", f"must be 1 to {MAX_TOP_K}, got {request.top_k}")
        if not (math.isfinite(request.min_similarity) and 0 <= request.min_similarity <= 100):
            raise invalid_argument("min_similarity", "must be 0 to 100")
        face_filter = convert.face_filter(request.filter)
        collection = await self._core.collection(collection_id)
        spec = collection.spec
        if request.model_version != spec.model_version:
            raise failed_precondition(
                "MODEL_VERSION",
                names.collection_name(collection_id),
                f"queries are of model {request.model_version!r}; "
                f"the collection holds {spec.model_version!r}",
            )
        queries = convert.unit_vectors(list(request.queries), spec.dimension, "queries")
        telemetry.annotate(
            collection=names.collection_name(collection_id),
            query_count=count,
            top_k=top_k,
            group_by_subject=request.group_by_subject,
        )
        results = await self._core.search(
            collection,
            queries,
            top_k,
            face_filter,
            request.group_by_subject,
            self._settings.store.hnsw_ef_search,
        )
        response = S.SearchFacesResponse(
            results=[
                S.SearchFacesResponse.QueryResult(
                    matches=self._matches(
                        collection_id, spec, matches, collection.calibration, request
                    )
                )
                for matches in results
            ],
            model_version=spec.model_version,
        )
        found = [m.similarity for result in response.results for m in result.matches]
        telemetry.annotate(result_count=len(found))
        if found:
            telemetry.annotate(top_similarity=max(found))
        return response

    @staticmethod
    def _matches(
        collection_id: str,
        spec: CollectionSpec,
        matches: list[Match],
        calibration: Calibration,
        request: S.SearchFacesRequest,
    ) -> list[resources_pb2.FaceMatch]:
        out = []
        for match in matches:
            score = calibration.score(match.cosine)
            if not score.admitted(request.min_similarity):
                continue
            out.append(
                resources_pb2.FaceMatch(
                    face=convert.face_message(collection_id, match.row),
                    similarity=score.similarity,
                    cosine_similarity=score.cosine,
                    distance=score.distance,
                    threshold_applied=request.min_similarity,
                    model_version=spec.model_version,
                )
            )
        return out


def build_server(
    settings: Settings, servicer: SearchServicer, port: int | None = None
) -> FacegridServer:
    """The search service's gRPC server around a servicer built with its dependencies (in
    the event loop it will run in); on ``search.port`` unless ``port`` is given."""
    registration = ServiceRegistration.of(
        search_pb2, "SearchService", search_pb2_grpc.add_SearchServiceServicer_to_server, servicer
    )
    return FacegridServer.for_service("search", registration, settings, port)


async def serve(settings: Settings) -> None:
    core = SearchCore(settings.store, settings.tls)
    await core.open()
    servicer = SearchServicer(settings, core)
    server = build_server(settings, servicer)
    await run_until_stopped(server, core.close)
