"""Authentication, scopes and audit around every public call (gateway and ingest).

What each public method needs is the contract's (:mod:`facegrid.methods`): its scope
(the ``required_scope`` option), and an audit record unless the method has no side
effects (``idempotency_level = NO_SIDE_EFFECTS``: reads of the gallery). The wrapper
authenticates the bearer token (UNAUTHENTICATED), checks the scope
(PERMISSION_DENIED), runs the method with an :class:`AuditDraft` to fill in, and for
audited methods writes the record, success or failure, before anything is returned.
If the record cannot be written the call fails with UNAVAILABLE and returns nothing.
A request's ``request_id`` goes into its record, so that a retry answered the same as an
earlier successful attempt is given that attempt's record instead of a second one.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import grpc
from google.protobuf import timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.rpc import error_details_pb2

from facegrid import methods, telemetry, validation
from facegrid.audit_log import AuditLog
from facegrid.auth import AUTHORIZATION_HEADER, BEARER_PREFIX, Credentials, Principal
from facegrid.authenticator import Authenticator
from facegrid.errors import ServiceError, internal, permission_denied, unavailable
from facegrid.metrics import AUDIT_RECORDS
from facegrid.quotas import Quotas
from facegrid.v1 import common_pb2, face_service_pb2

log = logging.getLogger(__name__)

Purpose = common_pb2.IdentificationContext.Purpose
Request = TypeVar("Request")
Response = TypeVar("Response")


class AuditDraft:
    """What a method tells the audit log about its call; the wrapper adds the rest."""

    def __init__(self, record: face_service_pb2.AuditRecord) -> None:
        self.record = record
        self.principal = Principal("", frozenset())  # the caller, once authenticated
        self.scopes: frozenset[str] = frozenset()  # the caller's, once authenticated
        self.purposes: frozenset[str] = frozenset()  # those it may use; empty: any

    def context(self, context: common_pb2.IdentificationContext) -> None:
        self.record.context.CopyFrom(context)

    def collection(self, name: str) -> None:
        self.record.collection = name
        telemetry.annotate(collection=name)

    def target(self, name: str) -> None:
        self.record.target = name

    def review(self, decision: face_service_pb2.ReviewDecision) -> None:
        """An examiner's decision on a candidate: the record of CreateReviewDecision."""
        self.record.review_decision.CopyFrom(decision)

    def images(self, *images: bytes) -> None:
        self.record.image_digests.extend(hashlib.sha256(i).digest() for i in images)

    def threshold(self, threshold: common_pb2.MatchThreshold) -> None:
        self.record.threshold.CopyFrom(threshold)

    def model_version(self, version: str) -> None:
        self.record.model_version = version
        telemetry.annotate(model_version=version)

    def results(
        self,
        names: Iterable[str],
        similarities: Iterable[float] = (),
        false_match_rates: Iterable[float] = (),
        count: int | None = None,
    ) -> None:
        """What was returned: resource names, and for matches their similarity and the
        false match rate measured at it, in the order returned."""
        self.record.result_resources.extend(names)
        self.record.result_count = len(self.record.result_resources) if count is None else count
        scores = list(similarities)
        self.record.result_similarities.extend(scores)
        self.record.result_false_match_rates.extend(false_match_rates)
        telemetry.annotate(result_count=self.record.result_count)
        if scores:
            self.record.top_similarity = max(scores)
            telemetry.annotate(top_similarity=self.record.top_similarity)


Method = Callable[[Any, Any, grpc.aio.ServicerContext, AuditDraft], Awaitable[Any]]


