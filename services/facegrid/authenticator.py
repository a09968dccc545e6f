"""Every way a caller may prove who it is, for the gateway and ingest.

A bearer token is looked up in the credentials file (``facegrid token create``), which
is read at start-up and again on SIGHUP (a file that does not load keeps the callers
already known, with an error in the log); a token that is a JWT is checked as an OIDC
access token when ``oidc.issuer`` is set (facegrid.oidc).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from facegrid.auth import Credentials, Principal
from facegrid.config import OidcSettings
from facegrid.oidc import OidcVerifier

log = logging.getLogger(__name__)


class Authenticator:
    def __init__(
        self, credentials: Credentials, path: Path | None = None, oidc: OidcVerifier | None = None
    ) -> None:
        self.credentials = credentials
        self._path = path
        self._oidc = oidc

    @classmethod
    def configured(cls, credentials_file: Path, oidc: OidcSettings) -> Authenticator:
        credentials = Credentials.load(credentials_file)
        verifier = OidcVerifier(oidc) if oidc.issuer else None
        if not len(credentials) and verifier is None:
            log.warning(
                "no callers in %s and no OIDC issuer: every call will be UNAUTHENTICATED "
                "(create one with `facegrid token create`)",
                credentials_file,
            )
        return cls(credentials, credentials_file, verifier)

    async def authenticate(self, token: str) -> Principal | None:
        principal = self.credentials.authenticate(token)
        if principal is None and self._oidc is not None and OidcVerifier.looks_like_jwt(token):
            principal = await self._oidc.authenticate(token)
        return principal

    def reload(self) -> None:
        """Read the credentials file again (SIGHUP); keep the old callers if it fails."""
        if self._path is None:
            return
        try:
            self.credentials = Credentials.load(self._path)
        except (OSError, ValueError, KeyError) as error:
            log.error("kept the callers known before: %s does not load: %s", self._path, error)
            return
        log.info("re-read %s: %d callers", self._path, len(self.credentials))

    def reload_on_sighup(self) -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload)
