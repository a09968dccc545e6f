"""facegrid.tasks.cancel_and_wait: a task stops even when its first cancellation is lost
in asyncio.wait_for, the way a NATS call loses it (Python 3.11)."""

from __future__ import annotations

import asyncio
import logging
import sys

import pytest
from facegrid.tasks import cancel_and_wait


async def _renewing(replies: list[asyncio.Future[bytes]]) -> None:
    """A lease renewal loop: sleep, then await a reply the way nats-py does."""
    while True:
        await asyncio.sleep(0.01)
        reply = asyncio.get_running_loop().create_future()
        replies.append(reply)
        await asyncio.wait_for(reply, 5)


async def _cancelled_as_its_reply_arrives() -> asyncio.Task[None]:
    replies: list[asyncio.Future[bytes]] = []
    task = asyncio.create_task(_renewing(replies))
    while not replies:
        await asyncio.sleep(0)
    await asyncio.sleep(0)  # the task now waits in wait_for
    replies[-1].set_result(b"ok")  # the reply, in the same loop iteration as the cancel
    task.cancel()
    return task


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="wait_for keeps the cancel from 3.12")
def test_one_cancel_is_lost_when_the_reply_arrives_with_it() -> None:
    async def main() -> bool:
        task = await _cancelled_as_its_reply_arrives()
        await asyncio.wait({task}, timeout=0.3)
        stopped = task.done()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return stopped

    assert asyncio.run(main()) is False


def test_cancel_and_wait_stops_a_task_whose_first_cancel_was_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> tuple[set[asyncio.Future[object]], asyncio.Task[None]]:
        task = await _cancelled_as_its_reply_arrives()
        left = await cancel_and_wait([task], timeout_s=3.0, what="renewals")
        return left, task

    with caplog.at_level(logging.DEBUG, logger="facegrid.tasks"):
        left, task = asyncio.run(main())
    assert left == set()
    assert task.cancelled()
    if sys.version_info < (3, 12):
        assert "1 renewals still running after a cancellation: cancelling again" in caplog.text


def test_what_a_stopped_task_raised_is_retrieved_and_one_that_will_not_stop_is_returned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fails() -> None:
        raise RuntimeError("broken")

    async def stubborn(stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                continue  # ignores every cancellation

    async def main() -> tuple[int, bool]:
        stop = asyncio.Event()
        failed = asyncio.create_task(fails())
        held = asyncio.create_task(stubborn(stop))
        await asyncio.sleep(0)  # both have started: one ended, one sleeps
        left = await cancel_and_wait([failed, held, None], timeout_s=0.6, what="loops")
        stop.set()
        held.cancel()
        await asyncio.wait({held}, timeout=1)
        return len(left), held in left

    count, held_left = asyncio.run(main())
    assert (count, held_left) == (1, True)
    assert "1 loops did not stop within 0.6 s" in caplog.text
    assert "never retrieved" not in caplog.text