class Gatekeeper:
    """Authenticates callers, checks scopes and writes audit records."""

    def __init__(
        self,
        callers: Authenticator | Credentials,
        audit_log: AuditLog,
        service_name: str,
        quotas: Quotas | None = None,
    ) -> None:
        self.quotas = quotas
        self.authenticator = (
            callers if isinstance(callers, Authenticator) else Authenticator(callers)
        )
        self.audit_log = audit_log
        self.service_name = service_name  # e.g. facegrid.v1.FaceService, for record methods
        self._methods = methods.of_service(service_name)
        unscoped = sorted(name for name, facts in self._methods.items() if not facts.required_scope)
        if unscoped:
            raise ValueError(f"{service_name}: no required_scope option on {unscoped}")

    def scope(self, method_name: str) -> str:
        """The scope a caller needs for one of the service's methods."""
        return self._methods[method_name].required_scope

    def audited(self, method_name: str) -> bool:
        """Whether a call of the method is audited: unless it has no side effects."""
        return self._methods[method_name].idempotency_level != methods.NO_SIDE_EFFECTS

    async def authenticate(self, context: grpc.aio.ServicerContext) -> Principal:
        for key, value in context.invocation_metadata() or ():
            if key == AUTHORIZATION_HEADER and isinstance(value, str):
                if value.startswith(BEARER_PREFIX):
                    token = value[len(BEARER_PREFIX) :]
                    principal = await self.authenticator.authenticate(token)
                    if principal is not None:
                        return principal
                break
        raise ServiceError(
            grpc.StatusCode.UNAUTHENTICATED,
            "missing or invalid credentials: send 'authorization: Bearer <token>'",
            [error_details_pb2.ErrorInfo(reason="UNAUTHENTICATED", domain="facegrid.dev")],
        )

    async def _draft(self, method_name: str, context: grpc.aio.ServicerContext) -> AuditDraft:
        """Authenticate the caller; the audit record of this call, to fill in."""
        received = timestamp_pb2.Timestamp()
        received.GetCurrentTime()
        principal = await self.authenticate(context)
        draft = AuditDraft(
            face_service_pb2.AuditRecord(
                create_time=received,
                principal=principal.name,
                method=f"/{self.service_name}/{method_name}",
                client_address=context.peer() or "",
                trace_id=telemetry.current_trace_id(),
            )
        )
        draft.principal = principal
        draft.scopes = principal.scopes
        draft.purposes = principal.purposes
        return draft

    @staticmethod
    def _check_scope(draft: AuditDraft, method_name: str, scope: str) -> None:
        if scope not in draft.scopes:
            raise ServiceError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method_name} needs the scope {scope!r}",
                [
                    error_details_pb2.ErrorInfo(
                        reason="MISSING_SCOPE",
                        domain="facegrid.dev",
                        metadata={"scope": scope},
                    )
                ],
            )

    @staticmethod
    def check_purpose(draft: AuditDraft, context: common_pb2.IdentificationContext | None) -> None:
        """An identification call's purpose (its request's, a stream processor's one
        level down, or a reviewed call's) must be one the caller is allowed."""
        if not draft.purposes or context is None:
            return
        purpose = context.purpose
        if purpose not in Purpose.values() or purpose == Purpose.PURPOSE_UNSPECIFIED:
            return  # the method's own validation says what is wrong with it
        if Purpose.Name(purpose) not in draft.purposes:
            raise permission_denied(
                "context.purpose",
                f"{draft.record.principal} may not identify for {Purpose.Name(purpose)}; "
                f"allowed: {', '.join(sorted(draft.purposes))}",
                "PURPOSE_NOT_ALLOWED",
            )

    async def admit(self, method_name: str, context: grpc.aio.ServicerContext) -> AuditDraft:
        """For streaming methods, which cannot be wrapped by :func:`guarded`: authenticate
        and check the scope (a refusal is audited); the caller fills in the draft and
        writes it with :meth:`write` before it streams anything."""
        draft = await self._draft(method_name, context)
        try:
            self._check_scope(draft, method_name, self.scope(method_name))
        except ServiceError as error:
            await self._write(draft, error.code)
            raise
        return draft

    async def write(
        self, draft: AuditDraft, code: grpc.StatusCode = grpc.StatusCode.OK
    ) -> face_service_pb2.AuditRecord:
        return await self._write(draft, code)

    async def run(
        self,
        method_name: str,
        method: Method,
        servicer: Any,
        request: Any,
        context: grpc.aio.ServicerContext,
    ) -> Any:
        audited = self.audited(method_name)
        draft = await self._draft(method_name, context)
        try:
            self._check_scope(draft, method_name, self.scope(method_name))
            given = _identification_context(request)
            if given is not None:
                draft.context(given)  # on the record even if refused before the method
            self.check_purpose(draft, given)
            if self.quotas is not None:
                await self.quotas.take(draft.principal, method_name)
            if audited:
                draft.record.request_id = _request_id(request)
            response = await method(servicer, request, context, draft)
        except ServiceError as error:
            if audited:
                await self._write(draft, error.code)
            raise
        except asyncio.CancelledError:
            # The caller's deadline ran out (or it went away): still on the record.
            if audited:
                await self._write(draft, grpc.StatusCode.DEADLINE_EXCEEDED)
            raise
        except Exception:
            if audited:
                await self._write(draft, grpc.StatusCode.INTERNAL)
            log.exception("unhandled error in %s", method_name)
            raise internal(f"internal error in {method_name}") from None
        if audited:
            # A retry of a call already on record gets that record (see AuditLog.append).
            stored = await self._write(draft, grpc.StatusCode.OK)
            field = response.DESCRIPTOR.fields_by_name.get("audit_record")
            if field is not None and field.type == FieldDescriptor.TYPE_STRING:
                response.audit_record = stored.name  # identification responses name their record
        return response

    async def _write(
        self, draft: AuditDraft, code: grpc.StatusCode
    ) -> face_service_pb2.AuditRecord:
        draft.record.status_code = int(code.value[0])
        try:
            stored = await self.audit_log.append(draft.record)
            if stored.create_time == draft.record.create_time:  # else an earlier attempt's
                AUDIT_RECORDS.labels(draft.record.method, code.name).inc()
            return stored
        except Exception as exc:
            log.exception("the audit record could not be written")
            raise unavailable(
                "the audit record could not be written; no results are returned",
                "AUDIT_UNAVAILABLE",
            ) from exc


def _identification_context(request: Any) -> common_pb2.IdentificationContext | None:
    """The request's ``context``, or that of a message it holds (a StreamProcessor's)."""
    for message in (request, *(v for f, v in request.ListFields() if f.message_type)):
        if not hasattr(message, "DESCRIPTOR"):
            continue  # a repeated or map field
        field = message.DESCRIPTOR.fields_by_name.get("context")
        if field is not None and field.message_type is common_pb2.IdentificationContext.DESCRIPTOR:
            return message.context  # type: ignore[no-any-return]
    return None


def _request_id(request: Any) -> str:
    """The request's AIP-155 request_id, canonical; empty if it has none."""
    if "request_id" not in request.DESCRIPTOR.fields_by_name or not request.request_id:
        return ""
    return str(validation.request_id(request.request_id))


def guarded(method: Method) -> Callable[..., Awaitable[Any]]:
    """Wrap a servicer method: authentication, its scope, its audit record (see above)."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        gatekeeper: Gatekeeper = self.gatekeeper
        return await gatekeeper.run(method.__name__, method, self, request, context)

    return wrapper
