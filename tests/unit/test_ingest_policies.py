"""The ingest service's policies, on its servicer built in this process: scopes and audit
records for every method, and what a stream processor must be before it is stored.

The servicer and its gatekeeper are real (audit log in SQLite, gRPC on 127.0.0.1); the
search service is a fake (tests/unit/fakes.py), and so is the processor store (NATS KV
in the service), which records what it is asked to store. Nothing here runs video: the
end-to-end suite (tests/e2e/test_ingest.py) does, with NATS, RTSP and the real services.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from facegrid import methods
from facegrid.audit_log import AuditLog
from facegrid.auth import bearer_metadata
from facegrid.identification.faces import FacePipeline
from facegrid.identification.flow import Identifier
from facegrid.identification.policy import QualityPolicy, ThresholdPolicy
from facegrid.v1 import common_pb2, face_service_pb2, ingest_pb2, ingest_pb2_grpc
from facegrid_ingest.app import SERVICE_NAME, IngestServicer, build_server
from facegrid_ingest.processors import StoredProcessor
from fakes import (
    DEADLINE_S,
    FakeDownstream,
    Fakes,
    PublicSetup,
    ServerThread,
    assert_needs_its_scope,
    serving,
)
from grpc_helpers import error_reason

I = ingest_pb2  # noqa: E741
SP = I.StreamProcessor
Purpose = common_pb2.IdentificationContext.Purpose


@dataclass
class FakeStore:
    """The processor store: what was created, and nothing running."""

    created: list[SP] = field(default_factory=list)

    async def list(self) -> list[StoredProcessor]:
        return []

    async def create(self, processor: SP, principal: str) -> StoredProcessor | None:
        self.created.append(processor)
        return StoredProcessor(processor, principal, 1)

    async def get(self, processor_id: str) -> StoredProcessor | None:
        return None

    async def status(self, key: str) -> Any:
        return None


@dataclass
class Ingest:
    address: str
    fakes: Fakes
    store: FakeStore
    setup: PublicSetup
    audit_log: AuditLog
    thread: ServerThread

    @property
    def tokens(self) -> dict[str, str]:
        return self.setup.tokens

    def records(self, method: str) -> list[face_service_pb2.AuditRecord]:
        page = self.thread.run(self.audit_log.list(face_service_pb2.AuditRecordFilter(), 0, 1000))
        return [r for r in page.records if r.method.endswith(f"/{method}")]


@pytest.fixture(scope="module")
def ingest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ingest]:
    setup = PublicSetup.in_directory(tmp_path_factory.mktemp("ingest-unit"))
    gateway = setup.settings.gateway
    fakes, store = Fakes(), FakeStore()
    downstream = FakeDownstream(fakes)
    gatekeeper = setup.gatekeeper(SERVICE_NAME)
    identifier = Identifier(
        downstream, FacePipeline(downstream, QualityPolicy(gateway)), ThresholdPolicy(gateway)
    )
    # No event log nor replica: no test here reaches them.
    servicer = IngestServicer(setup.settings, gatekeeper, identifier, store, None, None)  # type: ignore[arg-type]
    thread = ServerThread()
    try:
        with serving(thread, lambda: build_server(setup.settings, servicer, port=0)) as address:
            yield Ingest(address, fakes, store, setup, gatekeeper.audit_log, thread)
    finally:
        gatekeeper.audit_log.close()
        thread.close()


@pytest.fixture
def api(ingest: Ingest) -> Iterator[ingest_pb2_grpc.IngestServiceStub]:
    ingest.fakes.reset()
    ingest.store.created.clear()
    with grpc.insecure_channel(ingest.address) as channel:
        yield ingest_pb2_grpc.IngestServiceStub(channel)


def processor(**fields: Any) -> SP:
    given: dict[str, Any] = {
        "collection": "collections/watchlist",
        "sources": [I.VideoSource(source_id="door", push=I.PushSource())],
        "context": common_pb2.IdentificationContext(
            purpose=Purpose.PURPOSE_WATCHLIST_MONITORING, case_id="OP-7"
        ),
    }
    given.update(fields)
    return SP(**given)


def create(ingest: Ingest, api: Any, processor_id: str, given: SP, token: str = "all") -> Any:
    return api.CreateStreamProcessor(
        I.CreateStreamProcessorRequest(stream_processor_id=processor_id, stream_processor=given),
        timeout=DEADLINE_S,
        metadata=bearer_metadata(ingest.tokens[token]),
    )


def refused(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_a_processor_is_stored_stopped_with_its_outputs_cleared(ingest: Ingest, api: Any) -> None:
    given = processor()
    given.state = SP.STATE_RUNNING  # output only: not taken
    given.sources[0].state = I.VideoSource.STATE_STREAMING
    given.sources[0].owner = "someone"
    reply = create(ingest, api, "front-door", given)
    assert reply.stream_processor.name == "streamProcessors/front-door"
    assert reply.stream_processor.state == SP.STATE_STOPPED
    (stored,) = ingest.store.created
    assert stored.state == SP.STATE_STOPPED
    assert stored.sources[0].owner == ""
    assert stored.sources[0].state == I.VideoSource.STATE_UNSPECIFIED
    (record,) = ingest.records("CreateStreamProcessor")[-1:]
    assert record.status_code == 0
    assert record.context.case_id == "OP-7"
    assert record.target == "streamProcessors/front-door"


@pytest.mark.parametrize(
    ("given", "field_name"),
    [
        (processor(context=common_pb2.IdentificationContext(case_id="OP-7")), "purpose"),
        (
            processor(
                context=common_pb2.IdentificationContext(
                    purpose=Purpose.PURPOSE_WATCHLIST_MONITORING
                )
            ),
            "case_id",
        ),
        (processor(sources=[]), "sources"),
        (
            processor(
                sources=[
                    I.VideoSource(source_id=f"cam-{n}", push=I.PushSource()) for n in range(257)
                ]
            ),
            "sources",
        ),
    ],
    ids=["no purpose", "no case", "no source", "257 sources"],
)
def test_a_processor_without_what_it_needs_is_refused_and_audited(
    ingest: Ingest, api: Any, given: SP, field_name: str
) -> None:
    before = len(ingest.records("CreateStreamProcessor"))
    error = refused(lambda: create(ingest, api, "refused", given))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert field_name in error.details()
    assert not ingest.store.created
    records = ingest.records("CreateStreamProcessor")
    assert len(records) == before + 1
    assert records[-1].status_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_testing_is_refused_on_a_production_watch_list(ingest: Ingest, api: Any) -> None:
    ingest.fakes.production = True
    given = processor(
        context=common_pb2.IdentificationContext(purpose=Purpose.PURPOSE_TESTING, case_id="T-1")
    )
    error = refused(lambda: create(ingest, api, "test-run", given))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_reason(error) == "PURPOSE_NOT_ALLOWED"
    assert not ingest.store.created


INGEST_METHODS = sorted(methods.of_service(SERVICE_NAME).values(), key=lambda m: m.name)


@pytest.mark.parametrize("facts", INGEST_METHODS, ids=lambda m: m.name)
def test_every_method_needs_its_scope_and_a_refusal_is_audited(
    ingest: Ingest, api: Any, facts: methods.MethodFacts
) -> None:
    assert_needs_its_scope(ingest.address, facts, ingest.setup)
    if facts.idempotency_level != methods.NO_SIDE_EFFECTS:
        record = ingest.records(facts.name)[-1]
        assert record.principal == f"without-{facts.required_scope}"
        assert record.status_code == grpc.StatusCode.PERMISSION_DENIED.value[0]
