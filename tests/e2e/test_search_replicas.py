"""Two search replicas on one real Milvus server (started by the session): a write or a
delete acknowledged by one is what the other answers on its very next call
(store.consistency_level=Strong, the default)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import grpc
import pytest
from conftest import ServiceProcess, start_service
from facegrid.config import TlsSettings
from facegrid.identification.downstream import Downstream
from facegrid.internal.v1 import search_pb2, search_pb2_grpc
from facegrid.retention import Removal
from facegrid.v1 import resources_pb2
from facegrid_gateway.retention import FaceExpiry
from google.protobuf import duration_pb2
from grpc_helpers import DEADLINE_S, rpc_error
from test_search_service import DIM, MODEL, Gallery, calibration, embedding, unit

S = search_pb2


@pytest.fixture(scope="module")
def replicas(
    milvus_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    work = tmp_path_factory.mktemp("search-replicas")
    first = start_service("search", [f"store.uri={milvus_server}"], work)
    try:
        second = start_service("search", [f"store.uri={milvus_server}"], work)
    except BaseException:
        first.stop()
        raise
    yield first, second
    codes = (first.stop(), second.stop())
    assert codes == (0, 0), f"exit codes {codes}:\n{first.log()}\n{second.log()}"


def _stub(
    service: ServiceProcess, channels: list[grpc.Channel]
) -> search_pb2_grpc.SearchServiceStub:
    channel = grpc.insecure_channel(service.address)
    channels.append(channel)
    return search_pb2_grpc.SearchServiceStub(channel)


def test_a_delete_through_one_replica_is_seen_by_the_other_at_once(
    replicas: tuple[ServiceProcess, ServiceProcess],
) -> None:
    channels: list[grpc.Channel] = []
    try:
        writer, reader = (_stub(service, channels) for service in replicas)
        made = Gallery(writer, 60, seed=21)
        on_reader = made.through(reader)
        try:
            # Written through one, found through the other on the very next call.
            for i in range(0, 60, 10):
                assert (
                    on_reader.search(made.vectors[i], top_k=1)[0].face.face_id == made.face_ids[i]
                )
            for i in range(20):
                reply = writer.BatchDeleteFaces(
                    S.BatchDeleteFacesRequest(parent=made.name, names=[made.face(i)]),
                    timeout=DEADLINE_S,
                )
                assert list(reply.deleted_faces) == [made.face(i)]
                # The very next call, through the other replica: gone.
                matches = on_reader.search(made.vectors[i], top_k=5)
                assert made.face_ids[i] not in {m.face.face_id for m in matches}, i
                error = rpc_error(
                    lambda i=i: reader.GetFace(
                        S.GetFaceRequest(name=made.face(i)), timeout=DEADLINE_S
                    )
                )
                assert error.code() == grpc.StatusCode.NOT_FOUND
            listed = reader.ListFaces(
                S.ListFacesRequest(parent=made.name, page_size=1000),
                timeout=DEADLINE_S,
            )
            assert len(listed.faces) == 40
            # Re-enrolled through the reader, found through the writer at once.
            on_reader.upsert([3])
            assert made.search(made.vectors[3], top_k=1)[0].face.face_id == made.face_ids[3]
        finally:
            made.delete()
    finally:
        for channel in channels:
            channel.close()


def test_faces_expired_through_one_replica_are_gone_from_the_other(
    replicas: tuple[ServiceProcess, ServiceProcess],
) -> None:
    channels: list[grpc.Channel] = []
    try:
        writer, reader = (_stub(service, channels) for service in replicas)
        collection_id = f"r{uuid.uuid4().hex[:12]}"
        parent = f"collections/{collection_id}"
        writer.CreateCollection(
            S.CreateCollectionRequest(
                collection_id=collection_id,
                collection=resources_pb2.Collection(
                    dimension=DIM,
                    model_version=MODEL,
                    similarity_calibration=calibration(),
                    face_retention=duration_pb2.Duration(seconds=3600),
                ),
            ),
            timeout=DEADLINE_S,
        )
        vectors = unit(10, seed=33)
        ids = [str(uuid.UUID(int=33 * 10**6 + i)) for i in range(10)]
        now = int(time.time())
        faces = []
        for i in range(10):
            face = resources_pb2.Face(
                name=f"{parent}/faces/{ids[i]}",
                model_version=MODEL,
                embedding=embedding(vectors[i]),
            )
            # Six enrolled two hours ago (past the retention), four just now.
            face.create_time.FromSeconds(now - 7200 if i < 6 else now)
            faces.append(face)
        writer.BatchUpsertFaces(
            S.BatchUpsertFacesRequest(parent=parent, faces=faces), timeout=DEADLINE_S
        )

        async def sweep() -> list[Removal]:
            # The gateway's sweep (its channels made in this loop), to the first replica.
            downstream = Downstream(
                detection_address="127.0.0.1:1",
                embedding_address="127.0.0.1:1",
                search_address=replicas[0].address,
                timeout_s=DEADLINE_S,
                max_message_bytes=4 << 20,
                tls_settings=TlsSettings(),
            )
            try:
                return await FaceExpiry(downstream, DEADLINE_S).sweep(time.time())
            finally:
                await downstream.close()

        removals = asyncio.run(sweep())
        assert [(r.collection, r.count) for r in removals if r.collection == parent] == [
            (parent, 6)
        ]
        # The other replica's very next calls do not return them.
        for i in range(10):
            reply = reader.SearchFaces(
                S.SearchFacesRequest(
                    parent=parent, queries=[embedding(vectors[i])], model_version=MODEL, top_k=10
                ),
                timeout=DEADLINE_S,
            )
            found = {m.face.face_id for m in reply.results[0].matches}
            assert found == set(ids[6:]), i
        listed = reader.ListFaces(
            S.ListFacesRequest(parent=parent, page_size=100), timeout=DEADLINE_S
        )
        assert sorted(f.face_id for f in listed.faces) == sorted(ids[6:])
        error = rpc_error(
            lambda: reader.GetFace(
                S.GetFaceRequest(name=f"{parent}/faces/{ids[0]}"), timeout=DEADLINE_S
            )
        )
        assert error.code() == grpc.StatusCode.NOT_FOUND
        writer.DeleteCollection(
            S.DeleteCollectionRequest(name=parent, force=True), timeout=DEADLINE_S
        )
    finally:
        for channel in channels:
            channel.close()


def test_both_replicas_still_serve(replicas: tuple[ServiceProcess, ServiceProcess]) -> None:
    assert all(service.alive() for service in replicas)
