"""Quotas per caller: limits resolved per principal, scope and default; counted in one
table every gateway replica shares (SQLite on one machine, the real PostgreSQL server
for several); over the limit, RESOURCE_EXHAUSTED with RetryInfo, on the audit record."""

from __future__ import annotations

import asyncio
import multiprocessing
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import start_service
from facegrid.auth import SCOPE_AUDIT, SCOPE_COMPARE, Principal, bearer_metadata, create_token
from facegrid.config import GatewaySettings
from facegrid.errors import ServiceError
from facegrid.quotas import QuotaKind, Quotas, open_quota_store
from facegrid.v1 import common_pb2, face_service_pb2, face_service_pb2_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.e2e.postgres_server import PostgresServer, find_bindir

F = face_service_pb2
LIMITS = {
    "default": {"identifications_per_minute": 5},
    "scope:facegrid.search": {"identifications_per_minute": 20},
    "scope:facegrid.admin": {"identifications_per_minute": 50},
    "principal:bulk-enrolment": {"enrolments_per_minute": 1000},
}


def test_a_callers_limit_is_its_own_else_its_largest_scopes_else_the_default() -> None:
    quotas = Quotas(LIMITS, None)
    ident = QuotaKind.IDENTIFICATIONS
    assert quotas.limit(Principal("a", frozenset({"facegrid.read"})), ident) == 5
    searcher = Principal("b", frozenset({"facegrid.search", "facegrid.admin"}))
    assert quotas.limit(searcher, ident) == 50
    bulk = Principal("bulk-enrolment", frozenset({"facegrid.enrol"}))
    assert quotas.limit(bulk, QuotaKind.ENROLMENTS) == 1000
    assert quotas.limit(bulk, ident) == 5
    assert Quotas({}, None).limit(bulk, ident) is None
    with pytest.raises(ValueError, match="unknown limits"):
        Quotas({"default": {"searches_per_hour": 1}}, None)
    with pytest.raises(ValueError, match="principal:X"):
        Quotas({"alice": {"identifications_per_minute": 1}}, None)


def _take_all(quotas: Quotas, principal: Principal, count: int) -> list[ServiceError | None]:
    async def run() -> list[ServiceError | None]:
        out: list[ServiceError | None] = []
        for _ in range(count):
            try:
                await quotas.take(principal, "SearchFacesByImage")
                out.append(None)
            except ServiceError as error:
                out.append(error)
        return out

    return asyncio.run(run())


def test_two_replicas_on_one_machine_share_the_count(tmp_path: Path) -> None:
    now = [1_000_040.0]  # 20 s into a minute (1,000,020 is one)
    settings = GatewaySettings(quota_path=str(tmp_path / "quotas.db"))
    replicas = [Quotas(LIMITS, open_quota_store(settings), lambda: now[0]) for _ in range(2)]
    caller = Principal("officer-1", frozenset({"facegrid.read"}))  # the default: 5
    outcomes = [_take_all(replicas[i % 2], caller, 1)[0] for i in range(8)]
    assert [o is None for o in outcomes] == [True] * 5 + [False] * 3
    refused = outcomes[5]
    assert refused is not None
    assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    retry = next(d for d in refused.details if isinstance(d, error_details_pb2.RetryInfo))
    assert retry.retry_delay.ToMilliseconds() == 40_000  # until the next minute
    now[0] += 40  # the next window
    assert _take_all(replicas[0], caller, 1) == [None]
    # Enrolments are not identifications; other callers have their own counts.
    other = Principal("officer-2", frozenset({"facegrid.read"}))
    assert _take_all(replicas[1], other, 5) == [None] * 5


def _replica_takes(url: str, count: int, barrier: Any) -> int:
    # One fixed moment for every replica: a race across a minute's end would let the
    # next window's calls through too (a flaky count, not a fault).
    quotas = Quotas(
        LIMITS, open_quota_store(GatewaySettings(audit_database_url=url)), lambda: 2_000_010.0
    )
    barrier.wait(60)  # a replica that failed to start breaks it rather than hangs the rest
    caller = Principal("racer", frozenset({"facegrid.search"}))  # 20 a minute
    return sum(1 for o in _take_all(quotas, caller, count) if o is None)


@pytest.mark.skipif(find_bindir() is None, reason="no PostgreSQL server")
def test_replicas_racing_on_postgresql_never_let_more_through_than_the_limit() -> None:
    with PostgresServer() as server:
        context = multiprocessing.get_context("spawn")
        with context.Manager() as manager:
            barrier = manager.Barrier(4)
            with context.Pool(4) as pool:
                allowed = pool.starmap(_replica_takes, [(server.url, 15, barrier)] * 4)
    assert sum(allowed) == 20  # of 60 attempts within one minute


def test_the_gateway_refuses_over_quota_with_retry_info_and_records_it(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials.json"
    caller = create_token(credentials, "comparer", [SCOPE_COMPARE, SCOPE_AUDIT])
    gateway = start_service(
        "gateway",
        [
            f"gateway.credentials_file={credentials}",
            f"gateway.audit_path={tmp_path / 'audit.db'}",
            f"gateway.quota_path={tmp_path / 'quotas.db'}",
            'gateway.quotas={"default": {"identifications_per_minute": 2}}',
            # No detection service runs: the first calls fail after being counted.
            "gateway.detection_address=127.0.0.1:9",
        ],
        tmp_path,
    )
    try:
        with grpc.insecure_channel(gateway.address) as channel:
            api = face_service_pb2_grpc.FaceServiceStub(channel)
            md = bearer_metadata(caller)
            context = common_pb2.IdentificationContext(
                purpose=common_pb2.IdentificationContext.PURPOSE_TESTING, case_id="Q-1"
            )
            request = F.CompareFacesRequest(source_image=b"x", target_image=b"y", context=context)
            codes = []
            for _ in range(3):
                try:
                    api.CompareFaces(request, metadata=md, timeout=10)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as error:
                    codes.append(error.code())
                    last = error
            assert codes[2] == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert grpc.StatusCode.RESOURCE_EXHAUSTED not in codes[:2]
            status = rpc_status.from_call(last)  # type: ignore[arg-type]
            assert status is not None
            assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)
            records = api.ListAuditRecords(
                F.ListAuditRecordsRequest(filter=F.AuditRecordFilter(case_id="Q-1")),
                metadata=md,
                timeout=10,
            ).audit_records
            assert records[-1].status_code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            assert records[-1].principal == "comparer"
    finally:
        assert gateway.stop() == 0
