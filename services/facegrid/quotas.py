"""Quotas per caller: identification calls and enrolments per minute, for all replicas.

An administrator sets limits in ``gateway.quotas``, keyed by ``principal:NAME``,
``scope:SCOPE`` or ``default``; a caller's limit of a kind is its principal's if set,
else the largest of its scopes' if any is set, else the default; no limit anywhere: no
quota. Calls are counted in fixed one-minute windows in one table that every gateway
replica shares: the PostgreSQL database of the audit log when
``gateway.audit_database_url`` is set, else an SQLite file (``gateway.quota_path``) for
the replicas of one machine. A call is counted only if the window has room, atomically
(one upsert), so replicas together never let more through than the limit. Over it, the
call is RESOURCE_EXHAUSTED with a RetryInfo until the next window, and the refusal is
on the audit record like any other.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import grpc
from google.rpc import error_details_pb2

from facegrid.auth import Principal
from facegrid.config import GatewaySettings
from facegrid.errors import ERROR_DOMAIN, ServiceError

WINDOW_S = 60
QUOTA_TABLE = "facegrid_quota_usage"
_TABLE = QUOTA_TABLE
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {_TABLE} (
    principal TEXT NOT NULL,
    kind TEXT NOT NULL,
    window_start BIGINT NOT NULL,
    calls BIGINT NOT NULL,
    PRIMARY KEY (principal, kind, window_start)
)
"""
_TAKE = (
    f"INSERT INTO {_TABLE} (principal, kind, window_start, calls) VALUES ({{p}}, {{p}}, {{p}}, 1) "
    f"ON CONFLICT (principal, kind, window_start) DO UPDATE SET calls = {_TABLE}.calls + 1 "
    f"WHERE {_TABLE}.calls < {{p}} RETURNING calls"
)
_PRUNE = f"DELETE FROM {_TABLE} WHERE window_start < {{p}}"
_EXISTS_SQLITE = "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = {p}"
_EXISTS_POSTGRES = "SELECT to_regclass({p}) IS NOT NULL"


class QuotaKind(StrEnum):
    IDENTIFICATIONS = "identifications_per_minute"
    ENROLMENTS = "enrolments_per_minute"


# Which calls count against which quota (method names of FaceService).
METHOD_KINDS = {
    "CompareFaces": QuotaKind.IDENTIFICATIONS,
    "SearchFaces": QuotaKind.IDENTIFICATIONS,
    "SearchFacesByImage": QuotaKind.IDENTIFICATIONS,
    "SearchSubjectsByImage": QuotaKind.IDENTIFICATIONS,
    "IndexFaces": QuotaKind.ENROLMENTS,
}


class QuotaStore(Protocol):
    def take(self, principal: str, kind: str, window_start: int, limit: int) -> bool:
        """Count one call if the window holds fewer than ``limit``; whether it did."""
        ...


class _SqlQuotaStore:
    """The upsert on any DB-API connection (SQLite's or psycopg's)."""

    def __init__(self, connect: Callable[[], Any], placeholder: str, exists: str) -> None:
        self._take = _TAKE.format(p=placeholder)
        self._prune = _PRUNE.format(p=placeholder)
        self._lock = threading.Lock()
        self._connection = connect()
        if not self._exists(exists.format(p=placeholder)):
            # A writer role finds it made by setup-database. Replicas starting together
            # race here: PostgreSQL may refuse all but one CREATE TABLE IF NOT EXISTS
            # (a unique violation in its catalog), which is fine once the table is there.
            try:
                self._connection.execute(SCHEMA)
            except Exception:
                if not self._exists(exists.format(p=placeholder)):
                    raise
        self._pruned = 0

    def _exists(self, query: str) -> bool:
        row = self._connection.execute(query, (_TABLE,)).fetchone()
        return bool(row and row[0])

    def take(self, principal: str, kind: str, window_start: int, limit: int) -> bool:
        with self._lock:
            row = self._connection.execute(
                self._take, (principal, kind, window_start, limit)
            ).fetchone()
            if window_start != self._pruned:  # once a window: old counts are dropped
                self._connection.execute(self._prune, (window_start - WINDOW_S,))
                self._pruned = window_start
            return row is not None


def open_quota_store(gateway: GatewaySettings) -> QuotaStore:
    if gateway.audit_database_url:
        from facegrid.audit_postgres import connect  # psycopg only when used

        return _SqlQuotaStore(lambda: connect(gateway.audit_database_url), "%s", _EXISTS_POSTGRES)
    path = Path(gateway.quota_path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def sqlite() -> sqlite3.Connection:
        connection = sqlite3.connect(
            path, check_same_thread=False, isolation_level=None, timeout=10
        )
        connection.execute("PRAGMA journal_mode=WAL")
        return connection

    return _SqlQuotaStore(sqlite, "?", _EXISTS_SQLITE)


class Quotas:
    def __init__(
        self, limits: dict[str, dict[str, int]], store: QuotaStore | None,
        clock: Callable[[], float] = time.time,
    ) -> None:  # fmt: skip
        for key, values in limits.items():
            if key != "default" and not key.startswith(("principal:", "scope:")):
                raise ValueError(f"gateway.quotas: {key!r} is not default, principal:X or scope:X")
            unknown = set(values) - {k.value for k in QuotaKind}
            if unknown:
                raise ValueError(f"gateway.quotas[{key}]: unknown limits {sorted(unknown)}")
        self._limits = limits
        self._store = store
        self._clock = clock

    def limit(self, principal: Principal, kind: QuotaKind) -> int | None:
        own = self._limits.get(f"principal:{principal.name}", {}).get(kind.value)
        if own is not None:
            return own
        by_scope = [
            self._limits[f"scope:{s}"][kind.value]
            for s in principal.scopes
            if kind.value in self._limits.get(f"scope:{s}", {})
        ]
        if by_scope:
            return max(by_scope)
        return self._limits.get("default", {}).get(kind.value)

    async def take(self, principal: Principal, method_name: str) -> None:
        """Count the call against the caller's quota; RESOURCE_EXHAUSTED if it is spent."""
        kind = METHOD_KINDS.get(method_name)
        limit = None if kind is None else self.limit(principal, kind)
        if kind is None or limit is None or self._store is None:
            return
        now = self._clock()
        window = int(now // WINDOW_S) * WINDOW_S
        taken = limit > 0 and await asyncio.to_thread(
            self._store.take, principal.name, kind.value, window, limit
        )
        if not taken:
            raise quota_exceeded(principal.name, kind, limit, window + WINDOW_S - now)


def quota_exceeded(principal: str, kind: QuotaKind, limit: int, retry_s: float) -> ServiceError:
    description = f"{principal} has used its {limit} {kind.value.replace('_', ' ')}"
    retry = error_details_pb2.RetryInfo()
    retry.retry_delay.FromMilliseconds(max(1, int(retry_s * 1000)))
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        description,
        [
            error_details_pb2.QuotaFailure(
                violations=[
                    error_details_pb2.QuotaFailure.Violation(
                        subject=f"principal:{principal}", description=description
                    )
                ]
            ),
            error_details_pb2.ErrorInfo(
                reason="QUOTA_EXCEEDED",
                domain=ERROR_DOMAIN,
                metadata={"quota": kind.value, "limit": str(limit)},
            ),
            retry,
        ],
    )
