"""What a running service is doing, on request: ``kill -USR1 <pid>`` logs the stack of
every asyncio task (where each call handler, stream and background loop is waiting);
``kill -USR2 <pid>`` writes every thread's stack to stderr from the interpreter's own
signal handler (faulthandler), which works even while the event loop is blocked.

Neither stops or slows the service; both are for an operator (or a test) facing a call
that hangs.
"""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import io
import linecache
import logging
import re
import signal
import sys
import sysconfig
from types import FrameType

log = logging.getLogger(__name__)

TASKS_SIGNAL = signal.SIGUSR1
THREADS_SIGNAL = signal.SIGUSR2
# A dump of thousands of tasks (one per open stream) stays readable.
_MAX_TASKS = 200
_MAX_FRAMES = 30
_STDLIB = sysconfig.get_paths()["stdlib"] + "/"
_HEALTH = "grpc.health.v1.Health/"


def task_stacks(loop: asyncio.AbstractEventLoop) -> str:
    """Every pending task of ``loop``: its name, its coroutine and where it waits."""
    tasks = sorted(asyncio.all_tasks(loop), key=lambda task: task.get_name())
    out = io.StringIO()
    out.write(f"{len(tasks)} asyncio tasks\n")
    for task in tasks[:_MAX_TASKS]:
        coroutine = task.get_coro()
        name = getattr(coroutine, "__qualname__", repr(coroutine))
        out.write(f"--- {task.get_name()}: {name}\n")
        for frame in _awaiting(coroutine):
            code, line = frame.f_code, frame.f_lineno  # None in compiled (Cython) frames
            out.write(f'  File "{code.co_filename}", line {line}, in {code.co_name}\n')
            source = linecache.getline(code.co_filename, line) if line else ""
            if source.strip():
                out.write(f"    {source.strip()}\n")
    if len(tasks) > _MAX_TASKS:
        out.write(f"... and {len(tasks) - _MAX_TASKS} more\n")
    return out.getvalue()


def waiting_calls(dump: str) -> list[str]:
    """From a :func:`task_stacks` dump, one line per task serving a call (a frame in a
    method named like an RPC, ``PushFrames``): the call and the innermost line outside
    the standard library it waits on. What a report of a hung call shows first."""
    lines: list[str] = []
    for block in dump.split("\n--- ")[1:]:
        frames = re.findall(r'File "([^"]*)", line (\d+), in (\w+)\n(?:    (.*))?', block)
        methods = [name for _, _, name, _ in frames if name[:1].isupper()]
        if not methods or _HEALTH in block:  # health watches: the clients' own checks
            continue
        outside = [frame for frame in frames if not frame[0].startswith(_STDLIB)]
        path, line, name, source = (outside or frames)[-1]
        where = f"{name} ({path.rsplit('/', 1)[-1]}:{line})"
        lines.append(f"{methods[0]} waits in {where}: {source.strip()}")
    return lines


def _awaiting(coroutine: object) -> list[FrameType]:
    """The frames of a coroutine and of what it awaits, down to the innermost: a task's
    own stack (Task.get_stack) stops at its outermost coroutine, which for a gRPC call
    is the server's (Cython), not the method's."""
    frames: list[FrameType] = []
    current: object = coroutine
    while current is not None and len(frames) < _MAX_FRAMES:
        frame = _first_attribute(current, ("cr_frame", "ag_frame", "gi_frame"))
        if isinstance(frame, FrameType):
            frames.append(frame)
        awaited = _first_attribute(current, ("cr_await", "ag_await", "gi_yieldfrom"))
        if awaited is not None and type(awaited).__name__ == "coroutine_wrapper":
            # What Cython code awaits a Python coroutine through (its __await__): the
            # wrapper shows no attribute, but holds the coroutine itself.
            awaited = next((r for r in gc.get_referents(awaited) if hasattr(r, "cr_await")), None)
        current = awaited
    return frames


def _first_attribute(value: object, names: tuple[str, ...]) -> object:
    return next((getattr(value, name) for name in names if hasattr(value, name)), None)


def install_early() -> None:
    """At a service's start, before its event loop runs: SIGUSR2 already dumps the
    threads, and SIGUSR1 is ignored until :func:`install_stack_dumps` takes it (its
    default action would end the process)."""
    signal.signal(TASKS_SIGNAL, signal.SIG_IGN)
    faulthandler.register(THREADS_SIGNAL, file=sys.stderr, all_threads=True)


def install_stack_dumps(loop: asyncio.AbstractEventLoop) -> None:
    """SIGUSR1, once the service's loop runs: log the tasks' stacks (SIGUSR2 is
    :func:`install_early`'s, from the process's start)."""
    loop.add_signal_handler(
        TASKS_SIGNAL, lambda: log.warning("stacks on SIGUSR1:\n%s", task_stacks(loop))
    )
