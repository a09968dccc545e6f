"""A failed gRPC call as a few plain lines for a person: the status code, the message
and the ``google.rpc`` details (field violations, reasons, preconditions, quotas), never
a traceback. Shared by the command-line client and the examiner console."""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


def status_code(error: grpc.RpcError) -> grpc.StatusCode | None:
    """The status code of a failed call (None for an error that carries none)."""
    return _code(error)


def _code(error: grpc.RpcError) -> grpc.StatusCode | None:
    code = getattr(error, "code", None)
    return code() if callable(code) else None


def describe_rpc_error(error: grpc.RpcError) -> list[str]:
    """A failed call as short lines: code and message, then one line per detail."""
    code = _code(error)
    details = getattr(error, "details", None)
    message = details() if callable(details) else str(error)
    lines = [f"{code.name if code is not None else 'ERROR'}: {message or '(no message)'}"]
    try:
        status = rpc_status.from_call(error)
    except (ValueError, AttributeError, TypeError):
        status = None
    if status is None:
        return lines
    for packed in status.details:
        lines.extend(_detail_lines(packed))
    return lines


def short_rpc_error(error: grpc.RpcError) -> str:
    """A failed call on one line, for a summary: details the message repeats are left out."""
    head, *details = describe_rpc_error(error)
    extra = []
    for line in (d.strip() for d in details):
        if line.startswith("field "):
            field, _, description = line.removeprefix("field ").partition(": ")
            if f"{field}: {description}" in head:
                continue
        extra.append(line)
    return "; ".join([head, *extra])


def _detail_lines(packed: Any) -> list[str]:
    """One line per field violation, reason, quota or precondition in a status detail."""
    if packed.Is(error_details_pb2.BadRequest.DESCRIPTOR):
        bad_request = error_details_pb2.BadRequest()
        packed.Unpack(bad_request)
        return [f"  field {v.field}: {v.description}" for v in bad_request.field_violations]
    if packed.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
        info = error_details_pb2.ErrorInfo()
        packed.Unpack(info)
        extra = "".join(f", {k}={v}" for k, v in sorted(info.metadata.items()))
        return [f"  reason: {info.reason} ({info.domain}{extra})"]
    if packed.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
        failure = error_details_pb2.PreconditionFailure()
        packed.Unpack(failure)
        return [f"  precondition {v.type} {v.subject}: {v.description}" for v in failure.violations]
    if packed.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
        quota = error_details_pb2.QuotaFailure()
        packed.Unpack(quota)
        return [f"  limit {v.subject}: {v.description}" for v in quota.violations]
    if packed.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
        retry = error_details_pb2.RetryInfo()
        packed.Unpack(retry)
        return [f"  retry after {retry.retry_delay.ToMilliseconds() / 1000:.1f} s"]
    if packed.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
        resource = error_details_pb2.ResourceInfo()
        packed.Unpack(resource)
        return [f"  resource {resource.resource_type} {resource.resource_name}"]
    return []
