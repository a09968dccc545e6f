"""The gateway: the public FaceService, orchestrating detection -> embedding -> search.

It owns authentication, scopes, the audit log, the administrator's threshold and
quality policy, and request validation; the other services own their data.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from datetime import UTC, datetime
from typing import Any, TypeAlias

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from facegrid import audit_checkpoint, field_masks, limits, names, paging, validation
from facegrid.accountability import AuditDraft, Gatekeeper, guarded
from facegrid.audit_log import open_audit_log
from facegrid.authenticator import Authenticator
from facegrid.config import Settings
from facegrid.identification.deadline import Deadline
from facegrid.identification.downstream import Downstream
from facegrid.identification.faces import FacePipeline, cosines, without_chip
from facegrid.identification.flow import Identifier
from facegrid.identification.policy import QualityPolicy, ThresholdPolicy, check_requested
from facegrid.internal.v1 import search_pb2
from facegrid.quotas import Quotas, open_quota_store
from facegrid.retention import RetentionSchedule
from facegrid.server import (
    FacegridServer,
    ServiceRegistration,
    run_until_stopped,
)
from facegrid.v1 import common_pb2, face_service_pb2, face_service_pb2_grpc, resources_pb2
from google.protobuf.message import Message

from facegrid_gateway import audit_records, reviews
from facegrid_gateway.retention import TASK as FACE_RETENTION_TASK
from facegrid_gateway.retention import FaceExpiry

log = logging.getLogger(__name__)

F = face_service_pb2
S = search_pb2
Context: TypeAlias = grpc.aio.ServicerContext
Reason = F.UnindexedReason

MAX_MATCHES = 4096
DEFAULT_MATCHES = 10
MAX_SUBJECT_MATCHES = 1000
# A retention sweep's calls to SearchService (one PurgeFaces may remove many faces).
SWEEP_TIMEOUT_S = 300.0
# Face and image ids of an IndexFaces call with a request_id are derived from it.
_FACE_ID_NAMESPACE = uuid.UUID("5b0c3f7e-2a9d-4c61-9d0e-6f1f0f7c2b10")


class FaceServicer(face_service_pb2_grpc.FaceServiceServicer):  # type: ignore[misc]
    def __init__(
        self,
        settings: Settings,
        gatekeeper: Gatekeeper,
        downstream: Downstream,
        pipeline: FacePipeline,
    ) -> None:
        self._settings = settings
        self.gatekeeper = gatekeeper
        self._pipeline = pipeline
        self._flow = Identifier(downstream, pipeline, ThresholdPolicy(settings.gateway))
        self._thresholds = self._flow.thresholds
        self._signing_key: Ed25519PrivateKey | None = None  # read on the first checkpoint

    # ---------------------------------------------------------------- helpers

    async def _search_call(self, request: Message, context: Context, **renames: str) -> Any:
        """SearchService.<Method> for a <Method>Request of the search package; its response."""
        return await self._flow.search_call(request, Deadline.of(context), **renames)

    async def _collection(
        self, name: str, context: Context, field: str
    ) -> resources_pb2.Collection:
        return await self._flow.collection(name, Deadline.of(context), field)

    # ---------------------------------------------------------------- detection

    @guarded
    async def DetectFaces(  # noqa: N802
        self, request: F.DetectFacesRequest, context: Context, audit: AuditDraft
    ) -> F.DetectFacesResponse:
        max_faces = validation.count(
            request.max_faces, "max_faces", limits.MAX_FACES_PER_IMAGE, limits.MAX_FACES_PER_IMAGE
        )
        detected = await self._pipeline.detect(
            request.image,
            Deadline.of(context),
            include_chips=False,
            max_faces=max_faces,
            min_confidence=request.min_confidence if request.HasField("min_confidence") else None,
            min_face_size=request.min_face_size if request.HasField("min_face_size") else None,
        )
        found = detected.response
        return F.DetectFacesResponse(
            faces=found.faces,
            image_width=found.image_width,
            image_height=found.image_height,
            orientation=found.orientation,
            model_version=found.model_version,
            min_face_size=found.min_face_size,
        )

    @guarded
    async def CompareFaces(  # noqa: N802
        self, request: F.CompareFacesRequest, context: Context, audit: AuditDraft
    ) -> F.CompareFacesResponse:
        audit.context(request.context)
        audit.images(request.source_image, request.target_image)
        validation.identification_context(request.context)
        deadline = Deadline.of(context)
        model = await self._pipeline.model(deadline)
        decision = self._thresholds.decide(
            model.version,
            request.context.purpose,
            request.similarity_threshold if request.HasField("similarity_threshold") else None,
            "similarity_threshold",
        )
        audit.threshold(decision.message)
        level = self._pipeline.quality.level(request.quality_filter)
        source, target = await asyncio.gather(
            self._pipeline.probe(
                request.source_image, request.quality_filter, deadline, "source_image"
            ),
            self._pipeline.detect(request.target_image, deadline, "target_image"),
        )
        usable = [f for f in target.faces if not self._pipeline.quality.reasons(f, level)]
        embeddings, _ = await self._pipeline.embed(usable, deadline)
        scores = cosines(source.embedding, embeddings)
        matches: list[F.CompareFacesMatch] = []
        unmatched = [without_chip(f) for f in target.faces if f not in usable]
        for face, cosine in zip(usable, scores, strict=True):
            score = decision.scale.score(float(cosine))
            if score.admitted(decision.applied):
                rate, upper = decision.rates_at(score.cosine)
                matches.append(
                    F.CompareFacesMatch(
                        face=without_chip(face),
                        similarity=score.similarity,
                        cosine_similarity=score.cosine,
                        distance=score.distance,
                        threshold_applied=decision.applied,
                        model_version=source.model_version,
                        false_match_rate=rate,
                        false_match_rate_upper_bound=upper,
                    )
                )
            else:
                unmatched.append(without_chip(face))
        matches.sort(key=lambda m: -m.similarity)
        threshold = decision.with_compared(len(usable))
        audit.threshold(threshold)
        audit.model_version(source.model_version)
        audit.results(
            (),
            [m.similarity for m in matches],
            [m.false_match_rate for m in matches],
            count=len(matches),
        )
        return F.CompareFacesResponse(
            source_face=source.face,
            face_matches=matches,
            unmatched_faces=unmatched,
            threshold=threshold,
            model_version=source.model_version,
        )

    # ---------------------------------------------------------------- collections

    @guarded
    async def CreateCollection(  # noqa: N802
        self, request: F.CreateCollectionRequest, context: Context, audit: AuditDraft
    ) -> F.CreateCollectionResponse:
        audit.collection(f"collections/{request.collection_id}")
        model = await self._pipeline.model(Deadline.of(context))
        given = request.collection
        collection = resources_pb2.Collection(
            display_name=given.display_name,
            description=given.description,
            dimension=model.dimension,
            metric=resources_pb2.METRIC_COSINE,
            model_version=model.version,
            similarity_calibration=model.calibration_message,
            production=given.production,
        )
        if given.HasField("face_retention"):
            collection.face_retention.CopyFrom(given.face_retention)
        if given.HasField("min_match_threshold"):
            self._thresholds.check_collection_minimum(
                given.min_match_threshold, model.version, None, "collection.min_match_threshold"
            )
            collection.min_match_threshold = given.min_match_threshold
            audit.threshold(common_pb2.MatchThreshold(collection_minimum=given.min_match_threshold))
        response: S.CreateCollectionResponse = await self._search_call(
            S.CreateCollectionRequest(collection_id=request.collection_id, collection=collection),
            context,
        )
        audit.model_version(model.version)
        return F.CreateCollectionResponse(collection=response.collection)

    @guarded
    async def GetCollection(  # noqa: N802
        self, request: F.GetCollectionRequest, context: Context, audit: AuditDraft
    ) -> F.GetCollectionResponse:
        return F.GetCollectionResponse(
            collection=await self._collection(request.name, context, "name")
        )

    @guarded
    async def ListCollections(  # noqa: N802
        self, request: F.ListCollectionsRequest, context: Context, audit: AuditDraft
    ) -> F.ListCollectionsResponse:
        response: S.ListCollectionsResponse = await self._search_call(
            S.ListCollectionsRequest(page_size=request.page_size, page_token=request.page_token),
            context,
        )
        return F.ListCollectionsResponse(
            collections=response.collections, next_page_token=response.next_page_token
        )

    @guarded
    async def UpdateCollection(  # noqa: N802
        self, request: F.UpdateCollectionRequest, context: Context, audit: AuditDraft
    ) -> F.UpdateCollectionResponse:
        name = request.collection.name
        audit.collection(name)
        audit.target(name)
        names.parse_collection(name, "collection.name")
        paths = field_masks.update_paths(request.update_mask, field_masks.COLLECTION_UPDATABLE)
        given = request.collection
        if "min_match_threshold" in paths and given.HasField("min_match_threshold"):
            current = await self._collection(name, context, "collection.name")
            self._thresholds.check_collection_minimum(
                given.min_match_threshold,
                current.model_version,
                current.similarity_calibration,
                "collection.min_match_threshold",
            )
            audit.threshold(common_pb2.MatchThreshold(collection_minimum=given.min_match_threshold))
        response: S.UpdateCollectionResponse = await self._search_call(
            S.UpdateCollectionRequest(collection=given, update_mask=request.update_mask),
            context,
        )
        audit.model_version(response.collection.model_version)
        audit.results([response.collection.name])
        return F.UpdateCollectionResponse(collection=response.collection)

    @guarded
    async def DeleteCollection(  # noqa: N802
        self, request: F.DeleteCollectionRequest, context: Context, audit: AuditDraft
    ) -> F.DeleteCollectionResponse:
        audit.collection(request.name)
        response: S.DeleteCollectionResponse = await self._search_call(
            S.DeleteCollectionRequest(name=request.name, force=request.force),
            context,
        )
        audit.results((), count=int(response.deleted_face_count))
        return F.DeleteCollectionResponse(deleted_face_count=response.deleted_face_count)

    # ---------------------------------------------------------------- faces

    @guarded
    async def IndexFaces(  # noqa: N802
        self, request: F.IndexFacesRequest, context: Context, audit: AuditDraft
    ) -> F.IndexFacesResponse:
        audit.collection(request.parent)
        audit.images(request.image)
        collection_id = names.parse_collection(request.parent, "parent")
        subject_id = validation.optional_id(request.subject_id, names.SUBJECT_ID, "subject_id")
        default_max = 1 if subject_id else limits.MAX_FACES_PER_IMAGE
        max_faces = validation.count(
            request.max_faces,
            "max_faces",
            1 if subject_id else limits.MAX_FACES_PER_IMAGE,
            default_max,
        )
        validation.optional_id(
            request.external_image_id, names.EXTERNAL_IMAGE_ID, "external_image_id"
        )
        validation.optional_id(request.source_id, names.SOURCE_ID, "source_id")
        validation.metadata(request.metadata)
        request_uuid = validation.request_id(request.request_id)
        level = self._pipeline.quality.level(request.quality_filter)
        if subject_id:
            subject = str(names.SubjectName(collection_id, subject_id))
            audit.target(subject)
            await self._search_call(
                S.GetSubjectRequest(name=subject),
                context,
                name="subject_id",
            )
        else:
            await self._collection(request.parent, context, "parent")
        detected = await self._pipeline.detect(
            request.image,
            Deadline.of(context),
            min_face_size=request.min_face_size if request.HasField("min_face_size") else None,
        )
        chosen: list[common_pb2.FaceDetail] = []
        unindexed: list[F.UnindexedFace] = []
        for face in detected.faces:
            reasons = self._pipeline.quality.reasons(face, level)
            if not reasons and len(chosen) >= max_faces:
                reasons = [Reason.UNINDEXED_REASON_EXCEEDS_MAX_FACES]
            if reasons:
                unindexed.append(F.UnindexedFace(face_detail=without_chip(face), reasons=reasons))
            else:
                chosen.append(face)
        embeddings, model_version = await self._pipeline.embed(chosen, Deadline.of(context))
        image_digest = hashlib.sha256(request.image).hexdigest()
        image_id = _derived_id(request_uuid, request.parent, image_digest, "image")
        faces = []
        for index, (face, embedding) in enumerate(zip(chosen, embeddings, strict=True)):
            face_id = _derived_id(request_uuid, request.parent, image_digest, str(index))
            faces.append(
                resources_pb2.Face(
                    name=str(names.FaceName(collection_id, face_id)),
                    subject_id=subject_id,
                    external_image_id=request.external_image_id,
                    image_id=image_id,
                    source_id=request.source_id,
                    metadata=request.metadata,
                    bounding_box=face.bounding_box,
                    confidence=face.confidence,
                    quality=face.quality,
                    model_version=model_version,
                    embedding=embedding,
                )
            )
        stored: list[resources_pb2.Face] = []
        if faces:
            response: S.BatchUpsertFacesResponse = await self._search_call(
                S.BatchUpsertFacesRequest(parent=request.parent, faces=faces),
                context,
            )
            stored = list(response.faces)
        audit.model_version(model_version)
        audit.results(f.name for f in stored)
        for stored_face in stored:
            stored_face.ClearField("embedding")
        return F.IndexFacesResponse(
            face_records=[
                F.FaceRecord(face=face, face_detail=without_chip(detail))
                for face, detail in zip(stored, chosen, strict=True)
            ],
            unindexed_faces=unindexed,
            image_id=image_id,
            image_width=detected.response.image_width,
            image_height=detected.response.image_height,
            orientation=detected.response.orientation,
            model_version=model_version,
            min_face_size=detected.response.min_face_size,
        )

    @guarded
    async def GetFace(  # noqa: N802
        self, request: F.GetFaceRequest, context: Context, audit: AuditDraft
    ) -> F.GetFaceResponse:
        response: S.GetFaceResponse = await self._search_call(
            S.GetFaceRequest(name=request.name, view=S.FACE_VIEW_BASIC),
            context,
        )
        return F.GetFaceResponse(face=response.face)

    @guarded
    async def ListFaces(  # noqa: N802
        self, request: F.ListFacesRequest, context: Context, audit: AuditDraft
    ) -> F.ListFacesResponse:
        response: S.ListFacesResponse = await self._search_call(
            S.ListFacesRequest(
                parent=request.parent,
                page_size=request.page_size,
                page_token=request.page_token,
                filter=request.filter,
                view=S.FACE_VIEW_BASIC,
            ),
            context,
        )
        return F.ListFacesResponse(faces=response.faces, next_page_token=response.next_page_token)

    @guarded
    async def BatchDeleteFaces(  # noqa: N802
        self, request: F.BatchDeleteFacesRequest, context: Context, audit: AuditDraft
    ) -> F.BatchDeleteFacesResponse:
        audit.collection(request.parent)
        response: S.BatchDeleteFacesResponse = await self._search_call(
            S.BatchDeleteFacesRequest(
                parent=request.parent, names=request.names, allow_missing=request.allow_missing
            ),
            context,
        )
        audit.results(response.deleted_faces)
        return F.BatchDeleteFacesResponse(deleted_faces=response.deleted_faces)

    # ---------------------------------------------------------------- search

    @guarded
    async def SearchFaces(  # noqa: N802
        self, request: F.SearchFacesRequest, context: Context, audit: AuditDraft
    ) -> F.SearchFacesResponse:
        audit.context(request.context)
        audit.target(request.face)
        validation.identification_context(request.context)
        face_name = names.parse_face(request.face, "face")
        audit.collection(names.collection_name(face_name.collection))
        max_faces = validation.count(request.max_faces, "max_faces", MAX_MATCHES, DEFAULT_MATCHES)
        requested = (
            request.face_match_threshold if request.HasField("face_match_threshold") else None
        )
        check_requested(requested, "face_match_threshold")
        parent = names.collection_name(face_name.collection)
        found, collection = await asyncio.gather(
            self._search_call(
                S.GetFaceRequest(name=request.face, view=S.FACE_VIEW_FULL),
                context,
                name="face",
            ),
            self._collection(parent, context, "face"),
        )
        stored = found.face
        decision = self._flow.decide(
            collection, request.context.purpose, requested, "face_match_threshold"
        )
        audit.threshold(decision.message)
        [matches] = await self._flow.search(
            parent,
            [stored.embedding],
            stored.model_version,
            min(max_faces + 1, MAX_MATCHES),
            decision,
            Deadline.of(context),
        )
        matches = [m for m in matches if m.face.name != request.face][:max_faces]
        threshold = decision.with_compared(int(collection.face_count) - 1)
        audit.threshold(threshold)
        audit.model_version(stored.model_version)
        self._audit_matches(audit, matches)
        return F.SearchFacesResponse(
            searched_face=request.face,
            face_matches=matches,
            threshold=threshold,
            model_version=stored.model_version,
        )

    @staticmethod
    def _audit_matches(audit: AuditDraft, matches: list[resources_pb2.FaceMatch]) -> None:
        audit.results(
            [m.face.name for m in matches],
            [m.similarity for m in matches],
            [m.false_match_rate for m in matches],
        )

    @guarded
    async def SearchFacesByImage(  # noqa: N802
        self, request: F.SearchFacesByImageRequest, context: Context, audit: AuditDraft
    ) -> F.SearchFacesByImageResponse:
        audit.context(request.context)
        audit.collection(request.parent)
        audit.images(request.image)
        validation.identification_context(request.context)
        names.parse_collection(request.parent, "parent")
        max_faces = validation.count(request.max_faces, "max_faces", MAX_MATCHES, DEFAULT_MATCHES)
        probe, searched = await self._flow.identify_image(
            request.image,
            request.quality_filter,
            request.parent,
            request.context.purpose,
            request.face_match_threshold if request.HasField("face_match_threshold") else None,
            "face_match_threshold",
            max_faces,
            Deadline.of(context),
            audit.threshold,
        )
        matches = searched.matches
        threshold = searched.threshold()
        audit.threshold(threshold)
        audit.model_version(probe.model_version)
        self._audit_matches(audit, matches)
        return F.SearchFacesByImageResponse(
            searched_face=probe.face,
            detected_face_count=probe.detected_face_count,
            face_matches=matches,
            threshold=threshold,
            model_version=probe.model_version,
        )

    # ---------------------------------------------------------------- subjects

    @guarded
    async def CreateSubject(  # noqa: N802
        self, request: F.CreateSubjectRequest, context: Context, audit: AuditDraft
    ) -> F.CreateSubjectResponse:
        audit.collection(request.parent)
        audit.target(f"{request.parent}/subjects/{request.subject_id}")
        validation.metadata(request.subject.metadata, "subject.metadata")
        response: S.CreateSubjectResponse = await self._search_call(
            S.CreateSubjectRequest(
                parent=request.parent, subject_id=request.subject_id, subject=request.subject
            ),
            context,
        )
        return F.CreateSubjectResponse(subject=response.subject)

    @guarded
    async def GetSubject(  # noqa: N802
        self, request: F.GetSubjectRequest, context: Context, audit: AuditDraft
    ) -> F.GetSubjectResponse:
        response: S.GetSubjectResponse = await self._search_call(
            S.GetSubjectRequest(name=request.name), context
        )
        return F.GetSubjectResponse(subject=response.subject)

    @guarded
    async def ListSubjects(  # noqa: N802
        self, request: F.ListSubjectsRequest, context: Context, audit: AuditDraft
    ) -> F.ListSubjectsResponse:
        response: S.ListSubjectsResponse = await self._search_call(
            S.ListSubjectsRequest(
                parent=request.parent, page_size=request.page_size, page_token=request.page_token
            ),
            context,
        )
        return F.ListSubjectsResponse(
            subjects=response.subjects, next_page_token=response.next_page_token
        )

    @guarded
    async def DeleteSubject(  # noqa: N802
        self, request: F.DeleteSubjectRequest, context: Context, audit: AuditDraft
    ) -> F.DeleteSubjectResponse:
        audit.target(request.name)
        subject = names.parse_subject(request.name)
        audit.collection(names.collection_name(subject.collection))
        response: S.DeleteSubjectResponse = await self._search_call(
            S.DeleteSubjectRequest(name=request.name, force=request.force),
            context,
        )
        audit.results((), count=int(response.deleted_face_count))
        return F.DeleteSubjectResponse(deleted_face_count=response.deleted_face_count)

    @guarded
    async def AssociateFaces(  # noqa: N802
        self, request: F.AssociateFacesRequest, context: Context, audit: AuditDraft
    ) -> F.AssociateFacesResponse:
        subject = await self._change_subject("AssociateFaces", request, context, audit)
        return F.AssociateFacesResponse(subject=subject)

    @guarded
    async def DisassociateFaces(  # noqa: N802
        self, request: F.DisassociateFacesRequest, context: Context, audit: AuditDraft
    ) -> F.DisassociateFacesResponse:
        subject = await self._change_subject("DisassociateFaces", request, context, audit)
        return F.DisassociateFacesResponse(subject=subject)

    async def _change_subject(
        self,
        method: str,
        request: F.AssociateFacesRequest | F.DisassociateFacesRequest,
        context: Context,
        audit: AuditDraft,
    ) -> resources_pb2.Subject:
        audit.target(request.subject)
        subject = names.parse_subject(request.subject, "subject")
        audit.collection(names.collection_name(subject.collection))
        search_request = getattr(S, f"{method}Request")(
            subject=request.subject, faces=request.faces
        )
        response = await self._search_call(search_request, context)
        audit.results(request.faces)
        changed: resources_pb2.Subject = response.subject
        return changed

    @guarded
    async def SearchSubjectsByImage(  # noqa: N802
        self, request: F.SearchSubjectsByImageRequest, context: Context, audit: AuditDraft
    ) -> F.SearchSubjectsByImageResponse:
        audit.context(request.context)
        audit.collection(request.parent)
        audit.images(request.image)
        validation.identification_context(request.context)
        collection_id = names.parse_collection(request.parent, "parent")
        max_subjects = validation.count(
            request.max_subjects, "max_subjects", MAX_SUBJECT_MATCHES, DEFAULT_MATCHES
        )
        probe, searched = await self._flow.identify_image(
            request.image,
            request.quality_filter,
            request.parent,
            request.context.purpose,
            (
                request.subject_match_threshold
                if request.HasField("subject_match_threshold")
                else None
            ),
            "subject_match_threshold",
            max_subjects,
            Deadline.of(context),
            audit.threshold,
            group_by_subject=True,
        )
        matches, decision = searched.matches, searched.decision
        subjects = await asyncio.gather(
            *(
                self._search_call(
                    S.GetSubjectRequest(
                        name=str(names.SubjectName(collection_id, m.face.subject_id))
                    ),
                    context,
                )
                for m in matches
            )
        )
        subject_matches = [
            F.SubjectMatch(
                subject=found.subject,
                similarity=match.similarity,
                best_face_match=match,
                threshold_applied=decision.applied,
                model_version=probe.model_version,
            )
            for found, match in zip(subjects, matches, strict=True)
        ]
        threshold = searched.threshold()
        audit.threshold(threshold)
        audit.model_version(probe.model_version)
        audit.results(
            [m.subject.name for m in subject_matches],
            [m.similarity for m in subject_matches],
            [m.best_face_match.false_match_rate for m in subject_matches],
        )
        return F.SearchSubjectsByImageResponse(
            searched_face=probe.face,
            detected_face_count=probe.detected_face_count,
            subject_matches=subject_matches,
            threshold=threshold,
            model_version=probe.model_version,
        )

    # ---------------------------------------------------------------- review

    @guarded
    async def CreateReviewDecision(  # noqa: N802
        self, request: F.CreateReviewDecisionRequest, context: Context, audit: AuditDraft
    ) -> F.CreateReviewDecisionResponse:
        decision = request.review_decision
        log = self.gatekeeper.audit_log
        reviewed = await reviews.reviewed_record(
            log, decision.reviewed_record, "review_decision.reviewed_record"
        )
        # On the record as the reviewed call was: its case and purpose, its collection.
        audit.target(reviewed.name)
        audit.context(reviewed.context)
        audit.collection(reviewed.collection)
        self.gatekeeper.check_purpose(audit, reviewed.context)
        reviews.check_decision(decision, reviewed)
        audit.review(decision)
        return F.CreateReviewDecisionResponse()  # audit_record: set by the gatekeeper

    @guarded
    async def ListReviewDecisions(  # noqa: N802
        self, request: F.ListReviewDecisionsRequest, context: Context, audit: AuditDraft
    ) -> F.ListReviewDecisionsResponse:
        size = paging.page_size(request.page_size)
        log = self.gatekeeper.audit_log
        reviewed = await reviews.reviewed_record(log, request.reviewed_record, "reviewed_record")
        audit.target(reviewed.name)
        audit.context(reviewed.context)
        self.gatekeeper.check_purpose(audit, reviewed.context)
        response = await reviews.decisions_of(log, reviewed, size, request.page_token)
        audit.results((), count=len(response.audit_records))
        return response

    # ---------------------------------------------------------------- audit

    @guarded
    async def GetAuditRecord(  # noqa: N802
        self, request: F.GetAuditRecordRequest, context: Context, audit: AuditDraft
    ) -> F.GetAuditRecordResponse:
        audit.target(request.name)
        record = await audit_records.record_named(self.gatekeeper.audit_log, request.name, "name")
        return F.GetAuditRecordResponse(audit_record=record)

    @guarded
    async def ListAuditRecords(  # noqa: N802
        self, request: F.ListAuditRecordsRequest, context: Context, audit: AuditDraft
    ) -> F.ListAuditRecordsResponse:
        size = paging.page_size(request.page_size)
        validation.time_range(request.filter.create_time_range, "filter.create_time_range")
        fingerprint = paging.request_fingerprint(
            "audit", request.filter.SerializeToString(deterministic=True).hex()
        )
        after = paging.decode_page_token(request.page_token, fingerprint)
        page = await self.gatekeeper.audit_log.list(request.filter, int(after or 0), size)
        token = paging.encode_page_token(str(page.last_sequence), fingerprint) if page.more else ""
        audit.results((), count=len(page.records))
        return F.ListAuditRecordsResponse(audit_records=page.records, next_page_token=token)

    @guarded
    async def GetAuditCheckpoint(  # noqa: N802
        self, request: F.GetAuditCheckpointRequest, context: Context, audit: AuditDraft
    ) -> F.GetAuditCheckpointResponse:
        if self._signing_key is None:
            self._signing_key = await asyncio.to_thread(
                audit_checkpoint.load_or_create_key, self._settings.gateway.audit_signing_key_file
            )
        head = await self.gatekeeper.audit_log.head()
        now = datetime.now(UTC).replace(microsecond=0)
        checkpoint = audit_checkpoint.Checkpoint(
            sequence_number=head.sequence_number if head else 0,
            record_hash=head.record_hash if head else b"",
            time=now,
        )
        response = F.GetAuditCheckpointResponse(
            sequence_number=checkpoint.sequence_number,
            record_hash=checkpoint.record_hash,
            signed_note=audit_checkpoint.sign(checkpoint, self._signing_key),
            public_key_pem=audit_checkpoint.public_pem(self._signing_key.public_key()).decode(),
        )
        response.create_time.FromDatetime(now)
        if head is not None:
            audit.target(head.name)
        return response


def _derived_id(request_uuid: uuid.UUID | None, parent: str, digest: str, part: str) -> str:
    """A fresh UUID, or one derived from the request id so that a retry stores the same."""
    if request_uuid is None:
        return str(uuid.uuid4())
    return str(uuid.uuid5(_FACE_ID_NAMESPACE, f"{request_uuid}/{parent}/{digest}/{part}"))


def build_server(
    settings: Settings, servicer: FaceServicer, port: int | None = None
) -> FacegridServer:
    """The gateway service's gRPC server around a servicer built with its dependencies (in
    the event loop it will run in); on ``gateway.port`` unless ``port`` is given."""
    registration = ServiceRegistration.of(
        face_service_pb2,
        "FaceService",
        face_service_pb2_grpc.add_FaceServiceServicer_to_server,
        servicer,
    )
    return FacegridServer.for_service("gateway", registration, settings, port)


async def serve(settings: Settings) -> None:
    gateway = settings.gateway
    callers = Authenticator.configured(gateway.credentials_file, settings.oidc)
    callers.reload_on_sighup()
    ThresholdPolicy(gateway)  # refuses a misconfigured policy before serving
    audit_log = open_audit_log(gateway)
    downstream = Downstream.configured(gateway, settings)
    pipeline = FacePipeline(downstream, QualityPolicy(gateway))
    quotas = Quotas(gateway.quotas, open_quota_store(gateway) if gateway.quotas else None)
    gatekeeper = Gatekeeper(callers, audit_log, "facegrid.v1.FaceService", quotas)
    servicer = FaceServicer(settings, gatekeeper, downstream, pipeline)
    server = build_server(settings, servicer)

    expiry = RetentionSchedule(
        FACE_RETENTION_TASK,
        audit_log,
        FaceExpiry(downstream, SWEEP_TIMEOUT_S).sweep,
        gateway.retention_interval_s,
    )

    async def on_stop() -> None:
        await expiry.stop()
        await downstream.close()
        audit_log.close()

    expiry.start()
    await run_until_stopped(server, on_stop)
