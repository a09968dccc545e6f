"""facegrid.diagnostics: the stacks a service logs on SIGUSR1 (its asyncio tasks) and
writes on SIGUSR2 (its threads), for a call that hangs."""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import signal
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from facegrid import diagnostics


async def _waits_for(event: asyncio.Event) -> None:
    await event.wait()


WaitsFor = Callable[[asyncio.Event], Coroutine[Any, Any, None]]


def _stacks_while_waiting(*waiting: tuple[str | None, WaitsFor]) -> str:
    """The dump taken while a task (named, or not) for each ``waiting`` coroutine
    function waits on one event; the event is then set and the tasks end."""

    async def main() -> str:
        event = asyncio.Event()
        tasks = [asyncio.create_task(waits(event), name=name) for name, waits in waiting]
        await asyncio.sleep(0)
        try:
            return diagnostics.task_stacks(asyncio.get_running_loop())
        finally:
            event.set()
            await asyncio.gather(*tasks)

    return asyncio.run(main())


def test_the_tasks_stacks_name_each_task_and_where_it_waits() -> None:
    dump = _stacks_while_waiting(("push-gate-1", _waits_for))
    assert "--- push-gate-1: _waits_for" in dump
    assert "await event.wait()" in dump  # the line it waits on
    assert dump.startswith("2 asyncio tasks")  # main() and the waiting one


def test_sigusr1_logs_the_stacks_and_the_service_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        diagnostics.install_stack_dumps(loop)
        try:
            event = asyncio.Event()
            task = asyncio.create_task(_waits_for(event), name="stream-events")
            await asyncio.sleep(0)
            os.kill(os.getpid(), signal.SIGUSR1)
            for _ in range(50):
                await asyncio.sleep(0.01)
                if any("stream-events" in r.getMessage() for r in caplog.records):
                    break
            event.set()
            await task
        finally:
            loop.remove_signal_handler(diagnostics.TASKS_SIGNAL)

    with caplog.at_level(logging.WARNING, logger="facegrid.diagnostics"):
        asyncio.run(main())
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("stacks on SIGUSR1:") and "stream-events" in m for m in messages)


def test_before_the_loop_takes_it_sigusr1_is_ignored_not_fatal() -> None:
    previous = signal.getsignal(diagnostics.TASKS_SIGNAL)
    try:
        diagnostics.install_early()
        assert signal.getsignal(diagnostics.TASKS_SIGNAL) == signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGUSR1)  # would end this process by default
    finally:
        faulthandler.unregister(diagnostics.THREADS_SIGNAL)
        signal.signal(diagnostics.TASKS_SIGNAL, previous)


class _Servicer:
    async def PushFrames(self, event: asyncio.Event) -> None:  # noqa: N802
        await _waits_for(event)


def test_the_digest_names_each_call_and_the_line_it_waits_on() -> None:
    dump = _stacks_while_waiting((None, _Servicer().PushFrames), ("status-loop", _waits_for))
    calls = diagnostics.waiting_calls(dump)
    assert len(calls) == 1  # the call; not the background loop, nor main()
    assert calls[0].startswith("PushFrames waits in _waits_for (test_diagnostics.py:")
    assert calls[0].endswith(": await event.wait()")
