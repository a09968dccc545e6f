"""Verified erasure, end to end on the embedded default (Milvus Lite, one machine).

A subject on a watch-list, with a face and a match event (a passer-by's chip) is
deleted through the gateway. The ingest service follows the audit log and erases the
event; every service is restarted; then nothing returns the subject, its face or the
event, the search index snapshot does not hold the embedding, and no file facegrid wrote
holds the embedding's bytes, the chip's bytes or the ids, except the audit log (ids, on
purpose) and Milvus Lite's own data files, which keep deleted rows on disk (measured
here, and said in README's Security section)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from facegrid.internal.v1 import search_pb2, search_pb2_grpc
from facegrid.v1 import common_pb2, face_service_pb2, ingest_pb2, resources_pb2
from facegrid_harness.milvus_server import MilvusServer
from facegrid_ingest.erasure import ERASE_MATCH_EVENTS
from test_search_service import DIM, MODEL, calibration, embedding, unit

from tests.conftest import MILVUS_VENV, start_service
from tests.e2e.ingest_helpers import (
    CALL_TIMEOUT_S,
    CLIP,
    MIRANDA,
    IngestStack,
    clip_jpegs,
    enrol,
    identification_context,
    ingest_stack,
    push_visit,
)
from tests.grpc_helpers import rpc_error

F = face_service_pb2
I = ingest_pb2  # noqa: E741
S = search_pb2
SUBJECT = "lin-manuel-miranda"
LITE_DIR = "facegrid.db"  # Milvus Lite's directory in the stack's work dir

pytestmark = pytest.mark.skipif(not MIRANDA.is_file(), reason=f"{MIRANDA} is missing")


@pytest.fixture(scope="module")
def stack(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[IngestStack]:
    with ingest_stack(
        model_repo,
        tmp_path_factory.mktemp("erasure"),
        [CLIP.parent],
        ingest_extra=["ingest.erasure_interval_s=1"],
    ) as running:
        yield running


def _files_holding(root: Path, needle: bytes) -> list[str]:
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
            found.append(str(path.relative_to(root)))
    return found


def _contents(folder: Path) -> bytes:
    """Every file under ``folder``, concatenated."""
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def _wait_until(condition: object, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.3)


def test_a_deleted_subject_leaves_no_trace_but_its_receipt(stack: IngestStack) -> None:
    s = stack
    md = s.metadata()
    work = s.stack.work_dir
    parent = enrol(s, "erasure", {SUBJECT: MIRANDA})
    face = s.faces.ListFaces(
        F.ListFacesRequest(parent=parent), metadata=md, timeout=CALL_TIMEOUT_S
    ).faces[0]
    search_address = s.stack.group.services["search"].address
    with grpc.insecure_channel(search_address) as channel:
        stored = search_pb2_grpc.SearchServiceStub(channel).GetFace(
            S.GetFaceRequest(name=face.name, view=S.FACE_VIEW_FULL),
            timeout=CALL_TIMEOUT_S,
        )
    embedding = np.asarray(stored.face.embedding.values, np.float32).tobytes()
    # A restart of search first, as any gallery has had: its rows reach Lite's data
    # files, and the index snapshot holds the embedding (so the searches below can
    # find what they look for).
    snapshot = work / f"{LITE_DIR}.index"
    snapshots: list[bytes] = []
    s.stack.group.restart("search", lambda: snapshots.append(_contents(snapshot)))
    _wait_until(lambda: _reachable(s))
    assert embedding[:64] in snapshots[0]
    in_lite = _files_holding(work, embedding[:64])
    assert in_lite, "the stored embedding is found on disk"
    assert all(f.startswith(f"{LITE_DIR}/") for f in in_lite), in_lite
    # A match event of him at a door, with its chip.
    processor = s.ingest.CreateStreamProcessor(
        I.CreateStreamProcessorRequest(
            stream_processor_id="door",
            stream_processor=I.StreamProcessor(
                collection=parent,
                sources=[I.VideoSource(source_id="door-1", push=I.PushSource())],
                context=identification_context("CASE-ERASURE"),
            ),
        ),
        metadata=md,
        timeout=CALL_TIMEOUT_S,
    ).stream_processor.name
    s.ingest.StartStreamProcessor(
        I.StartStreamProcessorRequest(name=processor), metadata=md, timeout=CALL_TIMEOUT_S
    )
    push_visit(s, processor, "door-1", clip_jpegs(), time.time(), 1)

    def events() -> list[I.MatchEvent]:
        return list(
            s.ingest.ListMatchEvents(
                I.ListMatchEventsRequest(parent=processor), metadata=md, timeout=CALL_TIMEOUT_S
            ).match_events
        )

    _wait_until(lambda: len(events()) == 1)
    (event,) = events()
    chip = s.ingest.GetMatchEvent(
        I.GetMatchEventRequest(name=event.name, include_chip=True),
        metadata=md,
        timeout=CALL_TIMEOUT_S,
    ).match_event.face.chip.rgb
    assert len(chip) > 1000
    chip = chip[len(chip) // 2 : len(chip) // 2 + 256]  # a stretch of its pixels
    assert _files_holding(work / "nats", chip), "the chip is stored (the search below works)"

    # The deletion, and its erasure receipt in the audit log.
    subject = f"{parent}/subjects/{SUBJECT}"
    deleted = s.faces.DeleteSubject(
        F.DeleteSubjectRequest(name=subject, force=True), metadata=md, timeout=CALL_TIMEOUT_S
    )
    assert deleted.deleted_face_count == 1
    _wait_until(lambda: not events())

    def records(method: str) -> list[F.AuditRecord]:
        return list(
            s.faces.ListAuditRecords(
                F.ListAuditRecordsRequest(filter=F.AuditRecordFilter(method=method)),
                metadata=md,
                timeout=CALL_TIMEOUT_S,
            ).audit_records
        )

    (deletion,) = records("/facegrid.v1.FaceService/DeleteSubject")
    assert (deletion.principal, deletion.target, deletion.result_count) == (
        "investigator-1",
        subject,
        1,
    )
    (erasure,) = records(ERASE_MATCH_EVENTS)
    assert erasure.principal == "facegrid:erasure"
    assert erasure.target == deletion.name
    assert (erasure.result_count, list(erasure.result_resources)) == (1, [event.name])

    # Every service restarted; the search index is written to its snapshot, which must
    # not hold the embedding, and read back.
    for name in list(s.stack.group.services):
        s.stack.group.restart(
            name,
            (lambda: snapshots.append(_contents(snapshot))) if name == "search" else None,
        )
    _wait_until(lambda: _reachable(s))
    for call in (
        lambda: s.faces.GetSubject(F.GetSubjectRequest(name=subject), metadata=md, timeout=30),
        lambda: s.faces.GetFace(F.GetFaceRequest(name=face.name), metadata=md, timeout=30),
        lambda: s.ingest.GetMatchEvent(
            I.GetMatchEventRequest(name=event.name), metadata=md, timeout=30
        ),
    ):
        assert rpc_error(call).code() == grpc.StatusCode.NOT_FOUND
    assert not s.faces.ListFaces(F.ListFacesRequest(parent=parent), metadata=md, timeout=30).faces
    found = s.faces.SearchFacesByImage(
        F.SearchFacesByImageRequest(
            parent=parent,
            image=MIRANDA.read_bytes(),
            context=common_pb2.IdentificationContext(
                purpose=common_pb2.IdentificationContext.PURPOSE_TESTING, case_id="CASE-ERASURE"
            ),
        ),
        metadata=md,
        timeout=CALL_TIMEOUT_S,
    )
    assert not found.face_matches
    assert not events()

    # What is on disk: the snapshot, the logs, NATS's files, everything facegrid wrote.
    written = snapshots[1]
    assert b"vectors" in written  # a snapshot of the (now empty) collection
    assert embedding[:64] not in written
    assert _files_holding(work, chip) == []
    audit = {"audit.db", "audit.db-wal", "audit.db-shm"}
    face_id = face.name.rsplit("/", 1)[1].encode()
    for needle, what in ((SUBJECT.encode(), "the subject id"), (face_id, "the face id")):
        holding = [f for f in _files_holding(work, needle) if f not in audit]
        # Milvus Lite keeps deleted rows (and its delete logs) in its own files.
        assert all(f.startswith(f"{LITE_DIR}/") for f in holding), (what, holding)
    holding = _files_holding(work, embedding[:64])
    assert all(f.startswith(f"{LITE_DIR}/") for f in holding), holding
    print(f"\nMilvus Lite files still holding the deleted embedding: {holding}")


def _reachable(s: IngestStack) -> bool:
    try:
        s.faces.ListCollections(F.ListCollectionsRequest(), metadata=s.metadata(), timeout=5)
        s.ingest.ListStreamProcessors(
            I.ListStreamProcessorsRequest(), metadata=s.metadata(), timeout=5
        )
    except grpc.RpcError:
        return False
    return True


# ---------------------------------------------------------------- a Milvus server


@pytest.mark.skipif(
    os.environ.get("FACEGRID_MILVUS_GC") != "1",
    reason="about 90 s (a server of its own, compaction, garbage collection): "
    "FACEGRID_MILVUS_GC=1 runs it",
)
def test_on_a_milvus_server_a_deleted_face_leaves_the_segments(tmp_path: Path) -> None:
    """On a real Milvus 2.3.5 server, the search service compacts a collection after a
    deletion (store.compaction_delay_s) and the deleted embedding leaves every segment
    file once garbage collection has run (here every 10 s, keeping replaced files 10 s).
    What is left is rocksmq's log of the insert (kept for rocksmq.retentionTimeInMinutes;
    README), the one place the bytes are still found."""
    base = tmp_path / "milvus"
    with MilvusServer(MILVUS_VENV, base, gc_interval_s=10, gc_drop_tolerance_s=10) as server:
        service = start_service(
            "search", [f"store.uri={server.uri}", "store.compaction_delay_s=1"], tmp_path
        )
        try:
            with grpc.insecure_channel(service.address) as channel:
                search = search_pb2_grpc.SearchServiceStub(channel)
                search.CreateCollection(
                    S.CreateCollectionRequest(
                        collection_id="erased",
                        collection=resources_pb2.Collection(
                            dimension=DIM, model_version=MODEL, similarity_calibration=calibration()
                        ),
                    ),
                    timeout=CALL_TIMEOUT_S,
                )
                vectors = unit(300, seed=44)
                names = [
                    f"collections/erased/faces/{uuid.UUID(int=44 * 10**6 + i)}" for i in range(300)
                ]
                search.BatchUpsertFaces(
                    S.BatchUpsertFacesRequest(
                        parent="collections/erased",
                        faces=[
                            resources_pb2.Face(name=n, model_version=MODEL, embedding=embedding(v))
                            for n, v in zip(names, vectors, strict=True)
                        ],
                    ),
                    timeout=CALL_TIMEOUT_S,
                )
                needle = vectors[7].astype(np.float32).tobytes()[:64]
                search.BatchDeleteFaces(
                    S.BatchDeleteFacesRequest(parent="collections/erased", names=[names[7]]),
                    timeout=CALL_TIMEOUT_S,
                )
                assert _files_holding(base / "data", needle), "the embedding is on disk"

                def in_a_segment() -> bool:
                    return any(
                        f.startswith("insert_log/") for f in _files_holding(base / "data", needle)
                    )

                # The compaction flushes the deleted row into a segment first, then
                # rewrites the segment without it; the old files go at garbage collection.
                _wait_until(in_a_segment, timeout_s=60)

                def only_in_rocksmq() -> bool:
                    return all(
                        f.startswith("rocksmq/") for f in _files_holding(base / "data", needle)
                    )

                _wait_until(only_in_rocksmq, timeout_s=90)
                # The other faces are all still there.
                listed = search.ListFaces(
                    S.ListFacesRequest(parent="collections/erased", page_size=1000),
                    timeout=CALL_TIMEOUT_S,
                )
                assert len(listed.faces) == 299
                left = _files_holding(base / "data", needle)
                print(f"\nstill holding the deleted embedding: {left}")
        finally:
            assert service.stop() == 0, service.log()
