"""The one-machine cluster (tests/e2e/cluster.py): two replicas of every service behind DNS
names, a real Milvus server, one PostgreSQL audit chain. Every tier is rolled, one
replica at a time with SIGTERM, then a search and a gateway replica are killed with
SIGKILL, while a client searches through the gateway's name: no call fails, the chain
verifies, and every successful search has exactly one record. (The short version of
loadtest/load_cluster.py.)"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from facegrid.audit_chain import verify_chain
from facegrid.v1 import common_pb2, face_service_pb2, face_service_pb2_grpc, resources_pb2

from tests.conftest import SHARED_DATA, inference_overrides
from tests.e2e.cluster import HOSTS, KINDS, Cluster, all_audit_records, running_cluster
from tests.e2e.dns_server import addresses_bind
from tests.e2e.postgres_server import find_bindir

F = face_service_pb2
PHOTO = SHARED_DATA / "faces" / "misc" / "lin-manuel-miranda.png"
SEARCH = "/facegrid.v1.FaceService/SearchFacesByImage"


pytestmark = [
    pytest.mark.skipif(find_bindir() is None, reason="no PostgreSQL server"),
    pytest.mark.skipif(not addresses_bind(*HOSTS), reason="loopback aliases do not bind"),
    pytest.mark.skipif(not PHOTO.is_file(), reason=f"{PHOTO} is missing"),
]

RETRIED = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": ""},
        "methodConfig": [
            {
                # Both idempotent (a search with a request_id is audited once).
                "name": [
                    {"service": "facegrid.v1.FaceService", "method": "SearchFacesByImage"},
                    {"service": "facegrid.v1.FaceService", "method": "GetCollection"},
                ],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)


@pytest.fixture(scope="module")
def cluster(
    model_repo: Path, milvus_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    with running_cluster(
        tmp_path_factory.mktemp("cluster"),
        milvus_server,
        inference_overrides("local", model_repo, None),
    ) as running:
        yield running


def test_every_tier_rolled_under_load_fails_no_call(cluster: Cluster) -> None:
    channel = grpc.insecure_channel(
        cluster.target("gateway"),
        options=[
            ("grpc.service_config", RETRIED),
            ("grpc.enable_retries", 1),
            # A call is retried only while its request fits the retry buffer (256 KiB by
            # default, less than many photos): past it, a replica that dies mid-call fails it.
            ("grpc.per_rpc_retry_buffer_size", 64 * 1024 * 1024),
            ("grpc.dns_min_time_between_resolutions_ms", 500),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ],
    )
    api = face_service_pb2_grpc.FaceServiceStub(channel)
    md = cluster.metadata()
    api.CreateCollection(
        F.CreateCollectionRequest(collection_id="cluster", collection=resources_pb2.Collection()),
        metadata=md,
        timeout=60,
    )
    photo = PHOTO.read_bytes()
    indexed = api.IndexFaces(
        F.IndexFacesRequest(parent="collections/cluster", image=photo, external_image_id="m-1"),
        metadata=md,
        timeout=60,
    )
    assert len(indexed.face_records) == 1
    context = common_pb2.IdentificationContext(
        purpose=common_pb2.IdentificationContext.PURPOSE_TESTING, case_id="CLUSTER-1"
    )
    outcomes: list[str] = []
    found: list[bool] = []
    answered: dict[str, str] = {}  # request_id -> the audit record the reply named
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            # One request_id a search: gRPC's retries of it resend the same bytes.
            search = F.SearchFacesByImageRequest(
                parent="collections/cluster",
                image=photo,
                max_faces=1,
                context=context,
                request_id=str(uuid.uuid4()),
            )
            try:
                reply = api.SearchFacesByImage(search, metadata=md, timeout=30)
                outcomes.append("ok")
                found.append(bool(reply.face_matches))
                answered[search.request_id] = reply.audit_record
                api.GetCollection(
                    F.GetCollectionRequest(name="collections/cluster"), metadata=md, timeout=30
                )
            except grpc.RpcError as error:
                outcomes.append(f"{error.code()}: {error.details()}")
            time.sleep(0.3)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        time.sleep(2.0)
        for kind in KINDS:
            for host in HOSTS:
                cluster.restart(kind, host)
        # Killed outright: the idempotent calls are retried on the other replica.
        for kind in ("search", "gateway"):
            cluster.kill(kind, HOSTS[0], dead_s=3.0)
        time.sleep(3.0)
    finally:
        stop.set()
        worker.join(60)
    failures = [o for o in outcomes if o != "ok"]
    rolled = 2 * len(KINDS)
    print(f"{len(outcomes)} searches while {rolled} replicas were rolled, {len(failures)} failed")
    assert not failures, f"{len(failures)} of {len(outcomes)} failed: {failures[:5]}"
    assert len(outcomes) >= 20
    assert all(found), "every search found the enrolled face"

    # One chain, verified, written by both gateway replicas; one record per success.
    records = all_audit_records(api, md)
    channel.close()
    assert verify_chain(records).intact
    searches = [r for r in records if r.method == SEARCH and r.context.case_id == "CLUSTER-1"]
    # Exactly one record per successful search, the one its reply named, even where a
    # replica died after writing it and the retry was answered by the other one.
    recorded = {(r.request_id, r.name) for r in searches if r.status_code == 0}
    assert recorded == set(answered.items())
    assert len(answered) == outcomes.count("ok")
    print(f"{len(records)} audit records in one verified chain, {len(searches)} of the searches")
