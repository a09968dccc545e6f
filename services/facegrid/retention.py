"""Retention: data past its age is removed on a schedule, and every removal is audited.

The gateway removes faces older than their collection's ``face_retention``; the ingest
service erases match events (with their chips) older than ``ingest.event_max_age_s``.
Both run a :class:`RetentionSchedule`: every interval (with some jitter, so replicas
started together do not sweep together), one process among those writing the audit log
(:meth:`AuditLog.exclusive`) runs the sweep, and each removal becomes an audit record
naming what was removed and how many, never what it contained. A sweep that fails is
logged and tried again at the next interval; nothing is lost by waiting.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import timestamp_pb2

from facegrid.audit_log import AuditLog
from facegrid.errors import ServiceError
from facegrid.tasks import cancel_and_wait
from facegrid.v1 import face_service_pb2

log = logging.getLogger(__name__)

# The principal of the audit records written by retention sweeps.
PRINCIPAL = "facegrid:retention"
# Their `method`: not gRPC methods (no caller asked), named in the same shape.
EXPIRE_FACES = "/facegrid.retention/ExpireFaces"
EXPIRE_MATCH_EVENTS = "/facegrid.retention/ExpireMatchEvents"


@dataclass(frozen=True)
class Removal:
    """What one sweep removed from one place."""

    method: str  # EXPIRE_FACES or EXPIRE_MATCH_EVENTS
    collection: str  # `collections/{c}` for faces; empty for events
    target: str  # the processor (events), empty for faces
    count: int
    cutoff: float  # Unix time: what was created before it was removed (logged)
    resources: tuple[str, ...] = ()  # names of what was removed, if few enough to list


Sweep = Callable[[float], Awaitable[Sequence[Removal]]]


class RetentionSchedule:
    """Runs ``sweep(now)`` every ``interval_s``, in one process at a time, and audits."""

    def __init__(
        self,
        task: str,
        audit_log: AuditLog,
        sweep: Sweep,
        interval_s: float,
        *,
        principal: str = PRINCIPAL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._task = task
        self._principal = principal
        self._audit_log = audit_log
        self._sweep = sweep
        self._interval_s = interval_s
        self._clock = clock
        self._runner: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name=f"retention-{self._task}")

    async def stop(self) -> None:
        await cancel_and_wait([self._runner], what=f"retention-{self._task}")
        self._runner = None

    async def _run(self) -> None:
        # The first sweep soon after start-up (a deployment down for a while catches up),
        # then every interval, each wait jittered by up to a tenth.
        delay = min(self._interval_s, 5.0) * random.uniform(0.5, 1.0)
        while True:
            await asyncio.sleep(delay)
            try:
                await self.run_once()
            except Exception as error:
                if isinstance(error, ServiceError) and error.code == grpc.StatusCode.UNAVAILABLE:
                    # A service it needs is down or restarting (or this one is stopping):
                    # nothing to debug, so no traceback.
                    log.warning(
                        "retention sweep %s could not run: %s; trying again in %.0f s",
                        self._task,
                        error.message,
                        self._interval_s,
                    )
                else:
                    log.exception(
                        "retention sweep %s failed; trying again in %.0f s",
                        self._task,
                        self._interval_s,
                    )
            delay = self._interval_s * random.uniform(0.9, 1.0)

    async def run_once(self) -> list[face_service_pb2.AuditRecord] | None:
        """One sweep, if no other process is sweeping; the audit records it wrote, or
        None if another process held the task."""
        async with self._audit_log.exclusive(self._task) as leading:
            if not leading:
                return None
            now = self._clock()
            removals = await self._sweep(now)
            records = []
            for removal in removals:
                if removal.count:
                    record = audit_record(removal, now, self._principal)
                    records.append(await self._audit_log.append(record))
                    log.info(
                        "retention: %d removed (%s %s), created before %s",
                        removal.count,
                        removal.method,
                        removal.collection or removal.target,
                        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(removal.cutoff)),
                    )
            return records


def audit_record(
    removal: Removal, now: float, principal: str = PRINCIPAL
) -> face_service_pb2.AuditRecord:
    """The record of a removal: what, where, how many; no content."""
    record = face_service_pb2.AuditRecord(
        principal=principal,
        method=removal.method,
        collection=removal.collection,
        target=removal.target,
        result_count=removal.count,
        result_resources=removal.resources,
    )
    record.create_time.CopyFrom(timestamp(now))
    return record


def timestamp(unix_time: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(unix_time * 1e9))
    return stamp
