"""Micro-batching of concurrent embedding requests.

Concurrent calls each bring a few chips; the model is far more efficient on one batch
of 32 than on 32 batches of one. Requests wait in a bounded queue (counted in chips);
one worker takes up to ``max_batch`` chips at a time, waiting at most
``max_delay_s`` for a batch to fill, runs the model once and hands each caller its
slice. A full queue is refused at once with RESOURCE_EXHAUSTED rather than growing.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
from facegrid import errors
from facegrid.tasks import cancel_and_wait
from numpy.typing import NDArray
from opentelemetry import context as otel_context

RunBatch = Callable[[NDArray[np.uint8]], Awaitable[NDArray[np.float32]]]


@dataclass
class _Pending:
    chips: NDArray[np.uint8]
    future: asyncio.Future[NDArray[np.float32]]
    taken: int = 0  # chips of this request already sent to the model
    parts: list[NDArray[np.float32]] = field(default_factory=list)
    # The caller's trace context: a batch is traced as part of its first request's trace.
    trace_context: otel_context.Context = field(default_factory=otel_context.get_current)

    @property
    def remaining(self) -> int:
        return int(self.chips.shape[0]) - self.taken


@dataclass
class BatchStats:
    batches: int = 0
    chips: int = 0
    largest_batch: int = 0


class MicroBatcher:
    """Collects chips from concurrent callers into batches for one model."""

    def __init__(
        self, run_batch: RunBatch, max_batch: int, max_delay_s: float, max_queued_chips: int
    ) -> None:
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._max_delay_s = max_delay_s
        self._max_queued = max_queued_chips
        self._queue: deque[_Pending] = deque()
        self._queued_chips = 0
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self.stats = BatchStats()

    @property
    def queued_chips(self) -> int:
        return self._queued_chips

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.create_task(self._work(), name="embedding-batcher")

    async def close(self) -> None:
        await cancel_and_wait([self._worker], what="embedding batcher")
        self._worker = None
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(
                    errors.unavailable("embedding service is stopping", "SHUTTING_DOWN")
                )

    async def submit(self, chips: NDArray[np.uint8]) -> NDArray[np.float32]:
        """Embed ``chips`` (N x 150 x 150 x 3); returns N x D raw model outputs in order."""
        count = int(chips.shape[0])
        if self._queued_chips + count > self._max_queued:
            raise errors.resource_exhausted(
                "embedding queue",
                f"{self._queued_chips} chips are already queued (limit {self._max_queued})",
                "EMBEDDING_QUEUE_FULL",
            )
        pending = _Pending(chips, asyncio.get_running_loop().create_future())
        self._queue.append(pending)
        self._queued_chips += count
        self._wakeup.set()
        try:
            return await asyncio.shield(pending.future)
        except asyncio.CancelledError:
            # The caller gave up (deadline): its chips need not be computed any more.
            if pending.taken == 0 and pending in self._queue:
                self._queue.remove(pending)
                self._queued_chips -= pending.remaining
            raise

    async def _work(self) -> None:
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self._queued_chips < self._max_batch and self._max_delay_s > 0:
                await self._wait_for_more()
            batch, takers = self._take_batch()
            if not takers:
                continue
            token = otel_context.attach(takers[0][0].trace_context)
            try:
                outputs = await self._run_batch(batch)
            except Exception as exc:
                for pending, _ in takers:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            finally:
                otel_context.detach(token)
            self._deliver(outputs, takers)

    async def _wait_for_more(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._max_delay_s
        while self._queued_chips < self._max_batch:
            timeout = deadline - loop.time()
            if timeout <= 0:
                return
            self._wakeup.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()
            except TimeoutError:
                return

    def _take_batch(self) -> tuple[NDArray[np.uint8], list[tuple[_Pending, int]]]:
        parts: list[NDArray[np.uint8]] = []
        takers: list[tuple[_Pending, int]] = []
        room = self._max_batch
        while self._queue and room > 0:
            pending = self._queue[0]
            if pending.future.done():  # cancelled while queued
                self._queue.popleft()
                self._queued_chips -= pending.remaining
                continue
            take = min(room, pending.remaining)
            parts.append(pending.chips[pending.taken : pending.taken + take])
            takers.append((pending, take))
            pending.taken += take
            self._queued_chips -= take
            room -= take
            if pending.remaining == 0:
                self._queue.popleft()
        if not parts:
            return np.empty((0, 150, 150, 3), np.uint8), []
        batch = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        self.stats.batches += 1
        self.stats.chips += int(batch.shape[0])
        self.stats.largest_batch = max(self.stats.largest_batch, int(batch.shape[0]))
        return batch, takers

    @staticmethod
    def _deliver(outputs: NDArray[np.float32], takers: list[tuple[_Pending, int]]) -> None:
        start = 0
        for pending, take in takers:
            pending.parts.append(outputs[start : start + take])
            start += take
            if pending.remaining == 0 and not pending.future.done():
                result = (
                    pending.parts[0] if len(pending.parts) == 1 else np.concatenate(pending.parts)
                )
                pending.future.set_result(result)
