"""Agency identity: OIDC access tokens (JWT) checked against the issuer's published keys.

A bearer token that is a JWT is accepted when its signature verifies with a key of the
issuer's JWKS (``oidc.jwks_url``), with an algorithm of ``oidc.algorithms`` only (the
header's ``alg`` is never trusted beyond that list, so ``none`` and an HMAC made with a
public key are refused), and its ``iss``, ``aud``, ``exp`` and ``nbf`` hold, with
``oidc.leeway_s`` for clocks. The principal is the ``oidc.principal_claim`` (``sub``);
the scopes are the facegrid scopes named in ``oidc.scope_claim`` (a space-separated
string, as OAuth's ``scope``, or a list; any other scope is ignored), and the purposes
it may identify for those of ``oidc.purpose_claim`` (absent: any).

The JWKS is fetched at the first token, and again when a token names a key id it does
not hold (the issuer rotated its keys), at most once every ``oidc.jwks_min_refresh_s``
so that made-up key ids cannot make the gateway hammer the issuer. Fetches run in a
worker thread: the event loop never waits on the network. The issuer must be reached
over https, except on a loopback address (tests).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.parse
import urllib.request
from typing import Any

import jwt

from facegrid.auth import ALL_SCOPES, PURPOSES, Principal
from facegrid.config import OidcSettings
from facegrid.tls import is_loopback

log = logging.getLogger(__name__)

MAX_JWKS_BYTES = 1 << 20


class OidcVerifier:
    def __init__(self, settings: OidcSettings) -> None:
        url = urllib.parse.urlsplit(settings.jwks_url)
        if url.scheme != "https" and not (url.scheme == "http" and is_loopback(url.hostname or "")):
            raise ValueError(f"oidc.jwks_url must be https (got {settings.jwks_url!r})")
        self.settings = settings
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = -float("inf")
        self._lock = asyncio.Lock()

    @staticmethod
    def looks_like_jwt(token: str) -> bool:
        return token.count(".") == 2 and token.startswith("ey")

    async def authenticate(self, token: str) -> Principal | None:
        """The token's principal and scopes, or None if it is not valid (reason logged)."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            return None
        if header.get("alg") not in self.settings.algorithms:
            log.info("refused a token signed with %r", header.get("alg"))
            return None
        key = await self._key(str(header.get("kid", "")))
        if key is None:
            log.info("refused a token signed with an unknown key %r", header.get("kid"))
            return None
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=list(self.settings.algorithms),
                audience=self.settings.audience,
                issuer=self.settings.issuer,
                leeway=self.settings.leeway_s,
                options={"require": ["exp", "iss", "aud", self.settings.principal_claim]},
            )
        except jwt.InvalidTokenError as error:
            log.info("refused a token: %s", error)  # the reason, never the token
            return None
        return Principal(
            str(claims[self.settings.principal_claim]),
            _named(claims.get(self.settings.scope_claim, []), ALL_SCOPES),
            _named(claims.get(self.settings.purpose_claim, []), PURPOSES),
        )

    async def _key(self, key_id: str) -> jwt.PyJWK | None:
        if key_id in self._keys:
            return self._keys[key_id]
        async with self._lock:  # one fetch for many tokens naming the same new key
            if key_id not in self._keys and self._may_refresh():
                await self._refresh()
        return self._keys.get(key_id)

    def _may_refresh(self) -> bool:
        return time.monotonic() - self._fetched_at >= self.settings.jwks_min_refresh_s

    async def _refresh(self) -> None:
        self._fetched_at = time.monotonic()
        try:
            document = await asyncio.to_thread(self._fetch)
            keys = jwt.PyJWKSet.from_dict(document).keys
        except (OSError, ValueError, jwt.PyJWTError) as error:
            log.warning("could not fetch the JWKS from %s: %s", self.settings.jwks_url, error)
            return
        self._keys = {str(k.key_id): k for k in keys if k.key_id}
        log.info("fetched %d keys from %s", len(self._keys), self.settings.jwks_url)

    def _fetch(self) -> Any:
        headers = {"Accept": "application/json"}
        request = urllib.request.Request(self.settings.jwks_url, headers=headers)
        with urllib.request.urlopen(request, timeout=self.settings.jwks_timeout_s) as response:
            return json.loads(response.read(MAX_JWKS_BYTES))


def _named(value: Any, known: tuple[str, ...]) -> frozenset[str]:
    """The known names in a claim: a space-separated string or a list."""
    named = value.split() if isinstance(value, str) else [str(v) for v in value]
    return frozenset(n for n in named if n in known)
