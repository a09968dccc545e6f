"""Retention sweeps (facegrid.retention): one process at a time among those sharing an
audit log, every removal audited with its count; match events erased from a real
nats-server by age, their bytes gone from its files. (Faces: tests/e2e/test_gateway.py,
and across search replicas: tests/e2e/test_search_replicas.py.)"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest
from facegrid.audit_chain import verify_chain
from facegrid.audit_log import AuditRecord, SqliteAuditLog
from facegrid.errors import unavailable
from facegrid.retention import EXPIRE_FACES, EXPIRE_MATCH_EVENTS, Removal, RetentionSchedule
from facegrid_harness.nats_server import NatsServer
from facegrid_ingest.app import EventExpiry
from test_nats_events import SOURCES, _store_contains, connect, open_log, run, server

__all__ = ["server"]  # the module's nats-server fixture


def test_one_writer_of_a_log_sweeps_at_a_time_and_each_removal_is_audited(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.db"
    first, second = SqliteAuditLog(path), SqliteAuditLog(path)  # two replicas' views
    sweeps: list[float] = []

    async def sweep(now: float) -> Sequence[Removal]:
        sweeps.append(now)
        return [
            Removal(EXPIRE_FACES, "collections/a", "", 4, now - 3600),
            Removal(EXPIRE_FACES, "collections/b", "", 0, now - 7200),  # nothing: no record
        ]

    async def body() -> None:
        one = RetentionSchedule("faces", first, sweep, 60, clock=lambda: 1_700_000_000.0)
        other = RetentionSchedule("faces", second, sweep, 60)
        async with first.exclusive("faces") as leading:
            assert leading
            assert await other.run_once() is None  # the first one holds the task
            async with second.exclusive("other-task") as also:
                assert also  # another task is not held
        records = await one.run_once()
        assert records is not None
        assert [(r.method, r.collection, r.result_count) for r in records] == [
            (EXPIRE_FACES, "collections/a", 4)
        ]
        assert records[0].principal == "facegrid:retention"
        assert records[0].create_time.seconds == 1_700_000_000
        again = await other.run_once()  # released: the other replica may sweep now
        assert again is not None
        assert len(again) == 1

    asyncio.run(body())
    assert len(sweeps) == 2
    assert verify_chain(_all(first)).intact
    first.close()
    second.close()


def _all(log: SqliteAuditLog) -> list[AuditRecord]:
    return [AuditRecord.FromString(bytes(row[8])) for row in log.rows()]  # type: ignore[call-overload]


def _sweep_until(schedule: RetentionSchedule, calls: list[float], count: int) -> None:
    """Run ``schedule`` until its sweep has been called ``count`` times (20 s at most)."""

    async def body() -> None:
        schedule.start()
        deadline = time.monotonic() + 20
        while len(calls) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await schedule.stop()

    asyncio.run(body())


def test_a_failing_sweep_is_tried_again(tmp_path: Path) -> None:
    audit = SqliteAuditLog(tmp_path / "audit.db")
    calls: list[float] = []

    async def sweep(now: float) -> Sequence[Removal]:
        calls.append(now)
        if len(calls) == 1:
            raise RuntimeError("search is unreachable")
        return [Removal(EXPIRE_FACES, "collections/a", "", 1, now)]

    _sweep_until(RetentionSchedule("faces", audit, sweep, 0.05), calls, 2)
    assert len(calls) >= 2
    assert len(audit.rows()) >= 1
    audit.close()


def test_a_sweep_that_finds_a_service_down_says_so_without_a_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    audit = SqliteAuditLog(tmp_path / "audit.db")
    calls: list[float] = []

    async def sweep(now: float) -> Sequence[Removal]:
        calls.append(now)
        if len(calls) == 1:
            raise unavailable("the search service is unavailable: backend unhealthy", "DOWN")
        if len(calls) == 2:
            raise RuntimeError("a bug")
        return []

    with caplog.at_level(logging.WARNING, logger="facegrid.retention"):
        _sweep_until(RetentionSchedule("faces", audit, sweep, 0.05), calls, 3)
    assert len(calls) >= 3  # tried again after each
    down, bug = caplog.records[0], caplog.records[1]
    assert down.levelno == logging.WARNING
    assert down.exc_info is None
    assert "could not run: the search service is unavailable" in down.getMessage()
    assert bug.levelno == logging.ERROR
    assert bug.exc_info is not None  # a bug keeps its traceback
    audit.close()


def test_expired_match_events_are_erased_per_processor_and_audited(
    server: NatsServer, tmp_path: Path
) -> None:
    audit = SqliteAuditLog(tmp_path / "audit.db")

    async def body() -> None:
        async with connect(server) as nc:
            events = await open_log(nc)
            marker = uuid.uuid4().hex.encode()
            for i in range(5):
                await events.publish(
                    "proc-a", SOURCES[i % 3], str(uuid.uuid4()), marker + b"a%d" % i
                )
            for i in range(2):
                await events.publish("proc-b", SOURCES[0], str(uuid.uuid4()), marker + b"b%d" % i)
            await asyncio.sleep(0.05)
            cutoff = time.time()
            await asyncio.sleep(0.05)
            young = []
            for i in range(3):
                event_id = str(uuid.uuid4())
                await events.publish("proc-a", SOURCES[0], event_id, b"young %d" % i)
                young.append(event_id)
            assert _store_contains(server, marker)
            # A retention that puts the cutoff between the old and the young events.
            expiry = EventExpiry(events, max_age_s=time.time() - cutoff)
            schedule = RetentionSchedule("events", audit, expiry.sweep, 60)
            records = await schedule.run_once()
            assert records is not None
            assert sorted((r.method, r.target, r.result_count) for r in records) == [
                (EXPIRE_MATCH_EVENTS, "streamProcessors/proc-a", 5),
                (EXPIRE_MATCH_EVENTS, "streamProcessors/proc-b", 2),
            ]
            assert all(marker not in r.SerializeToString() for r in records)
            left, _ = await events.page(processor_id=None, limit=100)
            assert [e.event_id for e in left] == young
            assert not _store_contains(server, marker)  # overwritten on disk
            assert await events.expire(cutoff) == {}  # nothing more to do

    run(body)
    audit.close()
