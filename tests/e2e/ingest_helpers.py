"""An ingest stack for tests: a real nats-server, the four services and ingest replicas
as processes (tests/conftest.py's start_stack), and helpers to enrol a watch-list."""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import grpc
from facegrid import diagnostics
from facegrid.v1 import (
    common_pb2,
    face_service_pb2,
    face_service_pb2_grpc,
    ingest_pb2,
    ingest_pb2_grpc,
    resources_pb2,
)
from facegrid_harness.nats_server import NatsServer

from tests.conftest import SHARED_DATA, Stack, inference_overrides, start_stack, stop_stack

F = face_service_pb2
I = ingest_pb2  # noqa: E741
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
def ingest_stack(
    model_repo: Path,
    work: Path,
    allowed_dirs: list[Path],
    ingest_extra: Sequence[str] = (),
    overrides: Sequence[str] = (),
) -> Iterator[IngestStack]:
    """Everything running, one ingest replica ("replica-a", with ``ingest_extra``
    settings), every service with ``overrides``; stopped afterwards, each process
    checked to exit 0."""
    dirs = ", ".join(f'"{d.resolve()}"' for d in allowed_dirs)
    with NatsServer(work / "nats") as nats:
        stack = start_stack(
            [
                *inference_overrides("local", model_repo, None),
                f"ingest.nats_url={nats.url}",
                f"ingest.lease_s={LEASE_S}",
                f"ingest.allowed_dirs=[{dirs}]",
                'ingest.allowed_hosts=["127.0.0.1"]',
                *overrides,
            ],
            work,
        )
        try:
            service = stack.group.start(
                "ingest",
                port=0,
                instance="ingest",
                extra=["ingest.replica_id=replica-a", "server.log_level=DEBUG", *ingest_extra],
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


def clip_jpegs(count: int = 5, fps: float = 2.0, start_s: float = 4.5) -> list[bytes]:
    """Frames of the clip at ``fps`` from ``start_s``, as JPEG: he faces the camera from
    about 5 s on (the file source's event is at frame 150)."""
    out: list[bytes] = []
    with av.open(str(CLIP)) as container:
        stream = container.streams.video[0]
        next_time = start_s
        for frame in container.decode(stream):
            if frame.time is None or frame.time + 1e-6 < next_time:
                continue
            buffer = io.BytesIO()
            frame.to_image().save(buffer, format="JPEG", quality=90)
            out.append(buffer.getvalue())
            next_time += 1.0 / fps
            if len(out) == count:
                break
    return out


def push_visit(
    s: IngestStack,
    name: str,
    source_id: str,
    frames: list[bytes],
    start: float,
    first_seq: int,
    timeout_s: float = 120,
) -> I.PushFramesResponse:
    """One visit of him: his frames at 2 fps from capture time ``start``, paced so the
    pipeline keeps up. A call that fails says where the ingest replica was waiting."""

    def messages() -> Iterator[I.PushFramesRequest]:
        for index, jpeg in enumerate(frames):
            message = I.PushFramesRequest(
                stream_processor=name if index == 0 else "",
                source_id=source_id if index == 0 else "",
                frame=jpeg,
                sequence_number=first_seq + index,
            )
            message.capture_time.FromNanoseconds(int((start + index * 0.5) * 1e9))
            yield message
            time.sleep(0.4)

    try:
        response: I.PushFramesResponse = s.ingest.PushFrames(
            messages(), metadata=s.metadata(), timeout=timeout_s
        )
    except grpc.RpcError as error:
        raise PushFramesError(error, stacks_of(s, "ingest")) from error
    return response


class PushFramesError(AssertionError):
    """PushFrames ended with an error; ``stacks`` is what the replica was doing then."""

    def __init__(self, error: grpc.RpcError, stacks: str) -> None:
        self.code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
        self.stacks = stacks
        details = error.details()  # type: ignore[attr-defined]
        super().__init__(f"PushFrames ended {self.code.name}: {details}\n{stacks}")


def stacks_of(s: IngestStack, instance: str) -> str:
    """What a running service is doing now: first the calls it serves and the line each
    waits on (short, so that a truncated CI log still shows it), then the last 30 lines
    it logged, then all its stacks (ServiceGroup.stacks)."""
    group = s.stack.group
    if group.log_dir is None or instance not in group.services:
        return f"({instance}: no log, no stacks)"
    recent = (group.log_dir / f"{instance}.log").read_bytes().decode(errors="replace")
    stacks = group.stacks().get(instance, f"({instance} is not running: no stacks)")
    calls = diagnostics.waiting_calls(stacks) or ["(no call in its task stacks)"]
    return "\n".join(
        [
            f"--- the calls {instance} serves, where each waits:",
            *calls,
            f"--- the last lines {instance} logged:",
            *recent.splitlines()[-30:],
            "--- its stacks:",
            stacks,
        ]
    )


def wait_events(events: list[I.MatchEvent], count: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while len(events) < count and time.monotonic() < deadline:
        time.sleep(0.2)
