"""Graceful shutdown: a rolling restart of the embedding service under load fails no call.

Two embedding instances sit behind the gateway (round-robin with client-side health
checking). Each is sent SIGTERM in turn while searches keep coming: it turns
NOT_SERVING, finishes what it has in flight, exits 0 and is started again.
"""

from __future__ import annotations

import signal
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
from conftest import inference_overrides, start_service
from facegrid.auth import ALL_SCOPES, bearer_metadata, create_token
from facegrid.internal.v1 import embedding_pb2, embedding_pb2_grpc
from facegrid.v1 import common_pb2, face_service_pb2, face_service_pb2_grpc
from facegrid_harness.launcher import ServiceGroup
from grpc_helpers import is_serving, jpeg_bytes, png_bytes, rpc_error
from prometheus_client.parser import text_string_to_metric_families
from skimage import data

F = face_service_pb2
LOAD_THREADS = 3


def _embed_calls(group: ServiceGroup, instance: str) -> float:
    port = group.services[instance].metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "facegrid_rpc_requests_total"
        and sample.labels.get("method") == "/facegrid.internal.v1.EmbeddingService/EmbedChips"
    )


def test_rolling_restart_of_embedding_under_load(model_repo: Path, tmp_path: Path) -> None:
    credentials = tmp_path / "credentials.json"
    metadata = bearer_metadata(create_token(credentials, "load", ALL_SCOPES))
    group = ServiceGroup(
        [
            *inference_overrides("local", model_repo, None),
            f"store.uri={tmp_path / 'facegrid.db'}",
            f"gateway.credentials_file={credentials}",
            f"gateway.audit_path={tmp_path / 'audit.db'}",
        ],
        log_dir=tmp_path / "logs",
    )
    with group:
        group.start("detection", port=0)
        group.start("embedding", port=0)
        group.start("embedding", port=0, instance="embedding-2")
        group.start("search", port=0)
        group.start("gateway", port=0)
        channel = grpc.insecure_channel(group.services["gateway"].address)
        api = face_service_pb2_grpc.FaceServiceStub(channel)
        api.CreateCollection(
            F.CreateCollectionRequest(collection_id="load"), timeout=60, metadata=metadata
        )
        api.IndexFaces(
            F.IndexFacesRequest(parent="collections/load", image=png_bytes(data.astronaut())),
            timeout=60,
            metadata=metadata,
        )
        search = F.SearchFacesByImageRequest(
            parent="collections/load",
            # Her mirror image: a search that finds her (scikit-image ships the photo).
            image=jpeg_bytes(np.ascontiguousarray(data.astronaut()[:, ::-1])),
            context=common_pb2.IdentificationContext(
                purpose=common_pb2.IdentificationContext.PURPOSE_TESTING, case_id="LOAD-1"
            ),
        )
        stop = threading.Event()
        succeeded: list[int] = []
        failures: list[str] = []

        def load() -> None:
            while not stop.is_set():
                try:
                    reply = api.SearchFacesByImage(search, timeout=60, metadata=metadata)
                    assert reply.face_matches
                    succeeded.append(1)
                except grpc.RpcError as error:
                    failures.append(f"{error.code().name}: {error.details()}")

        threads = [threading.Thread(target=load) for _ in range(LOAD_THREADS)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(3)
            before = len(succeeded)
            for instance in ("embedding", "embedding-2"):
                group.restart(instance)  # asserts the instance exited 0 on SIGTERM
                time.sleep(3)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=120)
        assert failures == []
        assert before > 0
        assert len(succeeded) > before + 10, "too little load went through the restarts"
        # Both restarted instances took calls again afterwards.
        assert _embed_calls(group, "embedding") > 0
        assert _embed_calls(group, "embedding-2") > 0
        channel.close()
        processes = {name: s.process for name, s in group.services.items()}
        group.stop()
    assert {name: p.returncode for name, p in processes.items()} == dict.fromkeys(processes, 0)


def test_sigterm_turns_not_serving_refuses_new_calls_and_finishes_in_flight_ones(
    model_repo: Path, tmp_path: Path
) -> None:
    service = start_service(
        "embedding",
        [*inference_overrides("local", model_repo, None), "server.drain_s=0.5"],
        tmp_path,
    )
    chips = [
        common_pb2.Chip(rgb=bytes([i % 251]) * (150 * 150 * 3), width=150, height=150)
        for i in range(256)
    ]
    request = embedding_pb2.EmbedChipsRequest(chips=chips)
    with grpc.insecure_channel(service.address) as channel:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        stub.EmbedChips(request, timeout=60)  # warm
        in_flight = [stub.EmbedChips.future(request, timeout=60) for _ in range(2)]
        time.sleep(0.2)
        service.process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        assert not is_serving(channel)  # draining: load balancers move away
        time.sleep(0.6)
        refused = rpc_error(lambda: stub.EmbedChips(request, timeout=10))
        assert refused.code() == grpc.StatusCode.UNAVAILABLE
        for call in in_flight:
            assert len(call.result().embeddings) == 256  # finished within the grace period
    assert service.process.wait(timeout=30) == 0
