"""The identification flow: a probe face searched in a collection under the policy.

detect -> choose the face -> embed -> search with the threshold the administrator's
policy decides and the false match rates the calibration measured. The gateway runs it
for one photo per call (SearchFacesByImage, SearchSubjectsByImage, SearchFaces); the
ingest service runs it for the best shots of many video sources at once. Both call
this with a :class:`Deadline`, so neither depends on the other's gRPC handlers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message

from facegrid.errors import internal, permission_denied
from facegrid.identification.deadline import Deadline
from facegrid.identification.downstream import Downstream
from facegrid.identification.faces import FacePipeline, Probe
from facegrid.identification.policy import ThresholdDecision, ThresholdPolicy, check_requested
from facegrid.internal.v1 import search_pb2
from facegrid.v1 import common_pb2, resources_pb2

Purpose = common_pb2.IdentificationContext.Purpose

S = search_pb2


@dataclass(frozen=True)
class Searched:
    """The matches of one probe, with the threshold that admitted them."""

    matches: list[resources_pb2.FaceMatch]
    decision: ThresholdDecision
    collection: resources_pb2.Collection

    def threshold(self, compared: int | None = None) -> common_pb2.MatchThreshold:
        """The threshold message, with the false candidates to expect among the faces
        compared (default: the whole collection)."""
        count = int(self.collection.face_count) if compared is None else compared
        return self.decision.with_compared(count)


class Identifier:
    """Searches probes in collections through the search service, under the policy."""

    def __init__(
        self, downstream: Downstream, pipeline: FacePipeline, thresholds: ThresholdPolicy
    ) -> None:
        self.downstream = downstream
        self.pipeline = pipeline
        self.thresholds = thresholds

    async def search_call(self, request: Message, deadline: Deadline, **renames: str) -> Any:
        """SearchService.<Method> for a <Method>Request of the search package; its response."""
        method = type(request).__name__.removesuffix("Request")
        response = await self.downstream.call(
            getattr(self.downstream.search, method),
            request,
            deadline,
            "search",
            renames or None,
        )
        expected = getattr(S, f"{method}Response")
        if not isinstance(response, expected):
            raise internal(f"SearchService.{method} answered with {type(response).__name__}")
        return response

    async def collection(
        self, name: str, deadline: Deadline, field: str = "parent"
    ) -> resources_pb2.Collection:
        response: S.GetCollectionResponse = await self.search_call(
            S.GetCollectionRequest(name=name), deadline, name=field
        )
        return response.collection

    def decide(
        self,
        collection: resources_pb2.Collection,
        purpose: int,
        requested: float | None,
        field: str,
    ) -> ThresholdDecision:
        if collection.production and purpose == Purpose.PURPOSE_TESTING:
            raise permission_denied(
                "context.purpose",
                f"{collection.name} is a production collection: PURPOSE_TESTING is refused on it",
                "PURPOSE_NOT_ALLOWED",
            )
        return self.thresholds.decide(
            collection.model_version, purpose, requested, field, collection
        )

    @staticmethod
    def with_rates(
        matches: list[resources_pb2.FaceMatch], decision: ThresholdDecision
    ) -> list[resources_pb2.FaceMatch]:
        """Each match with the false match rate measured at its cosine."""
        for match in matches:
            match.false_match_rate, match.false_match_rate_upper_bound = decision.rates_at(
                match.cosine_similarity
            )
        return matches

    async def search(
        self,
        parent: str,
        embeddings: Sequence[common_pb2.Embedding],
        model_version: str,
        top_k: int,
        decision: ThresholdDecision,
        deadline: Deadline,
        group_by_subject: bool = False,
    ) -> list[list[resources_pb2.FaceMatch]]:
        """The matches of each embedding at or above the decided threshold, one call."""
        if not embeddings:
            return []
        response: S.SearchFacesResponse = await self.search_call(
            S.SearchFacesRequest(
                parent=parent,
                queries=[common_pb2.Embedding(values=e.values) for e in embeddings],
                model_version=model_version,
                top_k=top_k,
                min_similarity=decision.applied,
                group_by_subject=group_by_subject,
            ),
            deadline,
        )
        return [self.with_rates(list(r.matches), decision) for r in response.results]

    async def probe_in(
        self,
        image: bytes,
        quality_filter: int,
        parent: str,
        purpose: int,
        requested: float | None,
        threshold_field: str,
        deadline: Deadline,
        on_decision: Callable[[common_pb2.MatchThreshold], None],
    ) -> tuple[Probe, resources_pb2.Collection, ThresholdDecision]:
        """The image's probe face, found while the collection is read and the threshold
        decided on it (``on_decision`` sees it before the probe can fail, for the audit
        record)."""
        check_requested(requested, threshold_field)
        probing = asyncio.ensure_future(self.pipeline.probe(image, quality_filter, deadline))
        try:
            collection = await self.collection(parent, deadline, "parent")
            decision = self.decide(collection, purpose, requested, threshold_field)
            on_decision(decision.message)
        except BaseException:
            probing.cancel()
            raise
        return await probing, collection, decision

    async def identify_image(
        self,
        image: bytes,
        quality_filter: int,
        parent: str,
        purpose: int,
        requested: float | None,
        threshold_field: str,
        top_k: int,
        deadline: Deadline,
        on_decision: Callable[[common_pb2.MatchThreshold], None],
        group_by_subject: bool = False,
    ) -> tuple[Probe, Searched]:
        """The whole flow for one photo: its probe face and that face's matches."""
        probe, collection, decision = await self.probe_in(
            image,
            quality_filter,
            parent,
            purpose,
            requested,
            threshold_field,
            deadline,
            on_decision,
        )
        [matches] = await self.search(
            parent,
            [probe.embedding],
            probe.model_version,
            top_k,
            decision,
            deadline,
            group_by_subject,
        )
        return probe, Searched(matches, decision, collection)
