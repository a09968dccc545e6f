"""The event log against a real nats-server (JetStream on disk), started per module."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import nats
import nats.js.errors
import pytest
from facegrid_harness.nats_server import NatsServer, NatsStartError
from facegrid_ingest.event_log import (
    EventIdConflictError,
    EventLog,
    EventSubscription,
    Start,
    StoredEvent,
    decode_cursor,
    encode_cursor,
    source_id_from_token,
    source_token,
)
from nats.aio.client import Client

pytestmark = pytest.mark.timeout(60)
log = logging.getLogger(__name__)

SOURCES = ("cam.front-door:1", "rtsp_cam.2", "garage")


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


@contextlib.asynccontextmanager
async def connect(server: NatsServer) -> AsyncIterator[Client]:
    nc = await nats.connect(
        server.url,
        reconnect_time_wait=0.1,
        max_reconnect_attempts=-1,
        error_cb=_log_error,
    )
    try:
        yield nc
    finally:
        await nc.close()


def run(body: Callable[[], Awaitable[None]], timeout: float = 45.0) -> None:
    async def main() -> None:
        await asyncio.wait_for(body(), timeout)

    asyncio.run(main())


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


async def open_log(nc: Client, *, max_age_s: float = 3600.0) -> EventLog:
    name = unique("T")
    log_ = await EventLog.open(
        nc,
        stream=f"EV_{name}",
        subject_prefix=f"ev.{name}",
        max_age_s=max_age_s,
        max_bytes=64 << 20,
    )
    log_.pull_expires_s = 1.0  # heartbeats every 0.2 s: quick recovery in tests
    return log_


def new_id() -> str:
    return str(uuid.uuid4())


async def publish_many(
    events: EventLog, processor_id: str, count: int, *, source_ids: tuple[str, ...] = SOURCES
) -> list[StoredEvent]:
    stored = []
    for i in range(count):
        event_id = new_id()
        source = source_ids[i % len(source_ids)]
        headers = {"subject-id": f"s{i % 2}", "n": str(i)}
        await events.publish(processor_id, source, event_id, f"payload {i}".encode(), headers)
        got = await events.get(processor_id, event_id)
        assert got is not None
        stored.append(got)
    return stored


def sequences(events: list[StoredEvent]) -> list[int]:
    return [e.sequence for e in events]


# ---------------------------------------------------------------------------------------


def test_source_tokens_are_reversible_nats_tokens() -> None:
    for source in (*SOURCES, "a", "Ünïcode/ßource", "x" * 200, "..::--__"):
        token = source_token(source)
        assert token
        assert all(c.isdigit() or c.islower() for c in token)
        assert "." not in token
        assert "*" not in token
        assert ">" not in token
        assert source_id_from_token(token) == source
    for bad in ("", "ABC", "a.b", "1", "a*"):
        with pytest.raises(ValueError, match="source token"):
            source_id_from_token(bad)
    with pytest.raises(ValueError, match="empty"):
        source_token("")


def test_cursors_round_trip_and_garbage_raises() -> None:
    for sequence in (0, 1, 2, 12345, 2**63, 2**64 - 1):
        cursor = encode_cursor(sequence)
        assert cursor.startswith("c1.")
        assert decode_cursor(cursor) == sequence
    good = encode_cursor(42)
    garbage = [
        "",
        "c1.",
        "c2." + good[3:],
        good.upper(),
        good[:-1],
        good + "a",
        good[:-1] + "b",  # non-canonical: padding bits set
        "c1.!!!!!!!!!!!!!",
        "42",
        None,
    ]
    for text in garbage:
        with pytest.raises(ValueError, match="cursor"):
            decode_cursor(text)  # type: ignore[arg-type]


def test_publish_once_duplicate_returns_original(server: NatsServer) -> None:
    async def body() -> None:
        async with connect(server) as nc:
            events = await open_log(nc)
            event_id = new_id()
            first = await events.publish("proc-a", SOURCES[0], event_id, b"one", {"k": "v"})
            again = await events.publish("proc-a", SOURCES[0], event_id, b"one", {"k": "v"})
            assert not first.duplicate
            assert again.duplicate
            assert again.sequence == first.sequence
            # The same id from another source of the processor is still the same event.
            other = await events.publish("proc-a", SOURCES[1], event_id, b"changed")
            assert other.duplicate
            assert other.sequence == first.sequence
            # Event ids are unique in the log: another processor cannot reuse one.
            with pytest.raises(EventIdConflictError):
                await events.publish("proc-b", SOURCES[0], event_id, b"one")
            assert await events.get("proc-b", event_id) is None
            info = await nc.jetstream().stream_info(events.stream)
            assert info.state.messages == 1
            with pytest.raises(ValueError, match="processor id"):
                await events.publish("Proc", SOURCES[0], new_id(), b"")
            with pytest.raises(ValueError, match="UUID"):
                await events.publish("proc-a", SOURCES[0], "not-a-uuid", b"")
            with pytest.raises(ValueError, match="header name"):
                await events.publish("proc-a", SOURCES[0], new_id(), b"", {"Nats-Msg-Id": "x"})

    run(body)


def test_get_by_event_id(server: NatsServer) -> None:
    async def body() -> None:
        async with connect(server) as nc:
            events = await open_log(nc)
            event_id = new_id()
            before = time.time()
            headers = {"subject-id": "s7", "Facegrid-Lease": "12", "Facegrid-Empty": ""}
            published = await events.publish(
                "proc-a", SOURCES[0], event_id, b"\x00\x01payload", headers
            )
            got = await events.get("proc-a", event_id.upper())  # any spelling of the UUID
            assert got is not None
            assert got.sequence == published.sequence
            assert (got.processor_id, got.source_id, got.event_id) == (
                "proc-a",
                SOURCES[0],
                event_id,
            )
            assert dict(got.headers) == headers
            paged, _ = await events.page(processor_id="proc-a", limit=10)
            assert paged == [got]  # the same through a consumer as through a direct get
            assert got.payload == b"\x00\x01payload"
            assert before - 1 <= got.time <= time.time() + 1
            assert await events.get("proc-a", new_id()) is None
            assert await events.get("proc-b", event_id) is None
            assert await events.get("proc-a", "garbage") is None

    run(body)


def test_page_filters_limits_and_continues(server: NatsServer) -> None:
    async def body() -> None:
        async with connect(server) as nc:
            events = await open_log(nc)
            a = await publish_many(events, "proc-a", 12)
            b = await publish_many(events, "proc-b", 3)

            got, after = await events.page(processor_id="proc-a", limit=100)
            assert sequences(got) == sequences(a)
            assert after is None
            got, after = await events.page(processor_id=None, limit=100)
            assert sequences(got) == sorted(sequences(a + b))
            assert after is None

            # By source (several), for one processor or all.
            wanted = {SOURCES[0], SOURCES[2]}
            got, _ = await events.page(processor_id="proc-a", source_ids=sorted(wanted), limit=100)
            assert sequences(got) == [e.sequence for e in a if e.source_id in wanted]
            got, _ = await events.page(processor_id=None, source_ids=[SOURCES[1]], limit=100)
            assert sequences(got) == sorted(e.sequence for e in a + b if e.source_id == SOURCES[1])

            # Limit and continuation: every event once, in order.
            seen: list[StoredEvent] = []
            after_sequence = 0
            pages = 0
            while True:
                got, more = await events.page(
                    processor_id="proc-a", after_sequence=after_sequence, limit=5
                )
                pages += 1
                assert len(got) <= 5
                seen.extend(got)
                if more is None:
                    break
                after_sequence = more
            assert sequences(seen) == sequences(a)
            assert pages == 3

            # After a cursor.
            cursor = encode_cursor(a[6].sequence)
            got, _ = await events.page(
                processor_id="proc-a", after_sequence=decode_cursor(cursor), limit=100
            )
            assert sequences(got) == sequences(a[7:])

            # By time: [start, end) of the stored timestamps.
            got, _ = await events.page(processor_id="proc-a", start_time=a[4].time, limit=100)
            assert sequences(got) == sequences(a[4:])
            got, after = await events.page(
                processor_id="proc-a", start_time=a[2].time, end_time=a[8].time, limit=100
            )
            assert sequences(got) == sequences(a[2:8])
            assert after is None
            got, after = await events.page(
                processor_id="proc-a", start_time=a[2].time, end_time=a[8].time, limit=3
            )
            assert sequences(got) == sequences(a[2:5])
            assert after == a[4].sequence

            # Header filter (client side), with paging.
            got, _ = await events.page(
                processor_id="proc-a", header_equals={"subject-id": "s1"}, limit=100
            )
            assert sequences(got) == sequences(a[1::2])
            got, after = await events.page(
                processor_id="proc-a", header_equals={"subject-id": "s1"}, limit=2
            )
            assert sequences(got) == sequences(a[1:4:2])
            assert after == a[3].sequence

            # Nothing there.
            assert await events.page(processor_id="proc-c", limit=10) == ([], None)
            assert await events.page(
                processor_id="proc-a", after_sequence=a[-1].sequence, limit=10
            ) == ([], None)
            # Paging leaves no consumers behind.
            assert (await nc.jetstream().stream_info(events.stream)).state.consumer_count == 0

    run(body)


async def take(
    subscription: EventSubscription, count: int, timeout: float = 10.0
) -> list[StoredEvent]:
    got: list[StoredEvent] = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        event = await subscription.next(timeout=max(0.01, deadline - time.monotonic()))
        assert event is not None, f"only {len(got)} of {count} events arrived"
        got.append(event)
    return got


def test_subscribe_from_each_start(server: NatsServer) -> None:
    async def body() -> None:
        async with connect(server) as nc:
            events = await open_log(nc)
            old = await publish_many(events, "proc-a", 4)
            await publish_many(events, "proc-b", 2)
            earliest = await events.subscribe(processor_id="proc-a", start=Start.EARLIEST)
            after = await events.subscribe(
                processor_id="proc-a", start=Start.after(old[1].sequence)
            )
            since = await events.subscribe(processor_id="proc-a", start=Start.since(old[2].time))
            latest = await events.subscribe(processor_id="proc-a", start=Start.LATEST)
            by_source = await events.subscribe(
                processor_id=None, source_ids=[SOURCES[1]], start=Start.EARLIEST
            )
            async with earliest, after, since, latest, by_source:
                assert await latest.next(timeout=0.3) is None
                new = await publish_many(events, "proc-a", 3)
                assert sequences(await take(earliest, 7)) == sequences(old + new)
                assert sequences(await take(after, 5)) == sequences(old[2:] + new)
                assert sequences(await take(since, 5)) == sequences(old[2:] + new)
                assert sequences(await take(latest, 3)) == sequences(new)
                everything, _ = await events.page(processor_id=None, limit=100)
                from_source = [e for e in everything if e.source_id == SOURCES[1]]
                assert sequences(await take(by_source, len(from_source))) == sequences(from_source)
                for subscription in (earliest, after, since, latest, by_source):
                    assert await subscription.next(timeout=0.2) is None  # nothing twice
                assert latest.cursor == encode_cursor(new[-1].sequence)
            info = await nc.jetstream().stream_info(events.stream)
            assert info.state.consumer_count == 0

    run(body)


def test_cancelled_subscriber_resumes_after_its_cursor(server: NatsServer) -> None:
    async def body() -> None:
        async with connect(server) as nc:
            js = nc.jetstream()
            events = await open_log(nc)
            subscription = await events.subscribe(processor_id="proc-a", start=Start.LATEST)
            consumer = subscription.consumer_name
            received: list[StoredEvent] = []

            async def reader() -> None:
                async for event in subscription:
                    received.append(event)

            task = asyncio.create_task(reader())
            first = await publish_many(events, "proc-a", 3)
            while len(received) < 3:
                await asyncio.sleep(0.02)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert subscription.closed
            with pytest.raises(nats.js.errors.NotFoundError):
                await js.consumer_info(events.stream, consumer)  # deleted on cancel
            assert sequences(received) == sequences(first)
            cursor = encode_cursor(received[-1].sequence)

            missed = await publish_many(events, "proc-a", 4)
            async with await events.subscribe(
                processor_id="proc-a", start=Start.after(decode_cursor(cursor))
            ) as resumed:
                assert sequences(await take(resumed, 4)) == sequences(missed)
                assert await resumed.next(timeout=0.5) is None
                later = await publish_many(events, "proc-a", 1)
                assert sequences(await take(resumed, 1)) == sequences(later)

    run(body)


def test_slow_reader_holds_the_server_back(server: NatsServer) -> None:
    async def body() -> None:
        async with connect(server) as nc:
            js = nc.jetstream()
            events = await open_log(nc)
            for _ in range(300):
                await events.publish("proc-a", "cam", new_id(), b"x" * 1000)
            async with await events.subscribe(
                processor_id="proc-a", start=Start.EARLIEST, batch=16
            ) as subscription:
                await take(subscription, 1)
                await asyncio.sleep(0.3)
                info = await js.consumer_info(events.stream, subscription.consumer_name)
                assert info.delivered.stream_seq <= 32  # one pull of 16 (maybe two), not 300
                assert info.num_pending >= 300 - 32
                got = await take(subscription, 299)
                assert len({e.sequence for e in got}) == 299

    run(body)


async def reconnected(nc: Client, reconnects: int) -> None:
    deadline = time.monotonic() + 10
    while nc.stats["reconnects"] <= reconnects or not nc.is_connected:
        assert time.monotonic() < deadline, "the client did not reconnect"
        await asyncio.sleep(0.02)


def test_events_survive_a_restart_and_a_subscriber_goes_on(tmp_path: Path) -> None:
    with NatsServer(tmp_path / "nats") as server:

        async def body() -> None:
            async with connect(server) as nc:
                events = await open_log(nc)
                before = await publish_many(events, "proc-a", 5)
                subscription = await events.subscribe(processor_id="proc-a", start=Start.LATEST)
                async with subscription:
                    reconnects = nc.stats["reconnects"]
                    await asyncio.to_thread(server.restart)
                    await reconnected(nc, reconnects)  # by itself; the stream is on disk
                    got, _ = await events.page(processor_id="proc-a", limit=100)
                    assert sequences(got) == sequences(before)
                    assert [e.payload for e in got] == [e.payload for e in before]
                    assert await events.get("proc-a", before[2].event_id) == before[2]
                    after = await publish_many(events, "proc-a", 3)
                    assert sequences(await take(subscription, 3)) == sequences(after)
                    assert await subscription.next(timeout=0.3) is None
                    assert subscription.recreated >= 1  # its consumer did not survive
                # The de-duplication holds across the restart too.
                again = await events.publish("proc-a", SOURCES[0], before[0].event_id, b"")
                assert again.duplicate
                assert again.sequence == before[0].sequence
                # A crash (SIGKILL) loses no acknowledged event either.
                pid = server.pid
                assert pid is not None
                reconnects = nc.stats["reconnects"]
                await asyncio.to_thread(server.kill)
                with pytest.raises(ProcessLookupError):
                    os.kill(pid, 0)
                await asyncio.to_thread(server.start)
                await reconnected(nc, reconnects)
                got, _ = await events.page(processor_id="proc-a", limit=100)
                assert sequences(got) == sequences(before + after)

        run(body)


def test_server_that_cannot_start_says_why(server: NatsServer, tmp_path: Path) -> None:
    clash = NatsServer(tmp_path / "clash", port=server.port, startup_timeout_s=10)
    with pytest.raises(NatsStartError, match="exited") as failure:
        clash.start()
    assert "address already in use" in str(failure.value)
    assert clash.process is None


def test_purge_erases_a_processor(server: NatsServer) -> None:
    async def body() -> None:
        async with connect(server) as nc:
            events = await open_log(nc)
            marker = uuid.uuid4().hex.encode()
            doomed = []
            for i in range(20):
                event_id = new_id()
                await events.publish("proc-a", SOURCES[i % 3], event_id, marker + b"%03d" % i)
                doomed.append(event_id)
            kept = await publish_many(events, "proc-b", 4)
            assert _store_contains(server, marker)

            assert await events.purge("proc-a") == 20
            for event_id in doomed:
                assert await events.get("proc-a", event_id) is None
            assert await events.page(processor_id="proc-a", limit=100) == ([], None)
            got, _ = await events.page(processor_id=None, limit=100)
            assert sequences(got) == sequences(kept)
            info = await nc.jetstream().stream_info(events.stream)
            assert info.state.messages == 4
            assert info.state.consumer_count == 0
            assert not _store_contains(server, marker)  # overwritten, not just unlisted
            assert await events.purge("proc-a") == 0

    run(body)


def _store_contains(server: NatsServer, needle: bytes) -> bool:
    for path in (server.store_dir / "jetstream").rglob("*"):
        if path.is_file() and needle in path.read_bytes():
            return True
    return False


def test_retention_by_max_age(server: NatsServer) -> None:
    async def body() -> None:
        async with connect(server) as nc:
            # A 1 s age limit also caps the duplicate window (JetStream requires it).
            events = await open_log(nc, max_age_s=1.0)
            assert events.info.config.max_age == 1.0
            assert events.info.config.duplicate_window == 1.0
            stored = await publish_many(events, "proc-a", 3)
            assert len((await events.page(processor_id="proc-a", limit=10))[0]) == 3
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if not (await events.page(processor_id="proc-a", limit=10))[0]:
                    break
                await asyncio.sleep(0.1)
            assert await events.page(processor_id="proc-a", limit=10) == ([], None)
            assert await events.get("proc-a", stored[0].event_id) is None
            info = await nc.jetstream().stream_info(events.stream)
            assert info.state.messages == 0

    run(body)


def test_open_updates_an_existing_stream(server: NatsServer) -> None:
    async def body() -> None:
        async with connect(server) as nc:
            events = await open_log(nc)
            await publish_many(events, "proc-a", 2)
            again = await EventLog.open(
                nc,
                stream=events.stream,
                subject_prefix=events.subject_prefix,
                max_age_s=7200,
                max_bytes=1 << 20,
            )
            assert again.info.config.max_age == 7200
            assert again.info.config.max_bytes == 1 << 20
            assert again.info.state.messages == 2

    run(body)
