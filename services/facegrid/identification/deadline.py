"""A point in time by which a piece of work must be done.

The identification flow is called from gRPC handlers (whose deadline is the caller's)
and from the ingest pipeline (whose deadline is its own, per batch of frames), so it
takes this instead of a ``ServicerContext``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc

# Downstream calls get at least this much, so that an almost-spent deadline still
# produces DEADLINE_EXCEEDED from the callee instead of an invalid timeout.
_MIN_TIMEOUT_S = 0.001


@dataclass(frozen=True)
class Deadline:
    """``at`` is a ``time.monotonic()`` instant; None: no deadline of its own."""

    at: float | None

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    @classmethod
    def none(cls) -> Deadline:
        return cls(None)

    @classmethod
    def of(cls, context: grpc.aio.ServicerContext) -> Deadline:
        """The deadline of the call a servicer is answering."""
        remaining = context.time_remaining()
        return cls(None if remaining is None else time.monotonic() + remaining)

    def remaining(self) -> float | None:
        return None if self.at is None else self.at - time.monotonic()

    def timeout(self, cap: float) -> float:
        """The timeout of one downstream call: ``cap``, or less if the deadline is nearer."""
        remaining = self.remaining()
        timeout = cap if remaining is None else min(cap, remaining)
        return max(timeout, _MIN_TIMEOUT_S)
