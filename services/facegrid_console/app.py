"""The examiner console's web server: `facegrid serve console`.

Server-rendered pages (Starlette, Jinja2 templates, uvicorn); forms work without
JavaScript, and the two small scripts it serves itself (a photo dropped on the search
form, alerts appearing live) only add to them. HTTPS with ``tls.cert_file`` and
``tls.key_file`` (the gateway's public certificate); without them, plaintext on a
loopback address only, as for every facegrid server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import uvicorn
from facegrid import diagnostics, tls
from facegrid.config import Settings
from facegrid.metrics import CONSOLE_LATENCY, CONSOLE_REQUESTS
from facegrid.telemetry import span
from facegrid.v1 import face_service_pb2
from opentelemetry import trace
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from facegrid_console import alerts, audit, gallery, search
from facegrid_console.backend import Backend, CallError
from facegrid_console.oidc_sign_in import STATE_COOKIE, STATE_TTL_S, OidcSignIn, SignInError
from facegrid_console.sessions import COOKIE, Session, SessionCodec, token_label
from facegrid_console.web import HERE, Console, require_csrf, text

F = face_service_pb2

log = logging.getLogger(__name__)

PRE_COOKIE = "facegrid_sign_in"
# Pages hold personal data: never cached, never framed, scripts and images only from here.
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        b"form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]


class SecurityHeaders:
    def __init__(self, app: ASGIApp, https: bool) -> None:
        self.app = app
        self.headers = list(SECURITY_HEADERS)
        if https:
            self.headers.append((b"strict-transport-security", b"max-age=31536000"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], *self.headers]
            await send(message)

        await self.app(scope, receive, with_headers)


class PageTelemetry:
    """A span per request (the calls it makes to the gateway and ingest are its
    children) and the request metrics, labelled by page: the path's first segment,
    never an id from it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        page = page_label(scope["path"])
        method = scope["method"]
        status = {"code": 500}
        started = time.perf_counter()

        async def recorded(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            with span(f"console {method} {page}", trace.SpanKind.SERVER, page=page):
                await self.app(scope, receive, recorded)
        finally:
            CONSOLE_REQUESTS.labels(page, method, str(status["code"])).inc()
            CONSOLE_LATENCY.labels(page, method).observe(time.perf_counter() - started)


def page_label(path: str) -> str:
    first = path.strip("/").split("/", 1)[0]
    return "/" + first if first in _PAGES else "other"


_PAGES = {"", "search", "reviews", "alerts", "collections", "audit", "sign-in", "sign-out",
          "healthz", "static"}  # fmt: skip


def build_app(console: Console) -> Starlette:
    async def health(request: Request) -> Response:
        if console.stopping.is_set():
            return PlainTextResponse("stopping", status_code=503)
        return PlainTextResponse("ok")

    async def home(request: Request) -> Response:
        return RedirectResponse("/search", status_code=303)

    async def sign_in_page(request: Request) -> Response:
        nonce = secrets.token_urlsafe(24)
        response = console.render(
            request,
            "sign_in.html",
            {
                "csrf": console.sessions.csrf_token(nonce),
                "next": _local_path(request.query_params.get("next", "")),
                "message": request.query_params.get("message", ""),
                "oidc": console.oidc is not None,
            },
        )
        _set_cookie(response, PRE_COOKIE, nonce, console, max_age=3600)
        return response

    async def sign_in(request: Request) -> Response:
        form = await request.form(max_files=0, max_fields=5)
        require_csrf(
            console,
            request.cookies.get(PRE_COOKIE),
            form,
            "The sign-in form is out of date: reload it.",
        )
        token = text(form, "token")
        next_path = _local_path(text(form, "next"))
        problem = await _token_refused(console, token)
        if problem:
            response = console.render(
                request,
                "sign_in.html",
                {
                    "csrf": text(form, "csrf"),
                    "next": next_path,
                    "message": problem,
                    "oidc": console.oidc is not None,
                },
                status_code=401,
            )
            return response
        response = RedirectResponse(next_path or "/search", status_code=303)
        _start_session(response, console, token)
        response.delete_cookie(PRE_COOKIE, path="/")
        return response

    async def oidc_start(request: Request) -> Response:
        if console.oidc is None:
            raise HTTPException(404, "Sign-in through an OIDC provider is not configured.")
        next_path = _local_path(request.query_params.get("next", ""))
        try:
            started = await console.oidc.start(str(request.base_url), next_path)
        except SignInError as error:
            return _sign_in_again(request, str(error))
        response = RedirectResponse(started.location, status_code=303)
        # Lax, not Strict: the provider sends the browser back from its own site.
        response.set_cookie(
            STATE_COOKIE,
            started.state_cookie,
            max_age=STATE_TTL_S,
            path="/sign-in/oidc",
            httponly=True,
            secure=console.secure_cookies,
            samesite="lax",
        )
        return response

    async def oidc_callback(request: Request) -> Response:
        if console.oidc is None:
            raise HTTPException(404, "Sign-in through an OIDC provider is not configured.")
        try:
            token, next_path = await console.oidc.finish(
                dict(request.query_params), request.cookies.get(STATE_COOKIE)
            )
        except SignInError as error:
            return _sign_in_again(request, str(error))
        problem = await _token_refused(console, token)
        if problem:
            return _sign_in_again(request, problem)
        # A page, not a redirect: the browser arrived from the provider's site, and a
        # SameSite=Strict cookie is sent only once it moves on from a page of ours.
        response = console.render(
            request, "signed_in.html", {"next": _local_path(next_path) or "/search"}
        )
        _start_session(response, console, token)
        response.delete_cookie(STATE_COOKIE, path="/sign-in/oidc")
        return response

    def _sign_in_again(request: Request, message: str) -> Response:
        return RedirectResponse(
            "/sign-in?" + urllib.parse.urlencode({"message": message}), status_code=303
        )

    async def sign_out(request: Request) -> Response:
        form = await request.form(max_files=0, max_fields=5)
        require_csrf(
            console, request.cookies.get(COOKIE), form, "The form is out of date: reload it."
        )
        response = RedirectResponse("/sign-in?message=Signed+out.", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    async def problem(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        detail = exc.detail if isinstance(exc, HTTPException) else "Something went wrong."
        return console.render(
            request, "problem.html", {"status": status, "detail": detail}, status_code=status
        )

    routes: list[BaseRoute] = [
        Route("/healthz", health),
        Route("/", home),
        Route("/sign-in", sign_in_page, methods=["GET"]),
        Route("/sign-in", sign_in, methods=["POST"]),
        Route("/sign-out", sign_out, methods=["POST"]),
        Route("/sign-in/oidc", oidc_start, methods=["GET"]),
        Route("/sign-in/oidc/callback", oidc_callback, methods=["GET"]),
        *search.routes(console),
        *alerts.routes(console),
        *gallery.routes(console),
        *audit.routes(console),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: problem})


def _local_path(value: str) -> str:
    """A path on this console to go back to after sign-in, never another site's URL."""
    parts = urllib.parse.urlsplit(value)
    if parts.scheme or parts.netloc or not value.startswith("/") or value.startswith("//"):
        return ""
    return value


def _set_cookie(response: Response, name: str, value: str, console: Console, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/",
        httponly=True,
        secure=console.secure_cookies,
        samesite="strict",
    )


def _start_session(response: Response, console: Console, token: str) -> None:
    sealed = console.sessions.seal(Session(token, token_label(token)))
    _set_cookie(response, COOKIE, sealed, console, max_age=int(console.sessions.ttl_s))


async def _token_refused(console: Console, token: str) -> str:
    """Why the gateway does not accept ``token``; "" if it does. The console checks
    nothing itself: a token that lacks a scope is accepted here and refused by the
    gateway on the pages that need it."""
    if not token:
        return "Paste your access token."
    try:
        await console.backend.face("ListCollections", F.ListCollectionsRequest(page_size=1), token)
    except CallError as failure:
        if failure.code.name == "UNAUTHENTICATED":
            return "The gateway did not accept this token."
        if failure.code.name in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
            return "The gateway cannot be reached just now: " + failure.lines[0]
    return ""


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: serve() below drains first."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(settings: Settings) -> None:
    console_settings = settings.console
    https = bool(settings.tls.cert_file and settings.tls.key_file)
    if not https:
        tls.check_plaintext_allowed("console", settings.server.host)
    backend = Backend(settings)
    sessions = SessionCodec.from_key_file(
        console_settings.session_key_file, console_settings.session_ttl_s
    )
    oidc = OidcSignIn(settings, sessions) if console_settings.oidc_client_id else None
    console = Console(settings, backend, sessions, secure_cookies=https, oidc=oidc)
    app = PageTelemetry(SecurityHeaders(build_app(console), https))
    ssl: dict[str, Any] = (
        {"ssl_certfile": settings.tls.cert_file, "ssl_keyfile": settings.tls.key_file}
        if https
        else {}
    )
    config = uvicorn.Config(
        app,
        host=settings.server.host,
        port=console_settings.port,
        loop="asyncio",
        http="h11",
        lifespan="off",
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,
        timeout_graceful_shutdown=int(settings.server.grace_period_s),
        # More connections at once are answered 503 (a bounded server).
        limit_concurrency=console_settings.max_connections,
        **ssl,
    )
    server = _Server(config)
    loop = asyncio.get_running_loop()

    async def drain_then_stop() -> None:
        console.stopping.set()  # health 503; live alert views end
        await asyncio.sleep(settings.server.drain_s)
        server.should_exit = True

    draining: list[asyncio.Task[None]] = []

    def on_signal() -> None:
        if draining:
            server.force_exit = True  # a second signal: stop now
        else:
            draining.append(asyncio.ensure_future(drain_then_stop()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    diagnostics.install_stack_dumps(loop)
    scheme = "https" if https else "http"
    log.info("console serving on %s://%s:%d", scheme, settings.server.host, console_settings.port)
    try:
        await server.serve()
    finally:
        await backend.close()
    log.info("console stopped")
