"""Two search replicas on one real Milvus server (started by the session): a write or a
delete acknowledged by one is what the other answers on its very next call
(store.consistency_level=Strong, the default)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from conftest import ServiceProcess, start_service
from facegrid.v1 import search_pb2, search_pb2_grpc
from grpc_helpers import DEADLINE_S, rpc_error
from test_search_service import Gallery

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
                    S.SearchServiceBatchDeleteFacesRequest(parent=made.name, names=[made.face(i)]),
                    timeout=DEADLINE_S,
                )
                assert list(reply.deleted_faces) == [made.face(i)]
                # The very next call, through the other replica: gone.
                matches = on_reader.search(made.vectors[i], top_k=5)
                assert made.face_ids[i] not in {m.face.face_id for m in matches}, i
                error = rpc_error(
                    lambda i=i: reader.GetFace(
                        S.SearchServiceGetFaceRequest(name=made.face(i)), timeout=DEADLINE_S
                    )
                )
                assert error.code() == grpc.StatusCode.NOT_FOUND
            listed = reader.ListFaces(
                S.SearchServiceListFacesRequest(parent=made.name, page_size=1000),
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


def test_both_replicas_still_serve(replicas: tuple[ServiceProcess, ServiceProcess]) -> None:
    assert all(service.alive() for service in replicas)
