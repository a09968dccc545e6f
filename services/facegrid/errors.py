"""gRPC errors with google.rpc details, in one place.

Services raise :class:`ServiceError` (or a subclass) anywhere below the servicer; the
server interceptor in :mod:`facegrid.server` turns it into a gRPC status whose
details carry ``google.rpc.BadRequest`` field violations, ``ErrorInfo`` or
``QuotaFailure``, so clients can tell exactly what was wrong.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

ERROR_DOMAIN = "facegrid.dev"


class ServiceError(Exception):
    """An error that maps to one gRPC status code with rich details."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        details: Iterable[Message] = (),
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = list(details)

    def to_status(self) -> status_pb2.Status:
        packed = []
        for detail in self.details:
            if isinstance(detail, any_pb2.Any):
                packed.append(detail)  # a detail relayed from another service as it came
                continue
            holder = any_pb2.Any()
            holder.Pack(detail)
            packed.append(holder)
        return status_pb2.Status(
            code=_grpc_to_rpc_code(self.code), message=self.message, details=packed
        )


def invalid_argument(
    field: str, description: str, reason: str = "", metadata: Mapping[str, str] | None = None
) -> ServiceError:
    """INVALID_ARGUMENT with one BadRequest field violation (and ErrorInfo if a reason)."""
    return invalid_arguments([(field, description)], reason=reason, metadata=metadata)


def invalid_arguments(
    violations: Iterable[tuple[str, str]],
    reason: str = "",
    metadata: Mapping[str, str] | None = None,
) -> ServiceError:
    pairs = list(violations)
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in pairs
        ]
    )
    details: list[Message] = [bad_request]
    if reason:
        details.append(
            error_details_pb2.ErrorInfo(
                reason=reason, domain=ERROR_DOMAIN, metadata=dict(metadata or {})
            )
        )
    message = "; ".join(f"{f}: {d}" for f, d in pairs)
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message, details)


def resource_exhausted(subject: str, description: str, reason: str) -> ServiceError:
    """RESOURCE_EXHAUSTED: a limit (size, queue, concurrency) was reached."""
    quota = error_details_pb2.QuotaFailure(
        violations=[
            error_details_pb2.QuotaFailure.Violation(subject=subject, description=description)
        ]
    )
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN)
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, description, [quota, info])


def unavailable(description: str, reason: str, retry_after_ms: int = 0) -> ServiceError:
    details: list[Message] = [error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN)]
    if retry_after_ms:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromMilliseconds(retry_after_ms)
        details.append(retry)
    return ServiceError(grpc.StatusCode.UNAVAILABLE, description, details)


def permission_denied(field: str, description: str, reason: str) -> ServiceError:
    """PERMISSION_DENIED by the administrator's policy (not a missing scope), naming the
    request field and a machine-readable reason; ``field`` goes into ErrorInfo metadata."""
    info = error_details_pb2.ErrorInfo(
        reason=reason.upper(), domain=ERROR_DOMAIN, metadata={"field": field}
    )
    return ServiceError(grpc.StatusCode.PERMISSION_DENIED, description, [info])


def out_of_range(field: str, description: str) -> ServiceError:
    violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
    return ServiceError(
        grpc.StatusCode.OUT_OF_RANGE,
        description,
        [error_details_pb2.BadRequest(field_violations=[violation])],
    )


def deadline_exceeded(description: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, description)


def internal(description: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INTERNAL, description)


def _grpc_to_rpc_code(code: grpc.StatusCode) -> int:
    # grpc.StatusCode values are (int, name) tuples; the ints equal google.rpc.Code.
    value = int(code.value[0])
    return value if value in code_pb2.Code.values() else code_pb2.UNKNOWN


def not_found(resource_type: str, name: str) -> ServiceError:
    """NOT_FOUND with google.rpc.ResourceInfo naming what is missing."""
    info = error_details_pb2.ResourceInfo(
        resource_type=resource_type, resource_name=name, description="not found"
    )
    return ServiceError(grpc.StatusCode.NOT_FOUND, f"{name} not found", [info])


def already_exists(resource_type: str, name: str) -> ServiceError:
    info = error_details_pb2.ResourceInfo(
        resource_type=resource_type, resource_name=name, description="already exists"
    )
    return ServiceError(grpc.StatusCode.ALREADY_EXISTS, f"{name} already exists", [info])


def failed_precondition(kind: str, subject: str, description: str) -> ServiceError:
    """FAILED_PRECONDITION with a google.rpc.PreconditionFailure violation."""
    failure = error_details_pb2.PreconditionFailure(
        violations=[
            error_details_pb2.PreconditionFailure.Violation(
                type=kind, subject=subject, description=description
            )
        ]
    )
    return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, description, [failure])


STATUS_DETAILS_KEY = "grpc-status-details-bin"


def relay(error: grpc.aio.AioRpcError, renames: Mapping[str, str] | None = None) -> ServiceError:
    """A downstream service's error as this service's, with its rich details.

    ``renames`` maps the downstream request's field names onto the caller's, so that a
    field violation names a field of the request the caller actually sent.
    """
    code = error.code()
    message = error.details() or code.name
    details: list[Message] = []
    for key, value in error.trailing_metadata() or ():
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        message = status.message or message
        for detail in status.details:
            if renames and detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                for violation in bad_request.field_violations:
                    violation.field = _rename(violation.field, renames)
                details.append(bad_request)
            else:
                details.append(detail)
    if renames:
        for old, new in renames.items():
            message = message.replace(f"{old}:", f"{new}:")
    return ServiceError(code, message, details)


def _rename(field: str, renames: Mapping[str, str]) -> str:
    head, dot, rest = field.partition(".")
    bracket = head.find("[")
    root = head if bracket < 0 else head[:bracket]
    if root not in renames:
        return field
    return renames[root] + head[len(root) :] + dot + rest
