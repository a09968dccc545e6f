"""An ingest stack for tests: a real nats-server, the four services and ingest replicas
as processes (tests/conftest.py's start_stack), and helpers to enrol a watch-list."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from facegrid.nats_server import NatsServer
from facegrid.v1 import (
    common_pb2,
    face_service_pb2,
    face_service_pb2_grpc,
    ingest_pb2_grpc,
    resources_pb2,
)

from tests.conftest import SHARED_DATA, Stack, inference_overrides, start_stack, stop_stack

F = face_service_pb2
Purpose = common_pb2.IdentificationContext.Purpose
CLIP = SHARED_DATA / "faces" / "video" / "short_hamilton_clip.mp4"
MIRANDA = SHARED_DATA / "faces" / "misc" / "lin-manuel-miranda.png"
CALL_TIMEOUT_S = 30.0
LEASE_S = 3.0


@dataclass
class IngestStack:
    stack: Stack
    nats: NatsServer
    ingest: ingest_pb2_grpc.IngestServiceStub
    faces: face_service_pb2_grpc.FaceServiceStub
    channels: list[grpc.Channel]
    ingest_address: str

    def metadata(self) -> tuple[tuple[str, str]]:
        return self.stack.metadata()


@contextlib.contextmanager
def ingest_stack(model_repo: Path, work: Path, allowed_dirs: list[Path]) -> Iterator[IngestStack]:
    """Everything running, one ingest replica ("replica-a"); stopped afterwards, each
    process checked to exit 0."""
    dirs = ", ".join(f'"{d.resolve()}"' for d in allowed_dirs)
    with NatsServer(work / "nats") as nats:
        stack = start_stack(
            [
                *inference_overrides("local", model_repo, None),
                f"ingest.nats_url={nats.url}",
                f"ingest.lease_s={LEASE_S}",
                f"ingest.allowed_dirs=[{dirs}]",
                'ingest.allowed_hosts=["127.0.0.1"]',
            ],
            work,
        )
        try:
            service = stack.group.start(
                "ingest",
                port=0,
                instance="ingest",
                extra=["ingest.replica_id=replica-a", "server.log_level=DEBUG"],
            )
            channels = [
                grpc.insecure_channel(service.address),
                grpc.insecure_channel(stack.address),
            ]
            yield IngestStack(
                stack,
                nats,
                ingest_pb2_grpc.IngestServiceStub(channels[0]),
                face_service_pb2_grpc.FaceServiceStub(channels[1]),
                channels,
                service.address,
            )
            for channel in channels:
                channel.close()
        finally:
            stop_stack(stack)


def identification_context(case: str = "CASE-INGEST") -> common_pb2.IdentificationContext:
    return common_pb2.IdentificationContext(
        purpose=Purpose.PURPOSE_WATCHLIST_MONITORING, case_id=case, justification="test"
    )


def enrol(s: IngestStack, collection_id: str, people: dict[str, Path]) -> str:
    md = s.metadata()
    s.faces.CreateCollection(
        F.CreateCollectionRequest(
            collection_id=collection_id, collection=resources_pb2.Collection()
        ),
        metadata=md,
        timeout=CALL_TIMEOUT_S,
    )
    parent = f"collections/{collection_id}"
    for subject, photo in people.items():
        s.faces.CreateSubject(
            F.CreateSubjectRequest(
                parent=parent, subject_id=subject, subject=resources_pb2.Subject()
            ),
            metadata=md,
            timeout=CALL_TIMEOUT_S,
        )
        indexed = s.faces.IndexFaces(
            F.IndexFacesRequest(parent=parent, image=photo.read_bytes(), subject_id=subject),
            metadata=md,
            timeout=CALL_TIMEOUT_S,
        )
        assert len(indexed.face_records) == 1, subject
    return parent
