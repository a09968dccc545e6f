"""Source leases through NATS KV against a real nats-server, started per module."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence

import nats
import pytest
from facegrid_harness.nats_server import NatsServer
from facegrid_ingest.event_log import source_token
from facegrid_ingest.leases import LeaseManager, assign, lease_key, preferred_owner
from nats.aio.client import Client

pytestmark = pytest.mark.timeout(60)
log = logging.getLogger(__name__)

LEASE_S = 1.0
KEYS = [lease_key("proc-a", source_token(f"cam.{i}:554")) for i in range(12)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    with NatsServer(tmp_path_factory.mktemp("nats")) as server:
        pid = server.pid
        yield server
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # stopped and reaped: nothing left behind


async def _log_error(err: Exception) -> None:
    log.info("nats client: %r", err)


def run(body: Callable[[], Awaitable[None]], timeout: float = 45.0) -> None:
    async def main() -> None:
        await asyncio.wait_for(body(), timeout)

    asyncio.run(main())


@contextlib.asynccontextmanager
async def replicas(
    server: NatsServer, count: int, *, lease_s: float = LEASE_S
) -> AsyncIterator[list[LeaseManager]]:
    """``count`` started managers, each on its own connection, sharing fresh buckets."""
    tag = uuid.uuid4().hex[:8]
    connections: list[Client] = []
    managers = []
    try:
        for i in range(count):
            nc = await nats.connect(server.url, error_cb=_log_error)
            connections.append(nc)
            manager = LeaseManager(
                nc.jetstream(),
                f"replica-{i}",
                lease_s=lease_s,
                replicas_bucket=f"replicas_{tag}",
                leases_bucket=f"leases_{tag}",
            )
            await manager.start()
            managers.append(manager)
        yield managers
    finally:
        for nc in connections:
            await nc.close()


async def settle(managers: Sequence[LeaseManager], keys: Sequence[str] = KEYS) -> int:
    """Reconcile rounds until two in a row change nothing; how many rounds that took.

    (One quiet round is not enough: a replica that joins is seen by the others only in the
    round after its first heartbeat.)"""
    quiet = 0
    for round_ in range(1, 10):
        results = [await manager.reconcile(keys) for manager in managers]
        quiet = 0 if any(r.acquired or r.released or r.lost for r in results) else quiet + 1
        if quiet == 2:
            return round_
    raise AssertionError("leases did not settle in 9 rounds")


async def owners(managers: Sequence[LeaseManager], keys: Sequence[str] = KEYS) -> dict[str, str]:
    """Who holds each key; checks that exactly one replica does, and the bucket agrees."""
    holders: dict[str, str] = {}
    for manager in managers:
        for key in manager.held:
            assert key not in holders, f"{key} held by {holders[key]} and {manager.replica_id}"
            holders[key] = manager.replica_id
    assert sorted(holders) == sorted(keys)
    by_id = {m.replica_id: m for m in managers}
    for key, holder in holders.items():
        assert await managers[0].owner(key) == (holder, by_id[holder].held[key])
    return holders


def loads(holders: dict[str, str]) -> list[int]:
    return sorted(Counter(holders.values()).values())


# ---------------------------------------------------------------------------------------


def test_rendezvous_is_stable_and_moves_little() -> None:
    names = [f"replica-{i}" for i in range(3)]
    for key in KEYS:
        assert preferred_owner(key, names) == preferred_owner(key, list(reversed(names)))
        weights = {
            r: hashlib.sha256(f"{r}\0{key}".encode()).digest() for r in names
        }  # the documented weight
        assert preferred_owner(key, names) == max(names, key=lambda r: weights[r])
    three = assign(KEYS, names)
    assert loads(three) == [4, 4, 4]
    two = assign(KEYS, names[:2])
    assert loads(two) == [6, 6]
    # Losing replica-2 moves its keys, and at most a few that had spilled over.
    moved = [k for k in KEYS if three[k] != "replica-2" and two[k] != three[k]]
    assert len(moved) <= 3
    # 200 random key sets: always balanced within one.
    for trial in range(200):
        keys = [f"p{trial}.k{i}" for i in range(12)]
        spread = loads(assign(keys, names))
        assert max(spread) - min(spread) <= 1
        assert sum(spread) == 12


def test_kv_ttl_ends_a_lease_and_each_renewal_restarts_it(server: NatsServer) -> None:
    async def body() -> None:
        async with replicas(server, 2) as (a, b):
            status = await a.leases_kv.status()
            assert status.ttl == LEASE_S  # KeyValueConfig(ttl=...) is the stream's max_age
            key = KEYS[0]
            first = await a.acquire(key)
            assert first is not None
            assert await b.acquire(key) is None  # held
            revision = first
            start = time.monotonic()
            while time.monotonic() - start < 2.5 * LEASE_S:  # well past one TTL
                await asyncio.sleep(LEASE_S / 3)
                renewed = await a.renew(key, revision)
                assert renewed is not None
                assert renewed > revision
                revision = renewed
            assert await a.owner(key) == ("replica-0", revision)
            # Stop renewing: the entry ages out about one TTL after the last update.
            last_renewal = time.monotonic()
            while await a.owner(key) is not None:
                assert time.monotonic() - last_renewal < 3 * LEASE_S
                await asyncio.sleep(0.05)
            gone_after = time.monotonic() - last_renewal
            assert gone_after >= 0.9 * LEASE_S
            assert await a.renew(key, revision) is None  # expired: lost
            taken = await b.acquire(key)
            assert taken is not None
            assert taken > revision  # fencing tokens only grow
            log.info("lease gone %.2fs after the last renewal (TTL %ss)", gone_after, LEASE_S)

    run(body)


def test_two_then_three_replicas_share_twelve_keys(server: NatsServer) -> None:
    async def body() -> None:
        async with replicas(server, 3) as managers:
            a, b, c = managers
            await c.release_all()  # c joins later: not live yet
            await settle([a, b])
            two = await owners([a, b])
            assert all(5 <= n <= 7 for n in loads(two))
            assert set(two.values()) == {"replica-0", "replica-1"}

            await settle([a, b, c])
            three = await owners([a, b, c])
            assert len(loads(three)) == 3
            assert all(3 <= n <= 5 for n in loads(three))
            # Only keys that went to the newcomer moved (and at most a few spilled ones).
            moved_elsewhere = [k for k in KEYS if three[k] != "replica-2" and three[k] != two[k]]
            assert len(moved_elsewhere) <= 3
            # The live set is read without leaving watchers behind on the server.
            info = await a.js.stream_info(f"KV_{a.replicas_bucket}")
            assert info.state.consumer_count == 0
            assert await a.live_replicas() == ["replica-0", "replica-1", "replica-2"]

    run(body)


def test_a_killed_replica_loses_its_keys_to_the_others(server: NatsServer) -> None:
    async def body() -> None:
        async with replicas(server, 3) as managers:
            a, b, c = managers
            await settle(managers)
            before = await owners(managers)
            orphaned = {k: c.held[k] for k in KEYS if before[k] == "replica-2"}
            assert orphaned
            # c stops: no more heartbeats or renewals (as if killed); a and b go on.
            killed_at = time.monotonic()
            while True:
                for manager in (a, b):
                    await manager.reconcile(KEYS)
                if set(a.held) | set(b.held) == set(KEYS):
                    break
                assert time.monotonic() - killed_at < 4 * LEASE_S, "keys not taken over"
                await asyncio.sleep(a.interval_s)
            taken_after = time.monotonic() - killed_at
            assert taken_after >= 0.9 * LEASE_S  # not before the lease ran out
            after = await owners([a, b])
            assert all(5 <= n <= 7 for n in loads(after))
            # Keys that a and b held before stay where they were (at most a few spill).
            stayed = [k for k in KEYS if before[k] != "replica-2" and after[k] == before[k]]
            assert len(stayed) >= 8 - 3
            # The old holder's revisions no longer renew: it must stop publishing.
            for key, revision in orphaned.items():
                assert await c.renew(key, revision) is None
                assert not await c.release(key, revision)
                new_owner = await a.owner(key)
                assert new_owner is not None
                assert new_owner[1] > revision  # the fencing token grew
            assert not c.held
            log.info("keys of a killed replica taken over after %.2fs", taken_after)

    run(body)


def test_release_all_hands_over_at_once(server: NatsServer) -> None:
    async def body() -> None:
        async with replicas(server, 3, lease_s=10.0) as managers:  # TTL far beyond the test
            a, b, c = managers
            await settle(managers)
            held_by_c = set(c.held)
            assert held_by_c
            started = time.monotonic()
            released = await c.release_all()
            assert set(released) == held_by_c
            assert not c.held
            assert "replica-2" not in await a.live_replicas()
            for manager in (a, b):
                await manager.reconcile(KEYS)
            after = await owners([a, b])
            assert time.monotonic() - started < 2.0  # one round, not a 10 s TTL
            assert all(5 <= n <= 7 for n in loads(after))
            await a.stop()  # stop() is release_all()
            assert not a.held
            await b.reconcile(KEYS)
            assert sorted(b.held) == sorted(KEYS)

    run(body)


def test_renew_after_losing_returns_none(server: NatsServer) -> None:
    async def body() -> None:
        async with replicas(server, 2) as (a, b):
            key = KEYS[3]
            old = await a.acquire(key)
            assert old is not None
            assert a.holds(key)
            await asyncio.sleep(LEASE_S + 0.6)  # a pauses past its lease
            assert not a.holds(key)  # it knows to stop publishing without asking
            new = await b.acquire(key)
            assert new is not None
            assert new > old
            assert await a.renew(key, old) is None
            assert key not in a.held
            assert not await a.release(key, old)  # cannot free b's lease
            assert await b.owner(key) == ("replica-1", new)
            renewed = await b.renew(key, new)
            assert renewed is not None
            assert await a.renew(key, renewed - 1) is None  # any stale revision fails
            assert await b.release(key, renewed)
            assert await a.owner(key) is None  # free at once

    run(body)
