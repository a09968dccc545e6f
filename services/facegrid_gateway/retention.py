"""The gateway's retention sweep: faces older than their collection's ``face_retention``.

Each collection with a retention gets one ``SearchService.PurgeFaces`` of the faces
created before ``now - face_retention``, which removes them from Milvus and from every
search replica's view (see search.proto's consistency rules); facegrid.retention runs it
on a schedule and audits the counts.
"""

from __future__ import annotations

from facegrid.identification.deadline import Deadline
from facegrid.identification.downstream import Downstream
from facegrid.internal.v1 import search_pb2
from facegrid.retention import EXPIRE_FACES, Removal, timestamp
from facegrid.v1 import common_pb2, resources_pb2

S = search_pb2
TASK = "face-retention"
_PAGE = 1000


class FaceExpiry:
    """``sweep(now)``: purge every collection's expired faces; what was removed."""

    def __init__(self, downstream: Downstream, timeout_s: float) -> None:
        self._downstream = downstream
        self._timeout_s = timeout_s

    async def sweep(self, now: float) -> list[Removal]:
        removals = []
        for collection in await self._collections():
            if not collection.HasField("face_retention"):
                continue
            retention = collection.face_retention
            cutoff = now - (retention.seconds + retention.nanos / 1e9)
            purged: S.PurgeFacesResponse = await self._downstream.call(
                self._downstream.search.PurgeFaces,
                S.PurgeFacesRequest(
                    parent=collection.name,
                    filter=resources_pb2.FaceFilter(
                        create_time_range=common_pb2.TimeRange(end_time=timestamp(cutoff))
                    ),
                    force=True,
                ),
                Deadline.after(self._timeout_s),
                "search",
            )
            removals.append(Removal(EXPIRE_FACES, collection.name, "", purged.purge_count, cutoff))
        return removals

    async def _collections(self) -> list[resources_pb2.Collection]:
        collections: list[resources_pb2.Collection] = []
        token = ""
        while True:
            page: S.ListCollectionsResponse = await self._downstream.call(
                self._downstream.search.ListCollections,
                S.ListCollectionsRequest(page_size=_PAGE, page_token=token),
                Deadline.after(self._timeout_s),
                "search",
            )
            collections.extend(page.collections)
            token = page.next_page_token
            if not token:
                return collections
