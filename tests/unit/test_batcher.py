"""The embedding micro-batcher: order, batching, bounds and failures.

The model is replaced by a small function that records batch sizes: this tests the
batcher's own logic; the real model is exercised by the embedding service tests.
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from facegrid.errors import ServiceError
from facegrid_embedding.batcher import MicroBatcher
from numpy.typing import NDArray


def chips(values: list[int]) -> NDArray[np.uint8]:
    out = np.zeros((len(values), 150, 150, 3), np.uint8)
    for i, value in enumerate(values):
        out[i, 0, 0, 0] = value
    return out


class RecordingModel:
    def __init__(self, delay_s: float = 0.0) -> None:
        self.batch_sizes: list[int] = []
        self.delay_s = delay_s

    async def __call__(self, batch: NDArray[np.uint8]) -> NDArray[np.float32]:
        self.batch_sizes.append(int(batch.shape[0]))
        await asyncio.sleep(self.delay_s)
        # "embedding" = the marker pixel, so each caller can check it got its own rows.
        return batch[:, 0, 0, :1].astype(np.float32)


def test_concurrent_requests_share_batches_and_keep_order() -> None:
    async def scenario() -> tuple[list[NDArray[np.float32]], list[int]]:
        model = RecordingModel(delay_s=0.01)
        batcher = MicroBatcher(model, max_batch=32, max_delay_s=0.05, max_queued_chips=1000)
        batcher.start()
        requests = [chips([i, i + 100]) for i in range(40)]
        results = await asyncio.gather(*(batcher.submit(r) for r in requests))
        await batcher.close()
        return results, model.batch_sizes

    results, sizes = asyncio.run(scenario())
    for i, result in enumerate(results):
        assert result[:, 0].tolist() == [i, i + 100]
    assert sum(sizes) == 80
    assert max(sizes) == 32  # batches filled up to the limit
    assert len(sizes) <= 4


def test_request_larger_than_a_batch_is_split() -> None:
    async def scenario() -> tuple[NDArray[np.float32], list[int]]:
        model = RecordingModel()
        batcher = MicroBatcher(model, max_batch=8, max_delay_s=0.0, max_queued_chips=100)
        batcher.start()
        result = await batcher.submit(chips(list(range(20))))
        await batcher.close()
        return result, model.batch_sizes

    result, sizes = asyncio.run(scenario())
    assert result[:, 0].tolist() == list(range(20))
    assert sizes == [8, 8, 4]


def test_full_queue_is_refused_with_resource_exhausted() -> None:
    async def scenario() -> ServiceError:
        model = RecordingModel(delay_s=0.2)
        batcher = MicroBatcher(model, max_batch=4, max_delay_s=0.0, max_queued_chips=8)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(chips([1] * 8)))
        await asyncio.sleep(0)  # queued, not yet taken
        try:
            await batcher.submit(chips([2]))
        except ServiceError as exc:
            error = exc
        await first
        await batcher.close()
        return error

    error = asyncio.run(scenario())
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_model_failure_reaches_every_waiting_caller_and_batcher_survives() -> None:
    calls = 0

    async def flaky(batch: NDArray[np.uint8]) -> NDArray[np.float32]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("model exploded")
        return batch[:, 0, 0, :1].astype(np.float32)

    async def scenario() -> NDArray[np.float32]:
        batcher = MicroBatcher(flaky, max_batch=8, max_delay_s=0.01, max_queued_chips=100)
        batcher.start()
        failing = await asyncio.gather(
            batcher.submit(chips([1])), batcher.submit(chips([2])), return_exceptions=True
        )
        assert all(isinstance(f, RuntimeError) for f in failing)
        result = await batcher.submit(chips([7]))
        await batcher.close()
        return result

    assert asyncio.run(scenario())[:, 0].tolist() == [7]


def test_cancelled_caller_does_not_block_others() -> None:
    async def scenario() -> NDArray[np.float32]:
        model = RecordingModel(delay_s=0.05)
        batcher = MicroBatcher(model, max_batch=2, max_delay_s=0.0, max_queued_chips=100)
        batcher.start()
        busy = asyncio.ensure_future(batcher.submit(chips([1, 2])))
        await asyncio.sleep(0.01)
        doomed = asyncio.ensure_future(batcher.submit(chips([3, 4])))
        await asyncio.sleep(0)
        doomed.cancel()
        result = await batcher.submit(chips([5]))
        await busy
        await batcher.close()
        return result

    assert asyncio.run(scenario())[:, 0].tolist() == [5]


@pytest.mark.parametrize("delay", [0.0, 0.005])
def test_single_request_is_not_held_longer_than_the_delay(delay: float) -> None:
    async def scenario() -> float:
        batcher = MicroBatcher(
            RecordingModel(), max_batch=32, max_delay_s=delay, max_queued_chips=10
        )
        batcher.start()
        loop = asyncio.get_running_loop()
        start = loop.time()
        await batcher.submit(chips([1]))
        elapsed = loop.time() - start
        await batcher.close()
        return elapsed

    assert asyncio.run(scenario()) < 1.0  # generous: bounded wait, not a timing target
