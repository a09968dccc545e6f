"""Locust users calling the gateway over gRPC with a realistic mix (loadtest/load_cluster.py
starts the cluster and this; run by hand).

Each user calls at a fixed rate (``constant_throughput``), so the arrival rate is
users x FACEGRID_LOAD_RATE calls/s whatever the latency: searches by image, enrolments,
reads (get/list), comparisons and deletes of faces it enrolled. The channel balances
round-robin over every gateway address the name resolves to, with health checks, and
gRPC retries UNAVAILABLE for every method of the mix: each is idempotent as sent
(searches, comparisons and enrolments carry a request_id, deletes set allow_missing), so
a retry neither enrols twice nor leaves a second audit record.

Each identification call and its outcome is appended to FACEGRID_LOAD_LEDGER (JSON
lines: method, request_id, status, the audit record its reply named), which
load_cluster.py checks against the audit log.

Environment: FACEGRID_LOAD_TARGET (gRPC target of the gateway), FACEGRID_LOAD_TOKEN,
FACEGRID_LOAD_PHOTOS (a folder of photos, one face each), FACEGRID_LOAD_RATE (calls/s a
user, default 0.5), FACEGRID_LOAD_COLLECTION (default "load"), FACEGRID_LOAD_LEDGER.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User, constant_throughput, task

grpc_gevent.init_gevent()

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))

from facegrid import methods  # noqa: E402
from facegrid.v1 import common_pb2, face_service_pb2, face_service_pb2_grpc  # noqa: E402

F = face_service_pb2
TARGET = os.environ.get("FACEGRID_LOAD_TARGET", "127.0.0.1:50050")
TOKEN = os.environ.get("FACEGRID_LOAD_TOKEN", "")
PHOTOS = sorted(
    p.read_bytes()
    for p in Path(os.environ.get("FACEGRID_LOAD_PHOTOS", ".")).rglob("*")
    if p.suffix.lower() in (".jpg", ".jpeg", ".png")
)
RATE = float(os.environ.get("FACEGRID_LOAD_RATE", "0.5"))
PARENT = f"collections/{os.environ.get('FACEGRID_LOAD_COLLECTION', 'load')}"
CONTEXT = common_pb2.IdentificationContext(
    purpose=common_pb2.IdentificationContext.PURPOSE_TESTING, case_id="LOAD-1"
)
LEDGER = os.environ.get("FACEGRID_LOAD_LEDGER", "")
# Every method the contract declares idempotent, and those idempotent as this mix sends
# them (IndexFaces with a request_id, BatchDeleteFaces with allow_missing).
SERVICE_CONFIG = methods.service_config(
    methods.retry_policy_names(
        "facegrid.v1.FaceService", always_sent_with=["request_id", "allow_missing"]
    ),
    {
        "maxAttempts": 4,
        "initialBackoff": "0.1s",
        "maxBackoff": "1s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    },
)


class GatewayUser(User):
    wait_time = constant_throughput(RATE)

    def on_start(self) -> None:
        self.channel = grpc.insecure_channel(
            TARGET,
            options=[
                ("grpc.service_config", SERVICE_CONFIG),
                ("grpc.enable_retries", 1),
                # A call is retried only while its request fits the retry buffer (256 KiB by
                # default, less than many photos): past it, a replica that dies mid-call fails it.
                ("grpc.per_rpc_retry_buffer_size", 64 * 1024 * 1024),
                ("grpc.dns_min_time_between_resolutions_ms", 500),
                ("grpc.max_receive_message_length", 32 * 1024 * 1024),
                # A restarted replica is reconnected within about a second, not after
                # gRPC's default backoff of up to two minutes.
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ],
        )
        self.api = face_service_pb2_grpc.FaceServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {TOKEN}"),)
        self.enrolled: list[str] = []

    def on_stop(self) -> None:
        self.channel.close()

    def _call(self, name: str, call: Callable[[], Any], request_id: str = "") -> Any:
        started = time.perf_counter()
        error: BaseException | None = None
        result = None
        status = "OK"
        try:
            result = call()
        except grpc.RpcError as failed:
            code = failed.code()  # type: ignore[attr-defined]
            status = code.name if code else "UNKNOWN"
            error = RuntimeError(status)
        if request_id and LEDGER:
            entry = {"method": name, "request_id": request_id, "status": status}
            entry["audit_record"] = getattr(result, "audit_record", "")
            with open(LEDGER, "a") as ledger:  # one process, gevent: whole lines
                ledger.write(json.dumps(entry) + "\n")
        self.environment.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=0,
            exception=error,
            context={},
        )
        return result

    @task(4)
    def search_by_image(self) -> None:
        request = F.SearchFacesByImageRequest(
            parent=PARENT,
            image=random.choice(PHOTOS),
            max_faces=5,
            context=CONTEXT,
            request_id=str(uuid.uuid4()),
        )
        self._call(
            "SearchFacesByImage",
            lambda: self.api.SearchFacesByImage(request, metadata=self.metadata, timeout=30),
            request.request_id,
        )

    @task(1)
    def index(self) -> None:
        request = F.IndexFacesRequest(
            parent=PARENT,
            image=random.choice(PHOTOS),
            external_image_id=f"load-{uuid.uuid4().hex[:16]}",
            max_faces=1,
            request_id=str(uuid.uuid4()),
        )
        reply = self._call(
            "IndexFaces", lambda: self.api.IndexFaces(request, metadata=self.metadata, timeout=30)
        )
        if reply is not None:
            self.enrolled.extend(r.face.name for r in reply.face_records)

    @task(3)
    def read(self) -> None:
        if random.random() < 0.5:
            self._call(
                "GetCollection",
                lambda: self.api.GetCollection(
                    F.GetCollectionRequest(name=PARENT), metadata=self.metadata, timeout=30
                ),
            )
        else:
            self._call(
                "ListFaces",
                lambda: self.api.ListFaces(
                    F.ListFacesRequest(parent=PARENT, page_size=10),
                    metadata=self.metadata,
                    timeout=30,
                ),
            )

    @task(1)
    def compare(self) -> None:
        source, target = random.sample(PHOTOS, 2)
        request = F.CompareFacesRequest(
            source_image=source,
            target_image=target,
            context=CONTEXT,
            request_id=str(uuid.uuid4()),
        )
        self._call(
            "CompareFaces",
            lambda: self.api.CompareFaces(request, metadata=self.metadata, timeout=30),
            request.request_id,
        )

    @task(1)
    def delete(self) -> None:
        if not self.enrolled:
            return
        name = self.enrolled.pop(0)
        request = F.BatchDeleteFacesRequest(parent=PARENT, names=[name], allow_missing=True)
        self._call(
            "BatchDeleteFaces",
            lambda: self.api.BatchDeleteFaces(request, metadata=self.metadata, timeout=30),
        )
