"""Stream processors and the status of their sources, in NATS KV, shared by replicas.

Every replica reads and writes the same buckets, so any replica answers any call and
each sees the others' changes (it watches the processors bucket). A processor is
stored with the principal that created it (its events are audited under that name)
and its desired run state; each source's reader (the holder of its lease) writes the
source's status, which expires when nobody refreshes it. Updates are compare-and-set
on the KV revision, so two replicas changing one processor at once cannot lose a
change: the later one retries on the fresh value.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from facegrid.v1 import ingest_pb2
from nats.js.client import JetStreamContext
from nats.js.errors import (
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
)
from nats.js.kv import KeyValue

from facegrid_ingest.kv import bucket_keys

StreamProcessor = ingest_pb2.StreamProcessor
VideoSource = ingest_pb2.VideoSource

PROCESSORS_BUCKET = "facegrid_ingest_processors"
STATUS_BUCKET = "facegrid_ingest_status"
_CAS_ATTEMPTS = 10


class ProcessorConflictError(RuntimeError):
    """The processor changed too often while it was being updated."""


@dataclass(frozen=True)
class StoredProcessor:
    processor: StreamProcessor  # its state field is the desired one: STOPPED or RUNNING
    principal: str  # who created it
    revision: int

    @property
    def processor_id(self) -> str:
        return self.processor.name.removeprefix("streamProcessors/")

    @property
    def wants_running(self) -> bool:
        return self.processor.state == StreamProcessor.STATE_RUNNING


def _encode(processor: StreamProcessor, principal: str) -> bytes:
    return json.dumps(
        {"processor": processor.SerializeToString(deterministic=True).hex(), "principal": principal}
    ).encode()


def _decode(value: bytes, revision: int) -> StoredProcessor:
    data = json.loads(value)
    return StoredProcessor(
        StreamProcessor.FromString(bytes.fromhex(data["processor"])), data["principal"], revision
    )


class ProcessorStore:
    """Stream processors by id, and source statuses by lease key."""

    def __init__(self, js: JetStreamContext, processors: KeyValue, status: KeyValue) -> None:
        self._js = js
        self._processors = processors
        self._status = status

    @classmethod
    async def open(cls, js: JetStreamContext, status_ttl_s: float) -> ProcessorStore:
        async def bucket(name: str, ttl: float | None) -> KeyValue:
            try:
                return await js.key_value(name)
            except BucketNotFoundError:
                return await js.create_key_value(bucket=name, history=1, ttl=ttl)

        return cls(
            js, await bucket(PROCESSORS_BUCKET, None), await bucket(STATUS_BUCKET, status_ttl_s)
        )

    async def create(self, processor: StreamProcessor, principal: str) -> StoredProcessor | None:
        """None if the id is taken."""
        try:
            revision = await self._processors.create(
                processor.name.removeprefix("streamProcessors/"), _encode(processor, principal)
            )
        except KeyWrongLastSequenceError:
            return None
        return StoredProcessor(processor, principal, revision)

    async def get(self, processor_id: str) -> StoredProcessor | None:
        try:
            entry = await self._processors.get(processor_id)
        except KeyNotFoundError:
            return None
        if entry.value is None or entry.revision is None:
            return None
        return _decode(entry.value, entry.revision)

    async def list(self) -> list[StoredProcessor]:
        """Every processor, by id (deleted ones skipped)."""
        found = [await self.get(key) for key in await bucket_keys(self._js, PROCESSORS_BUCKET)]
        return [f for f in found if f is not None]

    async def change(
        self, processor_id: str, edit: Callable[[StreamProcessor], None]
    ) -> StoredProcessor | None:
        """Apply ``edit`` to the stored processor by compare-and-set; None if it is gone.

        ``edit`` may raise (a ServiceError) to refuse the change; it is called again
        with the fresh value when another replica changed the processor meanwhile."""
        for _ in range(_CAS_ATTEMPTS):
            stored = await self.get(processor_id)
            if stored is None:
                return None
            processor = StreamProcessor()
            processor.CopyFrom(stored.processor)
            edit(processor)
            processor.update_time.GetCurrentTime()
            try:
                revision = await self._processors.update(
                    processor_id, _encode(processor, stored.principal), last=stored.revision
                )
            except KeyWrongLastSequenceError:
                continue
            return StoredProcessor(processor, stored.principal, revision)
        raise ProcessorConflictError(f"streamProcessors/{processor_id} kept changing")

    async def delete(self, processor_id: str) -> bool:
        if await self.get(processor_id) is None:
            return False
        await self._processors.purge(processor_id)
        return True

    async def changes(self) -> AsyncIterator[None]:
        """Yields whenever any processor is created, changed or deleted."""
        watcher = await self._processors.watchall(include_history=False)
        try:
            async for _ in watcher:
                yield None
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]

    async def put_status(self, key: str, status: VideoSource) -> None:
        await self._status.put(key, status.SerializeToString())

    async def status(self, key: str) -> VideoSource | None:
        try:
            entry = await self._status.get(key)
        except KeyNotFoundError:
            return None
        return None if entry.value is None else VideoSource.FromString(entry.value)

    async def clear_status(self, key: str) -> None:
        with contextlib.suppress(KeyNotFoundError):
            await self._status.purge(key)
