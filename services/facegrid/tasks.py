"""Stopping asyncio tasks for sure.

On Python 3.11 one ``task.cancel()`` does not always stop a task: ``asyncio.wait_for``
returns the result instead of raising CancelledError when the awaited future finished
in the same loop iteration as the cancellation (bpo-42130, fixed in 3.12's rewrite of
``wait_for``). nats-py awaits every reply with ``wait_for``, so a task cancelled while a
NATS reply arrives carries on, and ``await task`` after a single cancel can wait
forever: a PushFrames stream whose lease renewal was cancelled that way never answered.
:func:`cancel_and_wait` cancels again until the task has ended, within a bound.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

# How long one round waits for the cancelled tasks before cancelling them again.
_ROUND_S = 0.5


async def cancel_and_wait(
    tasks: Iterable[asyncio.Future[Any] | None], timeout_s: float = 5.0, what: str = "tasks"
) -> set[asyncio.Future[Any]]:
    """Cancel ``tasks`` and wait until they have ended, cancelling again each round
    (a cancellation can be swallowed, see above), for at most ``timeout_s``. Returns
    the tasks still running then (logged; they are left to the loop). What the ended
    tasks raised is retrieved and dropped: they were being stopped."""
    pending = {task for task in tasks if task is not None}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    ended: set[asyncio.Future[Any]] = set()
    rounds = 0
    while True:
        ended |= {task for task in pending if task.done()}
        pending -= ended
        remaining = deadline - loop.time()
        if not pending or remaining <= 0:
            break
        if rounds:
            log.debug(
                "%d %s still running after a cancellation: cancelling again", len(pending), what
            )
        rounds += 1
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=min(_ROUND_S, remaining))
    for task in ended:
        if not task.cancelled():
            task.exception()
    if pending:
        log.warning("%d %s did not stop within %.1f s", len(pending), what, timeout_s)
    return pending
