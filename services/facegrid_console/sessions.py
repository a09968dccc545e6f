"""Sign-in sessions: the person's bearer token sealed in a cookie, and CSRF tokens.

The browser holds only ciphertext (Fernet: AES-128-CBC with an HMAC-SHA256, and the
time it was sealed), in an HttpOnly, SameSite=Strict cookie (Secure over HTTPS), so
page scripts cannot read the token and other sites cannot send it. Nothing is kept on
the server, so any replica that reads the same key file serves any session; a session
ends when its time is up (``console.session_ttl_s``), when the person signs out (the
cookie is cleared), or for everyone at once when the key file is replaced.

Every form carries a CSRF token derived from the session cookie (an HMAC under the
same key), checked on every POST besides SameSite.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

COOKIE = "facegrid_session"


@dataclass(frozen=True)
class Session:
    token: str
    # What the pages show of who is signed in: never the token itself.
    label: str


class SessionCodec:
    def __init__(self, key: bytes, ttl_s: float) -> None:
        self._fernet = Fernet(key)
        self._mac_key = hashlib.sha256(b"facegrid-console-csrf:" + key).digest()
        self.ttl_s = ttl_s

    @classmethod
    def from_key_file(cls, path: Path, ttl_s: float) -> SessionCodec:
        """The key in ``path``, created (mode 0600) if missing."""
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as out:
                out.write(Fernet.generate_key())
        key = path.read_bytes().strip()
        try:
            return cls(key, ttl_s)
        except ValueError as error:
            raise ValueError(f"{path}: not a console session key ({error})") from error

    def seal(self, session: Session) -> str:
        payload = json.dumps({"token": session.token, "label": session.label}).encode()
        return self._fernet.encrypt(payload).decode()

    def open(self, cookie: str | None) -> Session | None:
        """The session in ``cookie``; None if absent, forged, or older than the TTL."""
        if not cookie:
            return None
        try:
            payload = json.loads(self._fernet.decrypt(cookie.encode(), ttl=int(self.ttl_s)))
        except (InvalidToken, ValueError):
            return None
        if not isinstance(payload, dict):
            return None
        token, label = payload.get("token"), payload.get("label")
        if not isinstance(token, str) or not isinstance(label, str) or not token:
            return None
        return Session(token, label)

    def seal_data(self, data: dict[str, str]) -> str:
        """Short-lived state sealed for the browser to carry (an OIDC sign-in's)."""
        return self._fernet.encrypt(json.dumps(data).encode()).decode()

    def open_data(self, cookie: str | None, ttl_s: int) -> dict[str, str] | None:
        if not cookie:
            return None
        try:
            data = json.loads(self._fernet.decrypt(cookie.encode(), ttl=ttl_s))
        except (InvalidToken, ValueError):
            return None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            return None
        return data

    def csrf_token(self, cookie: str) -> str:
        digest = hmac.new(self._mac_key, cookie.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def csrf_valid(self, cookie: str | None, given: str | None) -> bool:
        if not cookie or not given:
            return False
        return hmac.compare_digest(self.csrf_token(cookie), given)


def token_label(token: str) -> str:
    """How a token is named on the pages: the subject of a JWT (read, not verified: the
    gateway verifies it on every call), else the token's last four characters."""
    parts = token.split(".")
    if len(parts) == 3:
        try:
            padded = parts[1] + "=" * (-len(parts[1]) % 4)
            claims = json.loads(base64.urlsafe_b64decode(padded))
            subject = claims.get("sub") if isinstance(claims, dict) else None
            if isinstance(subject, str) and subject:
                return f"{subject} (OIDC)"
        except (ValueError, UnicodeDecodeError):
            pass
    return f"token …{token[-4:]}"
