"""Signing in on the agency's OIDC provider: the authorization-code flow with PKCE.

With ``console.oidc_client_id`` set, the sign-in page offers the provider's own page.
The console sends the browser there with a fresh ``state`` and a PKCE challenge (their
secrets sealed in a short-lived cookie), receives the code on its callback, exchanges
it at the provider's token endpoint (with the PKCE verifier, and the client's secret
for a confidential client) and keeps the **access token** in the person's session as
it would a pasted one. The console does not decide anything from it: the gateway
verifies the token (``oidc.*``: issuer, audience, signature, expiry) and reads its
scopes and purposes on every call, as for any caller.

The provider's endpoints come from its OpenID configuration (``oidc.issuer`` +
``/.well-known/openid-configuration``, or ``console.oidc_discovery_url``), which must
name the same issuer; it must be reached over https, except on a loopback address.
Calls to it run in a worker thread with a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from facegrid.config import Settings
from facegrid.tls import is_loopback

from facegrid_console.sessions import SessionCodec

STATE_COOKIE = "facegrid_oidc"
STATE_TTL_S = 600
_DISCOVERY_TTL_S = 3600.0
_TIMEOUT_S = 10.0
_MAX_BYTES = 1 << 20


class SignInError(Exception):
    """The provider's sign-in did not give an access token: said on the sign-in page."""


@dataclass(frozen=True)
class Provider:
    authorization_endpoint: str
    token_endpoint: str


@dataclass(frozen=True)
class Started:
    """Where to send the browser, and the sealed state its cookie carries."""

    location: str
    state_cookie: str


class OidcSignIn:
    def __init__(self, settings: Settings, sessions: SessionCodec) -> None:
        console = settings.console
        self.issuer = settings.oidc.issuer
        self.client_id = console.oidc_client_id
        self.scopes = console.oidc_scopes
        self.public_url = console.public_url.rstrip("/")
        self.discovery_url = console.oidc_discovery_url or (
            self.issuer.rstrip("/") + "/.well-known/openid-configuration"
        )
        secret_file = console.oidc_client_secret_file
        self.client_secret = Path(secret_file).read_text().strip() if secret_file else ""
        self.sessions = sessions
        self._provider: Provider | None = None
        self._fetched_at = -float("inf")
        if not self.issuer:
            raise ValueError("console.oidc_client_id needs oidc.issuer (the provider)")
        _check_url(self.discovery_url, "console.oidc_discovery_url")

    def redirect_uri(self, request_base: str) -> str:
        return (self.public_url or request_base.rstrip("/")) + "/sign-in/oidc/callback"

    async def start(self, request_base: str, next_path: str) -> Started:
        provider = await self.provider()
        state = secrets.token_urlsafe(24)
        verifier = secrets.token_urlsafe(48)
        challenge = _b64(hashlib.sha256(verifier.encode()).digest())
        redirect_uri = self.redirect_uri(request_base)
        query = urllib.parse.urlencode(
            {
                "response_type": "code",
                "client_id": self.client_id,
                "redirect_uri": redirect_uri,
                "scope": self.scopes,
                "state": state,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            }
        )
        separator = "&" if "?" in provider.authorization_endpoint else "?"
        sealed = self.sessions.seal_data(
            {"state": state, "verifier": verifier, "next": next_path, "redirect": redirect_uri}
        )
        return Started(provider.authorization_endpoint + separator + query, sealed)

    async def finish(self, query: dict[str, str], state_cookie: str | None) -> tuple[str, str]:
        """The access token the provider gives for the callback's code, and where the
        person was going; SignInError otherwise."""
        kept = self.sessions.open_data(state_cookie, STATE_TTL_S)
        if kept is None:
            raise SignInError("The sign-in took too long or began elsewhere; try again.")
        if not hmac.compare_digest(kept["state"], query.get("state", "")):
            raise SignInError("The provider's answer does not belong to this sign-in.")
        if "error" in query:
            raise SignInError(
                "The provider refused the sign-in: "
                + query.get("error_description", query["error"])[:200]
            )
        code = query.get("code", "")
        if not code:
            raise SignInError("The provider sent no code.")
        provider = await self.provider()
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": kept["redirect"],
            "client_id": self.client_id,
            "code_verifier": kept["verifier"],
        }
        if self.client_secret:
            form["client_secret"] = self.client_secret
        answer = await asyncio.to_thread(_post_form, provider.token_endpoint, form)
        token = answer.get("access_token")
        if not isinstance(token, str) or not token:
            raise SignInError("The provider gave no access token.")
        return token, kept.get("next", "")

    async def provider(self) -> Provider:
        if self._provider is None or time.monotonic() - self._fetched_at > _DISCOVERY_TTL_S:
            document = await asyncio.to_thread(_get_json, self.discovery_url)
            if document.get("issuer") != self.issuer:
                raise SignInError(
                    f"The provider's configuration names issuer {document.get('issuer')!r}, "
                    f"not {self.issuer!r}."
                )
            try:
                provider = Provider(
                    str(document["authorization_endpoint"]), str(document["token_endpoint"])
                )
            except KeyError as error:
                raise SignInError(f"The provider's configuration lacks {error}.") from error
            _check_url(provider.authorization_endpoint, "authorization_endpoint")
            _check_url(provider.token_endpoint, "token_endpoint")
            self._provider, self._fetched_at = provider, time.monotonic()
        return self._provider


def _check_url(url: str, what: str) -> None:
    parts = urllib.parse.urlsplit(url)
    loopback = parts.scheme == "http" and is_loopback(parts.hostname or "")
    if parts.scheme != "https" and not loopback:
        raise ValueError(f"{what} must be https (got {url!r})")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _get_json(url: str) -> dict[str, Any]:
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    return _read_json(request)


def _post_form(url: str, form: dict[str, str]) -> dict[str, Any]:
    request = urllib.request.Request(
        url,
        data=urllib.parse.urlencode(form).encode(),
        headers={
            "Accept": "application/json",
            "Content-Type": "application/x-www-form-urlencoded",
        },
        method="POST",
    )
    return _read_json(request)


def _read_json(request: urllib.request.Request) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
            document = json.loads(response.read(_MAX_BYTES))
    except urllib.error.HTTPError as error:
        raise SignInError(f"The provider answered {error.code} at {request.full_url}.") from error
    except (OSError, ValueError) as error:
        raise SignInError(f"The provider cannot be reached: {error}") from error
    if not isinstance(document, dict):
        raise SignInError("The provider's answer is not a JSON object.")
    return document
