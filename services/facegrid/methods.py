"""What the contract declares of each gRPC method, read from its options: the scope a
caller needs and when a call may be retried (``protos/facegrid/v1/options.proto``).

The one source of these facts: the gateway's and ingest's scope checks, the retry
policy of the channels to the internal services and the client's retries all read them
here, so that none can drift from the contract.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any, cast

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import ServiceDescriptor

from facegrid.v1 import options_pb2

_MethodOptions = descriptor_pb2.MethodOptions
NO_SIDE_EFFECTS = _MethodOptions.NO_SIDE_EFFECTS
IDEMPOTENT = _MethodOptions.IDEMPOTENT
# Protobuf's idempotency levels under which any call may be repeated.
_REPEATABLE = (IDEMPOTENT, NO_SIDE_EFFECTS)


@dataclass(frozen=True)
class MethodFacts:
    service: str  # the service's full name, e.g. facegrid.v1.FaceService
    name: str  # the method's, e.g. GetFace
    idempotency_level: int  # descriptor_pb2.MethodOptions.IdempotencyLevel
    idempotent_when: str  # a request field that makes the call idempotent, or ""
    required_scope: str  # "" for the internal services

    @property
    def always_idempotent(self) -> bool:
        return self.idempotency_level in _REPEATABLE


def service_descriptor(full_name: str) -> ServiceDescriptor:
    """A service of the contract by its full name (its ``*_pb2`` module imported)."""
    pool = descriptor_pool.Default()  # type: ignore[no-untyped-call]
    return cast(ServiceDescriptor, pool.FindServiceByName(full_name))


@cache
def of_service(full_name: str) -> dict[str, MethodFacts]:
    """Every method of a service, by method name."""
    service = service_descriptor(full_name)
    facts = {}
    for method in service.methods:
        options = method.GetOptions()
        facts[method.name] = MethodFacts(
            service=service.full_name,
            name=method.name,
            idempotency_level=options.idempotency_level,
            idempotent_when=options.Extensions[options_pb2.idempotent_when],
            required_scope=options.Extensions[options_pb2.required_scope],
        )
    return facts


def method(full_service_name: str, name: str) -> MethodFacts:
    return of_service(full_service_name)[name]


def retry_policy_names(
    full_name: str, always_sent_with: Iterable[str] = ()
) -> list[dict[str, str]]:
    """The ``name`` entries of a gRPC service config's methodConfig that select the
    service's always-idempotent methods, and those whose ``idempotent_when`` field the
    caller always sets (``always_sent_with``: the client gives every IndexFaces a
    request_id); gRPC's retry policy selects by method and cannot look at a request."""
    sent_with = set(always_sent_with)
    return [
        {"service": full_name, "method": facts.name}
        for facts in of_service(full_name).values()
        if facts.always_idempotent or (facts.idempotent_when and facts.idempotent_when in sent_with)
    ]


def service_config(retried: list[dict[str, str]], retry_policy: dict[str, Any]) -> str:
    """A channel's gRPC service config: round-robin over every address a name resolves
    to (every pod behind a headless Kubernetes Service), client-side health checking (a
    draining replica, NOT_SERVING, gets no new call) and ``retry_policy`` for the
    ``retried`` methods (:func:`retry_policy_names`)."""
    return json.dumps(
        {
            "loadBalancingConfig": [{"round_robin": {}}],
            "healthCheckConfig": {"serviceName": ""},
            "methodConfig": [{"name": retried, "retryPolicy": retry_policy}],
        }
    )
