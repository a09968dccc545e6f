"""What every page shares: the signed-in person, forms with CSRF checks, rendering,
and the answer to a refused call."""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facegrid.config import Settings
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.templating import Jinja2Templates

from facegrid_console import views
from facegrid_console.backend import Backend, CallError
from facegrid_console.oidc_sign_in import OidcSignIn
from facegrid_console.sessions import COOKIE, Session, SessionCodec

HERE = Path(__file__).parent
Handler = Callable[[Request, "Signed"], Awaitable[Response]]


@dataclass
class Console:
    settings: Settings
    backend: Backend
    sessions: SessionCodec
    templates: Jinja2Templates = field(init=False)
    # Set on SIGTERM: health answers 503 and live alert views end.
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    secure_cookies: bool = False
    # The OIDC provider's sign-in page, when console.oidc_client_id is set.
    oidc: OidcSignIn | None = None

    def __post_init__(self) -> None:
        self.templates = Jinja2Templates(directory=HERE / "templates")
        self.templates.env.filters.update(views.filters())
        self.event_streams = asyncio.Semaphore(self.settings.console.max_event_streams)

    def render(
        self,
        request: Request,
        template: str,
        context: dict[str, Any] | None = None,
        status_code: int = 200,
        signed: Signed | None = None,
    ) -> Response:
        page = {
            "signed": signed,
            "csrf": signed.csrf if signed else "",
            "path": request.url.path,
            **(context or {}),
        }
        return self.templates.TemplateResponse(request, template, page, status_code=status_code)

    def refused(self, request: Request, failure: CallError, signed: Signed | None) -> Response:
        """The page for a call the gateway or ingest refused: its status and details."""
        if failure.code.name == "UNAUTHENTICATED":
            response = self.to_sign_in(request, "Your sign-in was not accepted; sign in again.")
            response.delete_cookie(COOKIE, path="/")
            return response
        return self.render(
            request, "refused.html", {"failure": failure}, failure.http_status, signed
        )

    def to_sign_in(self, request: Request, message: str = "") -> RedirectResponse:
        query = {"next": request.url.path}
        if message:
            query["message"] = message
        return RedirectResponse("/sign-in?" + urllib.parse.urlencode(query), status_code=303)


@dataclass(frozen=True)
class Signed:
    """The person behind a request: their session and the CSRF token of their forms."""

    session: Session
    cookie: str
    csrf: str

    @property
    def token(self) -> str:
        return self.session.token


def signed_in(console: Console, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """``handler`` for signed-in people only (others are sent to sign in); a POST must
    carry the form's CSRF token; a refused call shows the refusal page."""

    async def endpoint(request: Request) -> Response:
        cookie = request.cookies.get(COOKIE)
        session = console.sessions.open(cookie)
        if session is None or cookie is None:
            return console.to_sign_in(request)
        signed = Signed(session, cookie, console.sessions.csrf_token(cookie))
        try:
            return await handler(request, signed)
        except CallError as failure:
            return console.refused(request, failure, signed)

    return endpoint


async def checked_form(console: Console, request: Request, signed: Signed) -> FormData:
    """The POSTed form, once its size and CSRF token are checked (413, 403 otherwise)."""
    length = request.headers.get("content-length")
    limit = console.settings.console.max_upload_bytes
    if length is None or not length.isdigit():
        raise HTTPException(411, "A form must say its length.")
    if int(length) > limit:
        raise HTTPException(413, f"The form is larger than {limit:,} bytes.")
    form = await request.form(max_files=1, max_fields=50, max_part_size=limit)
    require_csrf(
        console, signed.cookie, form, "The form is out of date or not from this console: reload it."
    )
    return form


def require_csrf(console: Console, cookie: str | None, form: FormData, refusal: str) -> None:
    """403 with ``refusal`` unless the form's CSRF token belongs to ``cookie``."""
    if not console.sessions.csrf_valid(cookie, text(form, "csrf") or None):
        raise HTTPException(403, refusal)


def text(form: FormData, name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


async def upload(form: FormData, name: str) -> bytes:
    value = form.get(name)
    if value is None or isinstance(value, str):
        return b""
    return await value.read()
