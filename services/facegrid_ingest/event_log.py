"""Durable match events in a NATS JetStream stream.

Users of face search over video ask for events that are neither repeated after a restart
nor missed, that can be read again from a checkpoint (as Rekognition's Kinesis output can),
and that more than one machine can write. A JetStream stream gives all of that: it stores
every event on disk with a sequence number and a timestamp, keeps them for a bounded age
and size, and lets a reader start at a sequence or a time. Payloads are opaque bytes here
(serialised protobuf messages); this module knows only the subject and the headers.

One subject per event, ``<prefix>.<processor_id>.<source_token>.<event_id>``, so the server
filters by processor and by source without reading payloads, and finds one event by its id
(a direct get of the last message on ``<prefix>.<processor>.*.<event_id>``). Source ids may
contain ``.``, NATS's token separator, so they travel as lowercase unpadded base32.

De-duplication: every publish carries ``Nats-Msg-Id = event_id`` (JetStream drops a repeat
within the stream's duplicate window) and also expects no earlier message on
``<prefix>.*.*.<event_id>`` (``Nats-Expected-Last-Subject-Sequence: 0`` with
``...-Subject``, nats-server 2.11+), which holds for as long as the event is stored, not
just within the window. nats-server 2.15 checks the expectation first, so a repeat comes
back as "wrong last sequence" and is answered with the stored event's sequence and
``duplicate=True``. Both make event ids unique in the whole stream, not per processor.

Reading uses ephemeral pull consumers without acknowledgements, driven by explicit pull
requests on an inbox of their own (not nats-py's ``fetch``, whose batch requests can wait
for more messages after the first has arrived, and not its push ordered consumer, which
buffers without bound). The server sends at most one batch before the reader asks for the
next, so a slow reader holds the server back. A subscription checks that consumer
sequences are contiguous; on a gap, a lost consumer (server restart, inactivity) or a
silent pull, it recreates the consumer after the last delivered stream sequence, so it
delivers exactly the events after its cursor, once each, in stream order.

``purge`` erases the events of a processor message by message: a filtered stream purge
(measured here) leaves the payload bytes in the block file on disk, while a message
delete overwrites them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from types import TracebackType
from typing import ClassVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api

log = logging.getLogger(__name__)

DEFAULT_STREAM = "FACEGRID_EVENTS"
DEFAULT_SUBJECT_PREFIX = "facegrid.events"
API_PREFIX = api.DEFAULT_PREFIX  # "$JS.API"

PROCESSOR_ID_RE = re.compile(r"^[a-z][a-z0-9-]*$")
_STREAM_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_PREFIX_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_HEADER_NAME_RE = re.compile(r"^[!-9;-~]+$")  # printable ASCII without ':'
_CURSOR_PREFIX = "c1."
_WRONG_LAST_SEQUENCE = (10071, 10164)
_STREAM_NAME_IN_USE = 10058
_NATS_HEADER_PREFIX = "nats-"
# Since nats-server 2.11: the subject (wildcards allowed) that the expected last subject
# sequence applies to, instead of the published subject.
_EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"

# Status codes of pull responses (ADR-13).
_HEARTBEAT = "100"
_NO_MESSAGES = "404"
_REQUEST_TIMEOUT = "408"
_CONFLICT = "409"
_NO_RESPONDERS = "503"


# ---------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Published:
    """Where an event was stored; ``duplicate`` when it was stored before (same id)."""

    sequence: int
    duplicate: bool


@dataclass(frozen=True)
class StoredEvent:
    """An event as stored: its stream sequence, the server's timestamp (unix seconds), the
    fields of its subject, its own headers (not NATS's ``Nats-*`` ones) and its payload."""

    sequence: int
    time: float
    processor_id: str
    source_id: str
    event_id: str
    headers: Mapping[str, str]
    payload: bytes

    @property
    def cursor(self) -> str:
        return encode_cursor(self.sequence)


class EventIdConflictError(ValueError):
    """The event id is already stored for another processor."""


class StartKind(Enum):
    LATEST = "latest"
    EARLIEST = "earliest"
    AFTER = "after"
    SINCE = "since"


@dataclass(frozen=True)
class Start:
    """Where a subscription starts: ``Start.LATEST`` (only events published after it was
    created), ``Start.EARLIEST`` (everything stored), ``Start.after(sequence)`` (the events
    after a cursor) or ``Start.since(unix_time)`` (events stored at or after a time)."""

    kind: StartKind
    sequence: int = 0
    time: float = 0.0

    LATEST: ClassVar[Start]
    EARLIEST: ClassVar[Start]

    @classmethod
    def after(cls, sequence: int) -> Start:
        if sequence < 0:
            raise ValueError(f"sequence must be >= 0, not {sequence}")
        return cls(StartKind.AFTER, sequence=sequence)

    @classmethod
    def since(cls, unix_time: float) -> Start:
        return cls(StartKind.SINCE, time=float(unix_time))


Start.LATEST = Start(StartKind.LATEST)
Start.EARLIEST = Start(StartKind.EARLIEST)


# ---------------------------------------------------------------------------------------
# Encodings
# ---------------------------------------------------------------------------------------


def source_token(source_id: str) -> str:
    """The NATS subject token for a source id: lowercase base32 of its UTF-8, no padding."""
    if not source_id:
        raise ValueError("a source id must not be empty")
    return base64.b32encode(source_id.encode("utf-8")).decode("ascii").rstrip("=").lower()


def source_id_from_token(token: str) -> str:
    """The inverse of :func:`source_token`; ValueError if ``token`` is not one."""
    if not token or not re.fullmatch(r"[a-z2-7]+", token):
        raise ValueError(f"not a source token: {token!r}")
    padded = token.upper() + "=" * (-len(token) % 8)
    try:
        source_id = base64.b32decode(padded).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as err:
        raise ValueError(f"not a source token: {token!r}") from err
    if not source_id or source_token(source_id) != token:
        raise ValueError(f"not a canonical source token: {token!r}")
    return source_id


def encode_cursor(sequence: int) -> str:
    """An opaque cursor for a stream sequence: ``c1.`` and base32 of 8 big-endian bytes."""
    if not 0 <= sequence < 2**64:
        raise ValueError(f"sequence out of range: {sequence}")
    raw = sequence.to_bytes(8, "big")
    return _CURSOR_PREFIX + base64.b32encode(raw).decode("ascii").rstrip("=").lower()


def decode_cursor(text: str) -> int:
    """The sequence in a cursor from :func:`encode_cursor`; ValueError on anything else."""
    if not isinstance(text, str) or not text.startswith(_CURSOR_PREFIX):
        raise ValueError(f"not an event cursor: {text!r}")
    body = text[len(_CURSOR_PREFIX) :]
    if len(body) != 13 or not re.fullmatch(r"[a-z2-7]+", body):
        raise ValueError(f"not an event cursor: {text!r}")
    try:
        raw = base64.b32decode(body.upper() + "===")
    except binascii.Error as err:
        raise ValueError(f"not an event cursor: {text!r}") from err
    sequence = int.from_bytes(raw, "big")
    if len(raw) != 8 or encode_cursor(sequence) != text:
        raise ValueError(f"not a canonical event cursor: {text!r}")
    return sequence


def _check_processor_id(processor_id: str) -> str:
    if not PROCESSOR_ID_RE.fullmatch(processor_id):
        raise ValueError(f"processor id must match {PROCESSOR_ID_RE.pattern}: {processor_id!r}")
    return processor_id


def _canonical_event_id(event_id: str) -> str:
    try:
        return str(uuid.UUID(event_id))
    except (ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"event id must be a UUID: {event_id!r}") from err


def _own_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    if not headers:
        return {}
    return {
        str(k): str(v) for k, v in headers.items() if not k.lower().startswith(_NATS_HEADER_PREFIX)
    }


def _check_headers(headers: Mapping[str, str]) -> dict[str, str]:
    checked: dict[str, str] = {}
    for name, value in headers.items():
        if not _HEADER_NAME_RE.fullmatch(name) or name.lower().startswith(_NATS_HEADER_PREFIX):
            raise ValueError(f"invalid event header name: {name!r}")
        if "\r" in value or "\n" in value:
            raise ValueError(f"event header {name!r} contains a line break")
        checked[name] = value
    return checked


def _unix(moment: datetime.datetime | None) -> float:
    return moment.timestamp() if moment is not None else 0.0


def _reply_time(msg: Msg) -> float:
    """The stored time of a consumer delivery, from the nanoseconds in its reply subject
    (nats-py's ``metadata.timestamp`` rounds to microseconds differently from a get)."""
    tokens = msg.reply.split(".")
    index = 7 if len(tokens) == 9 else Msg.Ack.Timestamp
    return int(tokens[index]) / 1e9


def _header_time(text: str | None) -> float | None:
    """The stored time of a direct get, from ``Nats-Time-Stamp`` (RFC 3339, nanoseconds)."""
    if not text or not text.endswith("Z"):
        return None
    whole, _, fraction = text[:-1].partition(".")
    try:
        seconds = datetime.datetime.fromisoformat(whole + "+00:00").timestamp()
        nanos = int(fraction.ljust(9, "0")[:9]) if fraction else 0
    except ValueError:
        return None
    return (int(seconds) * 1_000_000_000 + nanos) / 1e9


def _status(msg: Msg) -> str | None:
    """The status of a pull response (heartbeat, end of a pull), None for a stored message."""
    if msg.reply.startswith("$JS.ACK.") or msg.data or not msg.headers:
        return None
    return msg.headers.get(api.Header.STATUS.value)


def _raise_api_error(response: Mapping[str, object]) -> None:
    error = response.get("error")
    if isinstance(error, dict):
        nats.js.errors.APIError.from_error(error)  # raises the matching subclass
        raise nats.js.errors.APIError(description=str(error))


# ---------------------------------------------------------------------------------------
# The log
# ---------------------------------------------------------------------------------------


@dataclass
class EventLog:
    """Match events of stream processors in one JetStream stream. Create with :meth:`open`."""

    nc: Client
    js: JetStreamContext
    stream: str
    subject_prefix: str
    info: api.StreamInfo
    # Reading: pull batches, the wait of one pull, and how long an idle consumer lives.
    page_batch: int = 256
    pull_expires_s: float = 5.0
    consumer_inactive_s: float = 60.0
    request_timeout_s: float = 5.0

    @classmethod
    async def open(
        cls,
        nc: Client,
        *,
        stream: str = DEFAULT_STREAM,
        subject_prefix: str = DEFAULT_SUBJECT_PREFIX,
        max_age_s: float,
        max_bytes: int,
        duplicate_window_s: float = 120.0,
        replicas: int = 1,
    ) -> EventLog:
        """Create the stream, or update it to this configuration if it exists.

        ``max_age_s`` <= 0 keeps events without an age limit, ``max_bytes`` <= 0 without a
        size limit; the oldest events go first. JetStream refuses a duplicate window longer
        than the age limit, so the window is capped at ``max_age_s``.
        """
        if not _STREAM_NAME_RE.fullmatch(stream):
            raise ValueError(f"invalid stream name: {stream!r}")
        if not all(_PREFIX_TOKEN_RE.fullmatch(t) for t in subject_prefix.split(".")):
            raise ValueError(f"invalid subject prefix: {subject_prefix!r}")
        max_age = max_age_s if max_age_s > 0 else None
        window = duplicate_window_s if max_age is None else min(duplicate_window_s, max_age)
        config = api.StreamConfig(
            name=stream,
            description="facegrid match events",
            subjects=[f"{subject_prefix}.>"],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            discard=api.DiscardPolicy.OLD,
            max_age=max_age,
            max_bytes=max_bytes if max_bytes > 0 else -1,
            max_msgs=-1,
            max_consumers=-1,
            duplicate_window=window,
            num_replicas=replicas,
            allow_direct=True,
        )
        js = nc.jetstream()
        try:
            info = await js.add_stream(config)
        except nats.js.errors.APIError as err:
            if err.err_code != _STREAM_NAME_IN_USE:
                raise
            info = await js.update_stream(config)
        return cls(nc=nc, js=js, stream=stream, subject_prefix=subject_prefix, info=info)

    # -- subjects -----------------------------------------------------------------------

    def subject(self, processor_id: str, source_id: str, event_id: str) -> str:
        return (
            f"{self.subject_prefix}.{_check_processor_id(processor_id)}."
            f"{source_token(source_id)}.{_canonical_event_id(event_id)}"
        )

    def _event_filter(self, processor: str, event_id: str) -> str:
        """The subjects of one event id, for a processor or (``*``) any."""
        return f"{self.subject_prefix}.{processor}.*.{event_id}"

    def filter_subjects(self, processor_id: str | None, source_ids: Sequence[str]) -> list[str]:
        """The consumer filters for a processor (or all) and some sources (or all)."""
        processor = "*" if processor_id is None else _check_processor_id(processor_id)
        if isinstance(source_ids, str):
            raise TypeError("source_ids must be a sequence of ids, not one string")
        tokens = list(dict.fromkeys(source_token(s) for s in source_ids))
        if not tokens:
            if processor_id is None:
                return [f"{self.subject_prefix}.>"]
            return [f"{self.subject_prefix}.{processor}.>"]
        return [f"{self.subject_prefix}.{processor}.{token}.*" for token in tokens]

    def _parse(
        self,
        subject: str,
        sequence: int,
        moment: float,
        headers: Mapping[str, str] | None,
        payload: bytes | None,
    ) -> StoredEvent | None:
        prefix = self.subject_prefix + "."
        parts = subject[len(prefix) :].split(".") if subject.startswith(prefix) else []
        if len(parts) != 3:
            log.warning("skipping message %d on unexpected subject %r", sequence, subject)
            return None
        processor_id, token, event_id = parts
        try:
            source_id = source_id_from_token(token)
        except ValueError:
            log.warning("skipping message %d with a bad source token: %r", sequence, subject)
            return None
        return StoredEvent(
            sequence=sequence,
            time=moment,
            processor_id=processor_id,
            source_id=source_id,
            event_id=event_id,
            headers=_own_headers(headers),
            payload=payload or b"",
        )

    def _from_msg(self, msg: Msg) -> StoredEvent | None:
        return self._parse(
            msg.subject, msg.metadata.sequence.stream, _reply_time(msg), msg.headers, msg.data
        )

    # -- writing ------------------------------------------------------------------------

    async def publish(
        self,
        processor_id: str,
        source_id: str,
        event_id: str,
        payload: bytes,
        headers: Mapping[str, str] | None = None,
    ) -> Published:
        """Store an event once: a repeat of ``event_id`` (a retry after a lost
        acknowledgement, or after a restart) returns the stored sequence and ``duplicate``.

        Event ids are unique in the whole log: an id stored for another processor raises
        :class:`EventIdConflictError` rather than passing for a repeat.
        """
        event_id = _canonical_event_id(event_id)
        subject = self.subject(processor_id, source_id, event_id)
        send = _check_headers(headers or {})
        send[api.Header.MSG_ID.value] = event_id
        send[api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value] = "0"
        send[_EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT] = self._event_filter("*", event_id)
        try:
            ack = await self.js.publish(subject, payload, headers=send, stream=self.stream)
        except nats.js.errors.APIError as err:
            if err.err_code not in _WRONG_LAST_SEQUENCE:
                raise
            stored = await self._lookup("*", event_id)
            if stored is None:  # purged or aged out between the two requests
                raise
        else:
            if not ack.duplicate:
                return Published(sequence=ack.seq, duplicate=False)
            stored = await self._lookup("*", event_id)
            if stored is None:
                return Published(sequence=ack.seq, duplicate=True)
        if stored.processor_id != processor_id:
            raise EventIdConflictError(
                f"event id {event_id} is stored for processor {stored.processor_id!r}"
                f" (sequence {stored.sequence}), not {processor_id!r}"
            )
        return Published(sequence=stored.sequence, duplicate=True)

    async def get(self, processor_id: str, event_id: str) -> StoredEvent | None:
        """The event of this processor with this id, or None (never stored, purged or aged
        out)."""
        try:
            event_id = _canonical_event_id(event_id)
        except ValueError:
            return None
        return await self._lookup(_check_processor_id(processor_id), event_id)

    async def _lookup(self, processor: str, event_id: str) -> StoredEvent | None:
        try:
            raw = await self.js.get_last_msg(
                self.stream, self._event_filter(processor, event_id), direct=True
            )
        except nats.js.errors.NotFoundError:
            return None
        if raw.subject is None or raw.seq is None:
            return None
        stamp = _header_time((raw.headers or {}).get("Nats-Time-Stamp"))
        moment = stamp if stamp is not None else _unix(raw.time)
        return self._parse(raw.subject, raw.seq, moment, raw.headers, raw.data)

    async def purge(self, processor_id: str) -> int:
        """Erase every event of a processor (payloads overwritten on disk); how many.

        One message delete per event (a filtered purge would leave the bytes in the block
        files), ``page_batch`` at a time; then a filtered purge for events published
        meanwhile.
        """
        filters = self.filter_subjects(processor_id, ())
        erased = 0
        async with contextlib.aclosing(self._stored(filters, headers_only=True)) as batches:
            async for batch in batches:
                erased += sum(await self._erase_all([m.metadata.sequence.stream for m in batch]))
        # Anything published while erasing: a plain purge counts and removes it.
        response = await self.nc.request(
            f"{API_PREFIX}.STREAM.PURGE.{self.stream}",
            json.dumps({"filter": filters[0]}).encode(),
            timeout=self.request_timeout_s,
        )
        body = json.loads(response.data)
        _raise_api_error(body)
        return erased + int(body.get("purged", 0))

    async def expire(self, before: float) -> dict[str, int]:
        """Erase every event stored before ``before`` (Unix time), payloads overwritten
        on disk as by :meth:`purge`; how many, per processor id.

        Events are in time order in the stream, so this reads from the oldest and stops
        at the first one that is young enough.
        """
        erased: dict[str, int] = {}
        everything = [f"{self.subject_prefix}.>"]
        async with contextlib.aclosing(self._stored(everything, headers_only=True)) as batches:
            async for batch in batches:
                old = [m for m in batch if _reply_time(m) < before]
                done = await self._erase_all([m.metadata.sequence.stream for m in old])
                for msg, was_erased in zip(old, done, strict=True):
                    event = self._parse(msg.subject, 0, 0.0, None, None)
                    if was_erased and event is not None:
                        erased[event.processor_id] = erased.get(event.processor_id, 0) + 1
                if len(old) < len(batch):
                    break
        return erased

    async def erase_where(self, doomed: Callable[[StoredEvent], bool]) -> list[StoredEvent]:
        """Erase every stored event for which ``doomed(event)`` holds (payloads
        overwritten on disk, as by :meth:`purge`); those erased. Reads every event."""
        erased: list[StoredEvent] = []
        everything = [f"{self.subject_prefix}.>"]
        async with contextlib.aclosing(self._stored(everything, headers_only=False)) as batches:
            async for batch in batches:
                events = [self._from_msg(m) for m in batch]
                chosen = [e for e in events if e is not None and doomed(e)]
                done = await self._erase_all([e.sequence for e in chosen])
                erased.extend(e for e, was_erased in zip(chosen, done, strict=True) if was_erased)
        return erased

    async def _stored(
        self, filters: list[str], *, headers_only: bool
    ) -> AsyncGenerator[list[Msg], None]:
        """The messages on ``filters`` stored when called, oldest first, a pull at a time
        (those published meanwhile are left out)."""
        info = await self.js.stream_info(self.stream)
        if not info.state.messages:
            return
        last = info.state.last_seq
        async with _PullReader(
            self, filters, after=0, headers_only=headers_only, max_batch=self.page_batch
        ) as reader:
            pending = await reader.create()
            while pending:
                batch = await reader.pull_now(self.page_batch)
                if not batch:
                    return
                pending = batch[-1].metadata.num_pending
                within = [m for m in batch if m.metadata.sequence.stream <= last]
                if within:
                    yield within
                if batch[-1].metadata.sequence.stream >= last:
                    return

    async def _erase_all(self, sequences: Sequence[int]) -> list[bool]:
        return list(await asyncio.gather(*(self._erase(seq) for seq in sequences)))

    async def _erase(self, sequence: int) -> bool:
        try:
            # Without ``no_erase`` the server overwrites the message in its block file.
            return await self.js.delete_msg(self.stream, sequence)
        except nats.js.errors.NotFoundError:
            return False  # aged out meanwhile

    # -- reading ------------------------------------------------------------------------

    async def page(
        self,
        *,
        processor_id: str | None,
        source_ids: Sequence[str] = (),
        after_sequence: int = 0,
        start_time: float | None = None,
        end_time: float | None = None,
        limit: int,
        header_equals: Mapping[str, str] | None = None,
        max_scan: int = 10_000,
    ) -> tuple[list[StoredEvent], int | None]:
        """Up to ``limit`` events in stream order after ``after_sequence``, stored in
        ``[start_time, end_time)``, whose headers include ``header_equals``; and the sequence
        to continue after, or None when nothing more matches now.

        ``header_equals`` filters here, not on the server, so a page reads at most
        ``max_scan`` events and may return fewer than ``limit`` with a sequence to go on.
        """
        if limit < 1:
            raise ValueError(f"limit must be >= 1, not {limit}")
        wanted = dict(header_equals or {})
        filters = self.filter_subjects(processor_id, source_ids)
        events: list[StoredEvent] = []
        by_time = start_time if after_sequence <= 0 else None
        async with _PullReader(
            self, filters, after=after_sequence, since=by_time, max_batch=self.page_batch
        ) as reader:
            pending = await reader.create()
            scanned = 0
            while pending:
                batch = await reader.pull_now(min(self.page_batch, limit - len(events)))
                if not batch:
                    return events, None  # aged out or purged meanwhile
                for msg in batch:
                    scanned += 1
                    pending = msg.metadata.num_pending
                    event = self._from_msg(msg)
                    sequence = msg.metadata.sequence.stream
                    if event is not None:
                        if end_time is not None and event.time >= end_time:
                            return events, None
                        if (start_time is None or event.time >= start_time) and all(
                            event.headers.get(k) == v for k, v in wanted.items()
                        ):
                            events.append(event)
                    if len(events) >= limit or scanned >= max_scan:
                        return events, sequence if pending else None
        return events, None

    async def subscribe(
        self,
        *,
        processor_id: str | None,
        source_ids: Sequence[str] = (),
        start: Start,
        batch: int = 64,
    ) -> EventSubscription:
        """A live subscription: iterate it (``async for``) or call ``next(timeout)``.

        The consumer exists once this returns, so ``Start.LATEST`` delivers every event
        published afterwards. Close it with ``aclose()`` or ``async with``; cancelling the
        task that waits in ``async for`` closes it too. At most ``batch`` events are in
        flight to a reader that does not keep up.
        """
        filters = self.filter_subjects(processor_id, source_ids)
        if start.kind is StartKind.LATEST:
            info = await self.js.stream_info(self.stream)
            after, since = info.state.last_seq, None
        elif start.kind is StartKind.EARLIEST:
            after, since = 0, None
        elif start.kind is StartKind.AFTER:
            after, since = start.sequence, None
        else:
            after, since = 0, start.time
        reader = _PullReader(self, filters, after=after, since=since, max_batch=batch)
        subscription = EventSubscription(self, reader, batch=batch)
        await subscription._open()
        return subscription


# ---------------------------------------------------------------------------------------
# Pull consumers
# ---------------------------------------------------------------------------------------


class _PullEvent(Enum):
    ENDED = "ended"  # the pull request ended (expired, nothing there, or a conflict)
    TIMEOUT = "timeout"  # nothing arrived in time


class _ConsumerLostError(Exception):
    """The consumer is gone or its deliveries are out of order: recreate it."""


@dataclass
class _PullReader:
    """An ephemeral pull consumer (no acks, memory storage) read through its own inbox."""

    log: EventLog
    filters: list[str]
    after: int = 0  # start after this stream sequence ...
    since: float | None = None  # ... or at this time, until something was delivered
    headers_only: bool = False
    max_batch: int = 256  # the largest pull: bounds the client-side buffer
    name: str = field(default="", init=False)
    _sub: Subscription | None = field(default=None, init=False, repr=False)
    _inbox: str = field(default="", init=False)
    _next_consumer_seq: int = field(default=1, init=False)
    _open_request: int = field(default=0, init=False)  # messages still due on the pull
    _request_ends: float = field(default=0.0, init=False)  # monotonic
    last_activity: float = field(default=0.0, init=False)  # monotonic: last message or beat

    def _config(self) -> api.ConsumerConfig:
        config = api.ConsumerConfig(
            name=self.name,
            ack_policy=api.AckPolicy.NONE,
            replay_policy=api.ReplayPolicy.INSTANT,
            inactive_threshold=self.log.consumer_inactive_s,
            num_replicas=1,
            mem_storage=True,
            headers_only=self.headers_only or None,
        )
        if self.since is not None:
            config.deliver_policy = api.DeliverPolicy.BY_START_TIME
            # The API takes microseconds and stored times have nanoseconds: start a little
            # early (readers drop what is before ``since``) rather than miss the first.
            early = self.since - 2e-6
            config.opt_start_time = datetime.datetime.fromtimestamp(early, datetime.UTC)
        elif self.after > 0:
            config.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = self.after + 1
        else:
            config.deliver_policy = api.DeliverPolicy.ALL
        if len(self.filters) == 1:
            config.filter_subject = self.filters[0]
        else:
            config.filter_subjects = list(self.filters)
        return config

    async def create(self) -> int:
        """(Re)create the consumer where the reader stands; the number of matching events."""
        await self.close()
        self._inbox = self.log.nc.new_inbox()
        # Room for two pulls' worth: a pull that went silent may still deliver late.
        self._sub = await self.log.nc.subscribe(
            self._inbox, pending_msgs_limit=2 * self.max_batch + 64
        )
        self._next_consumer_seq = 1
        self._open_request = 0
        self.name = "fg_" + uuid.uuid4().hex
        try:
            info = await self.log.js.add_consumer(self.log.stream, self._config())
        except BaseException:
            self.name = ""  # not created: nothing to delete later
            raise
        return int(info.num_pending or 0)

    async def close(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        if self.name:
            name, self.name = self.name, ""
            with contextlib.suppress(TimeoutError, nats.errors.Error):
                await self.log.js.delete_consumer(self.log.stream, name)

    async def __aenter__(self) -> _PullReader:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def request(self, batch: int, *, expires_s: float | None, heartbeat_s: float) -> None:
        """Ask for up to ``batch`` messages: those there now (``expires_s`` None), or as they
        come until ``expires_s`` passes, with a heartbeat every ``heartbeat_s`` meanwhile."""
        body: dict[str, object] = {"batch": batch}
        now = time.monotonic()
        if expires_s is None:
            body["no_wait"] = True
            self._request_ends = now + self.log.request_timeout_s
        else:
            body["expires"] = int(expires_s * 1e9)
            body["idle_heartbeat"] = int(heartbeat_s * 1e9)
            self._request_ends = now + expires_s + self.log.request_timeout_s
        await self.log.nc.publish(
            f"{API_PREFIX}.CONSUMER.MSG.NEXT.{self.log.stream}.{self.name}",
            json.dumps(body).encode(),
            reply=self._inbox,
        )
        self._open_request = batch
        self.last_activity = now

    @property
    def request_open(self) -> bool:
        if self._open_request and time.monotonic() > self._request_ends:
            self._open_request = 0  # its end status never came
        return self._open_request > 0

    async def receive(self, timeout: float) -> Msg | _PullEvent:
        """The next delivered message, ENDED when the open pull ended, or TIMEOUT when
        ``timeout`` passed without one. Raises _ConsumerLostError."""
        assert self._sub is not None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return _PullEvent.TIMEOUT
            try:
                msg = await self._sub.next_msg(timeout=remaining)
            except nats.errors.TimeoutError:
                return _PullEvent.TIMEOUT
            self.last_activity = time.monotonic()
            status = _status(msg)
            if status is None:
                meta = msg.metadata
                if meta.sequence.consumer != self._next_consumer_seq:
                    raise _ConsumerLostError(
                        f"consumer sequence {meta.sequence.consumer}, expected"
                        f" {self._next_consumer_seq}"
                    )
                self._next_consumer_seq += 1
                self._open_request = max(0, self._open_request - 1)
                return msg
            if status == _HEARTBEAT:
                continue
            description = (msg.headers or {}).get(api.Header.DESCRIPTION.value, "")
            if status == _CONFLICT and "deleted" in description.lower():
                raise _ConsumerLostError(f"409 {description}")
            if status == _NO_RESPONDERS:
                raise _ConsumerLostError("no responders: the consumer is gone")
            if status not in (_NO_MESSAGES, _REQUEST_TIMEOUT, _CONFLICT):
                log.warning("pull on %s ended with status %s %s", self.name, status, description)
            self._open_request = 0
            return _PullEvent.ENDED

    async def pull_now(self, batch: int) -> list[Msg]:
        """The messages available now, up to ``batch`` (one no-wait pull)."""
        await self.request(batch, expires_s=None, heartbeat_s=0.0)
        messages: list[Msg] = []
        while self.request_open:
            msg = await self.receive(timeout=self.log.request_timeout_s)
            if not isinstance(msg, Msg):
                break
            messages.append(msg)
        return messages

    def forget_request(self) -> None:
        self._open_request = 0
        self.last_activity = time.monotonic()

    def delivered(self, sequence: int) -> None:
        """Remember the last delivered stream sequence, where a recreated consumer starts."""
        self.after = sequence
        self.since = None


class EventSubscription(AsyncIterator[StoredEvent]):
    """Events after a start position, live, in stream order, each once."""

    def __init__(self, log: EventLog, reader: _PullReader, *, batch: int) -> None:
        if batch < 1:
            raise ValueError(f"batch must be >= 1, not {batch}")
        self._log = log
        self._reader = reader
        self._batch = batch
        self._closed = False
        self.recreated = 0  # how often the consumer was recreated (for tests and metrics)

    @property
    def sequence(self) -> int:
        """The stream sequence of the last event delivered (or where it started)."""
        return self._reader.after

    @property
    def cursor(self) -> str:
        return encode_cursor(self.sequence)

    @property
    def consumer_name(self) -> str:
        return self._reader.name

    @property
    def closed(self) -> bool:
        return self._closed

    async def _open(self) -> None:
        await self._reader.create()

    async def _recreate(self, reason: str) -> None:
        log.info("recreating consumer after sequence %d: %s", self._reader.after, reason)
        self.recreated += 1
        delay = 0.05
        while not self._closed:
            try:
                await self._reader.create()
                return
            except (TimeoutError, nats.errors.Error) as err:
                if self._log.nc.is_closed:
                    raise
                log.info("consumer not recreated yet (%s), retrying", err)
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)

    async def next(self, timeout: float | None = None) -> StoredEvent | None:
        """The next event, or None if ``timeout`` passes first (the subscription stays)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        expires = self._log.pull_expires_s
        heartbeat = max(0.05, expires / 5)
        silent_after = 2 * heartbeat + 0.5  # no message and no heartbeat for this long
        reader = self._reader
        while not self._closed:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            try:
                if not reader.request_open:
                    await reader.request(self._batch, expires_s=expires, heartbeat_s=heartbeat)
                wait = max(0.001, reader.last_activity + silent_after - time.monotonic())
                msg = await reader.receive(wait if remaining is None else min(wait, remaining))
                if msg is _PullEvent.TIMEOUT:
                    if time.monotonic() - reader.last_activity >= silent_after:
                        await self._check_consumer()  # silent: is the consumer still there?
                    continue
                if msg is _PullEvent.ENDED:
                    continue
            except _ConsumerLostError as lost:
                await self._recreate(str(lost))
                continue
            except nats.errors.ConnectionClosedError:
                raise
            except (TimeoutError, nats.errors.Error) as err:
                await self._recreate(f"{type(err).__name__}: {err}")
                continue
            assert isinstance(msg, Msg)
            sequence = msg.metadata.sequence.stream
            if reader.since is None and sequence <= reader.after:
                continue  # never twice
            event = self._log._from_msg(msg)
            if reader.since is not None and _reply_time(msg) < reader.since:
                continue  # the consumer started a little early
            reader.delivered(sequence)
            if event is not None:
                return event
        return None

    async def _check_consumer(self) -> None:
        try:
            await self._log.js.consumer_info(self._log.stream, self._reader.name)
            # It exists, so the pull went missing (a reconnect): ask again.
            self._reader.forget_request()
        except nats.js.errors.NotFoundError:
            await self._recreate("consumer not found")
        except (TimeoutError, nats.errors.Error) as err:
            if self._log.nc.is_closed:
                raise
            await self._recreate(f"consumer info failed: {type(err).__name__}")

    def __aiter__(self) -> EventSubscription:
        return self

    async def __anext__(self) -> StoredEvent:
        try:
            event = await self.next()
        except asyncio.CancelledError:
            await asyncio.shield(self.aclose())
            raise
        if event is None:
            raise StopAsyncIteration
        return event

    async def aclose(self) -> None:
        """Delete the consumer; iteration ends."""
        self._closed = True
        await self._reader.close()

    async def __aenter__(self) -> EventSubscription:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
