"""The calls-in-flight gauge (facegrid_rpc_in_flight) that the gateway's autoscaler
follows (k8s/components/custom-metrics): up while a call runs, down however it ends."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from facegrid.errors import invalid_argument
from facegrid.server import _CallRecorder, _recorded
from prometheus_client import REGISTRY

METHOD = "/facegrid.v1.FaceService/SearchFacesByImage"


def in_flight() -> float:
    value = REGISTRY.get_sample_value(
        "facegrid_rpc_in_flight", {"service": "gateway", "method": METHOD}
    )
    return value or 0.0


class AbortError(Exception):
    """What grpc's context.abort raises (matched by name, as grpc's own)."""


class Context:
    async def abort_with_status(self, status: Any) -> None:
        raise AbortError(status)


async def served(fail: bool) -> float:
    async with _recorded(Context(), _CallRecorder("gateway", METHOD)):  # type: ignore[arg-type]
        during = in_flight()
        if fail:
            raise invalid_argument("image", "not an image")
    return during


@pytest.mark.parametrize("fail", [False, True], ids=["ok", "error"])
def test_in_flight_counts_a_call_only_while_it_runs(fail: bool) -> None:
    before = in_flight()
    if fail:
        with pytest.raises(AbortError):
            asyncio.run(served(fail))
    else:
        assert asyncio.run(served(fail)) == before + 1
    assert in_flight() == before
