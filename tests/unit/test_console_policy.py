"""The console's own policy, in process: sealed sessions, CSRF, upload limits, where a
sign-in may send the browser back to, and the headers on every page. The console is
served by uvicorn on a free port; its gateway address leads nowhere (no call succeeds),
which is enough here: the real system is behind it in tests/e2e/test_console.py."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import threading
import time
import urllib.parse
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import uvicorn
from cryptography.fernet import Fernet
from facegrid.config import load_settings
from facegrid.v1 import ingest_pb2
from facegrid_console import alerts
from facegrid_console.app import SecurityHeaders, _local_path, build_app, page_label
from facegrid_console.backend import Backend, CallError
from facegrid_console.oidc_sign_in import OidcSignIn, SignInError
from facegrid_console.sessions import COOKIE, Session, SessionCodec, token_label
from facegrid_console.web import Console, Signed
from facegrid_harness.processes import free_port
from oidc_provider import OidcProvider


def test_a_session_is_sealed_and_opens_only_unaltered_and_in_time(tmp_path: Path) -> None:
    key_file = tmp_path / "session.key"
    codec = SessionCodec.from_key_file(key_file, ttl_s=60)
    assert key_file.stat().st_mode & 0o777 == 0o600
    sealed = codec.seal(Session("fgt_secret-token", "token …oken"))
    assert "fgt_secret-token" not in sealed
    assert codec.open(sealed) == Session("fgt_secret-token", "token …oken")
    assert codec.open(sealed[:-4] + "AAAA") is None  # altered
    assert codec.open("") is None
    assert codec.open(None) is None
    other = SessionCodec.from_key_file(tmp_path / "other.key", ttl_s=60)
    assert other.open(sealed) is None  # another key: another console
    old = codec._fernet.encrypt_at_time(
        json.dumps({"token": "t", "label": "l"}).encode(), int(time.time()) - 120
    )
    assert codec.open(old.decode()) is None  # past the TTL
    # The same key file: the same sessions (what replicas behind one address need).
    assert SessionCodec.from_key_file(key_file, ttl_s=60).open(sealed) is not None


def test_csrf_tokens_belong_to_their_session(tmp_path: Path) -> None:
    codec = SessionCodec.from_key_file(tmp_path / "k", ttl_s=60)
    one, two = codec.seal(Session("a", "a")), codec.seal(Session("b", "b"))
    assert codec.csrf_valid(one, codec.csrf_token(one))
    assert not codec.csrf_valid(one, codec.csrf_token(two))
    assert not codec.csrf_valid(one, "")
    assert not codec.csrf_valid(None, codec.csrf_token(one))


def test_a_key_file_that_is_not_a_key_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text("not a key\n")
    with pytest.raises(ValueError, match="not a console session key"):
        SessionCodec.from_key_file(bad, ttl_s=60)


def test_token_labels_never_show_the_token() -> None:
    claims = base64.urlsafe_b64encode(json.dumps({"sub": "examiner-7"}).encode()).decode()
    assert token_label(f"e30.{claims.rstrip('=')}.sig") == "examiner-7 (OIDC)"
    assert token_label("fgt_abcdefgh1234") == "token …1234"


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("/reviews/abc", "/reviews/abc"),
        ("https://elsewhere.example/", ""),
        ("//elsewhere.example/path", ""),
        ("javascript:alert(1)", ""),
        ("reviews", ""),
    ],
)
def test_after_sign_in_only_a_path_of_this_console(given: str, kept: str) -> None:
    assert _local_path(given) == kept


class Running:
    def __init__(self, port: int, codec: SessionCodec) -> None:
        self.port = port
        self.codec = codec

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        cookie: str = "",
    ) -> http.client.HTTPResponse:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        sent = dict(headers or {})
        if cookie:
            sent["Cookie"] = f"{COOKIE}={cookie}"
        connection.request(method, path, body=body, headers=sent)
        response = connection.getresponse()
        response.read()
        connection.close()
        return response


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    work = tmp_path_factory.mktemp("console-unit")
    nowhere = f"127.0.0.1:{free_port()}"
    settings = load_settings(
        [
            f"console.gateway_address={nowhere}",
            f"console.ingest_address={nowhere}",
            "console.call_timeout_s=2",
            "console.max_upload_bytes=100000",
            f"console.session_key_file={work / 'session.key'}",
        ]
    )
    port = free_port()
    ready = threading.Event()
    holder: dict[str, uvicorn.Server] = {}
    codec = SessionCodec.from_key_file(settings.console.session_key_file, 600)

    def serve() -> None:
        async def main() -> None:
            console = Console(settings, Backend(settings), codec)
            config = uvicorn.Config(
                SecurityHeaders(build_app(console), https=False),
                host="127.0.0.1",
                port=port,
                lifespan="off",
                log_config=None,
            )
            server = uvicorn.Server(config)
            holder["server"] = server
            ready.set()
            await server.serve()

        asyncio.run(main())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ready.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not holder["server"].started:
        time.sleep(0.05)
    yield Running(port, codec)
    holder["server"].should_exit = True
    thread.join(10)


def test_pages_carry_protective_headers_and_need_a_sign_in(running: Running) -> None:
    health = running.request("GET", "/healthz")
    assert health.status == 200
    assert "frame-ancestors 'none'" in (health.getheader("content-security-policy") or "")
    assert health.getheader("cache-control") == "no-store"
    assert health.getheader("x-content-type-options") == "nosniff"
    page = running.request("GET", "/collections")
    assert page.status == 303
    assert page.getheader("location") == "/sign-in?next=%2Fcollections"
    forged = running.request("GET", "/collections", cookie="not-a-session")
    assert forged.status == 303


def test_a_sign_in_needs_the_forms_csrf_token(running: Running) -> None:
    body = urllib.parse.urlencode({"token": "fgt_x", "csrf": "guess"}).encode()
    response = running.request(
        "POST",
        "/sign-in",
        body,
        {"Content-Type": "application/x-www-form-urlencoded", "Cookie": "facegrid_sign_in=n"},
    )
    assert response.status == 403


def test_a_gateway_that_cannot_be_reached_is_said_so_at_sign_in(running: Running) -> None:
    nonce = "nonce-1"
    body = urllib.parse.urlencode(
        {"token": "fgt_x", "csrf": running.codec.csrf_token(nonce), "next": "/search"}
    ).encode()
    response = running.request(
        "POST",
        "/sign-in",
        body,
        {
            "Content-Type": "application/x-www-form-urlencoded",
            "Cookie": f"facegrid_sign_in={nonce}",
        },
    )
    assert response.status == 401
    assert not any(COOKIE in v for k, v in response.getheaders() if k.lower() == "set-cookie")


def test_a_post_without_its_csrf_token_or_too_large_is_refused(running: Running) -> None:
    sealed = running.codec.seal(Session("fgt_x", "x"))
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    missing = running.request("POST", "/search", b"case_id=1", form, cookie=sealed)
    assert missing.status == 403
    large = running.request("POST", "/search", b"x" * 100001, form, cookie=sealed)
    assert large.status == 413
    csrf = running.codec.csrf_token(sealed)
    # A valid form reaches the gateway, which cannot be reached here: 503, said on the page.
    sent = urllib.parse.urlencode({"csrf": csrf, "collection": "c"}).encode()
    unreachable = running.request("POST", "/search", sent, form, cookie=sealed)
    assert unreachable.status == 503


def _oidc(tmp_path: Path, discovery_url: str, issuer: str = "https://idp.test/realm") -> Any:
    settings = load_settings(
        [
            f"oidc.issuer={issuer}",
            "oidc.jwks_url=https://idp.test/certs",
            "console.oidc_client_id=console",
            f"console.oidc_discovery_url={discovery_url}",
        ]
    )
    return OidcSignIn(settings, SessionCodec.from_key_file(tmp_path / "k", 600))


def test_the_oidc_sign_in_refuses_what_does_not_belong_to_it(tmp_path: Path) -> None:
    provider = OidcProvider("https://idp.test/realm", "console", "officer-1", ["facegrid.read"])
    try:
        sign_in = _oidc(tmp_path, f"{provider.url}/.well-known/openid-configuration")
        started = asyncio.run(sign_in.start("http://127.0.0.1:8080/", "/search"))
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(started.location).query))
        assert query["code_challenge_method"] == "S256"
        assert query["redirect_uri"] == "http://127.0.0.1:8080/sign-in/oidc/callback"
        assert query["state"] not in started.state_cookie  # sealed
        back = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(provider.authorize(query)).query))
        with pytest.raises(SignInError, match="does not belong"):
            asyncio.run(sign_in.finish({**back, "state": "guessed"}, started.state_cookie))
        with pytest.raises(SignInError, match="took too long or began elsewhere"):
            asyncio.run(sign_in.finish(back, None))
        token, next_path = asyncio.run(sign_in.finish(back, started.state_cookie))
        assert next_path == "/search"
        assert token.count(".") == 2
        with pytest.raises(SignInError, match="answered 400"):  # a code works once
            asyncio.run(sign_in.finish(back, started.state_cookie))
        other = _oidc(
            tmp_path, f"{provider.url}/.well-known/openid-configuration", issuer="https://x.test"
        )
        with pytest.raises(SignInError, match="names issuer"):
            asyncio.run(other.start("http://127.0.0.1:8080/", ""))
    finally:
        provider.close()
    with pytest.raises(ValueError, match="must be https"):
        _oidc(tmp_path, "http://idp.example.org/.well-known/openid-configuration")


@pytest.mark.parametrize(
    ("path", "page"),
    [
        ("/reviews/5df75d47-e9cb-40fd-96a9-a319cc5aafe2", "/reviews"),
        ("/collections/watchlist/faces/abc/delete", "/collections"),
        ("/", "/"),
        ("/officer-4711-was-here", "other"),  # never a label made from the path
    ],
)
def test_metrics_label_pages_never_ids(path: str, page: str) -> None:
    assert page_label(path) == page


class _FakeStream:
    """Ingest's StreamMatchEvents as the console's backend yields it: some replies, then
    silence, or a refusal."""

    def __init__(self, replies: list[Any], refusal: grpc.StatusCode | None = None) -> None:
        self.replies = replies
        self.refusal = refusal

    async def match_events(self, message: Any, token: str) -> AsyncGenerator[Any, None]:
        for reply in self.replies:
            yield reply
        if self.refusal is not None:
            error = grpc.aio.AioRpcError(
                self.refusal, grpc.aio.Metadata(), grpc.aio.Metadata(), details="gone"
            )
            raise CallError(error)
        await asyncio.Event().wait()  # silent from here on


def _relayed(backend: _FakeStream, stop_after_s: float | None = None) -> str:
    settings = load_settings()

    async def run() -> str:
        codec = SessionCodec(Fernet.generate_key(), 60)
        console = Console(settings, backend, codec)  # type: ignore[arg-type]
        signed = Signed(Session("t", "t"), "cookie", "csrf")
        if stop_after_s is not None:
            asyncio.get_running_loop().call_later(stop_after_s, console.stopping.set)
        request = ingest_pb2.StreamMatchEventsRequest()
        chunks = [c async for c in alerts._relay(console, signed, request)]
        return "".join(chunks)

    return asyncio.run(asyncio.wait_for(run(), 10))


def _event(cursor: str) -> Any:
    event = ingest_pb2.MatchEvent(name=f"streamProcessors/p/matchEvents/{cursor}", cursor=cursor)
    event.matches.add().similarity = 91.0
    return ingest_pb2.StreamMatchEventsResponse(event=event)


def test_a_silent_stream_ends_so_that_the_browser_reconnects_with_its_cursor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(alerts, "STREAM_SILENCE_S", 0.3)
    sent = _relayed(_FakeStream([ingest_pb2.StreamMatchEventsResponse(), _event("c-1")]))
    assert ": heartbeat" in sent
    assert "event: match\nid: c-1\n" in sent
    assert "event: problem" not in sent  # not a refusal: EventSource reconnects


def test_a_stopping_console_ends_open_streams_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(alerts, "STREAM_SILENCE_S", 60.0)
    started = time.monotonic()
    sent = _relayed(_FakeStream([_event("c-2")]), stop_after_s=0.2)
    assert time.monotonic() - started < 5
    assert "id: c-2" in sent
    assert "event: problem" not in sent


def test_a_refused_stream_says_why_and_stops() -> None:
    sent = _relayed(_FakeStream([], refusal=grpc.StatusCode.NOT_FOUND))
    assert "event: problem\ndata: NOT_FOUND: gone" in sent
