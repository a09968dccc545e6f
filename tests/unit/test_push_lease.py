"""A PushFrames stream's end when its lease renewal's reply arrives as the stream closes.

On Python 3.11 asyncio.wait_for (which nats-py awaits every reply with) keeps the reply
and drops a cancellation that comes in the same loop iteration; the renewal loop then
carried on and closing the stream waited for it forever (the PushFrames call hung until
its deadline). The replica is real; its lease manager is a stand-in that answers a
renewal when the test says, the way nats-py does, and no other part runs.
"""

from __future__ import annotations

import asyncio
from typing import Any

from facegrid.config import IngestSettings
from facegrid.v1 import ingest_pb2
from facegrid_ingest.processors import StoredProcessor
from facegrid_ingest.replica import Replica

I = ingest_pb2  # noqa: E741


class _Leases:
    """Push leases held at once; a renewal waits for the reply the test gives it."""

    replica_id = "replica-a"
    interval_s = 0.01

    def __init__(self) -> None:
        self.held: dict[str, int] = {}
        self.replies: list[asyncio.Future[int]] = []
        self.released: list[tuple[str, int]] = []

    async def acquire(self, key: str) -> int:
        self.held[key] = 1
        return 1

    async def renew(self, key: str, revision: int) -> int:
        reply: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.replies.append(reply)
        return await asyncio.wait_for(reply, 30)  # as nats-py awaits a reply

    async def release(self, key: str, revision: int) -> bool:
        self.released.append((key, revision))
        return True


class _Store:
    async def clear_status(self, key: str) -> None:
        return None


class _Pipeline:
    def __init__(self, emit: Any) -> None:
        self.emit = emit


def test_a_push_stream_closes_when_its_renewal_is_answered_as_it_closes() -> None:
    processor = I.StreamProcessor(
        name="streamProcessors/door", state=I.StreamProcessor.STATE_RUNNING
    )
    source = processor.sources.add(source_id="door-1")
    source.push.SetInParent()
    stored = StoredProcessor(processor, "operator", 1)
    leases = _Leases()

    async def main() -> tuple[bool, list[tuple[str, int]], str]:
        replica = Replica(
            IngestSettings(),
            _Store(),  # type: ignore[arg-type]
            leases,  # type: ignore[arg-type]
            leases,  # type: ignore[arg-type]
            None,  # type: ignore[arg-type]
            None,  # type: ignore[arg-type]
            _Pipeline,  # type: ignore[arg-type]
        )
        worker, _ = await replica.open_push(stored, source, lambda: None)
        assert worker is not None
        while not leases.replies:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0)  # the renewal now waits in wait_for
        leases.replies[-1].set_result(2)  # its reply comes...
        closing = asyncio.ensure_future(replica.close_push(worker))  # ...as the stream ends
        done, _ = await asyncio.wait({closing}, timeout=5)
        if worker.task is not None and not worker.task.done():
            worker.task.cancel()
        return bool(done), leases.released, worker.key

    closed, released, key = asyncio.run(main())
    assert closed  # the stream's end did not wait on a renewal loop that went on
    assert released == [(key, 2)]  # the lease released at its renewed revision
