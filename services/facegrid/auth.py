"""Callers, their bearer tokens and scopes: the one place that defines authentication.

A caller sends ``authorization: Bearer <token>`` metadata. The gateway knows callers
from a credentials file that holds, per principal, the SHA-256 of its token (never
the token itself) and the scopes it was granted::

    {"principals": [{"principal": "alice", "token_sha256": "…", "scopes": ["facegrid.read"]}]}

``facegrid token create`` adds a principal and prints its token once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from facegrid.v1 import common_pb2

AUTHORIZATION_HEADER = "authorization"
BEARER_PREFIX = "Bearer "

SCOPE_DETECT = "facegrid.detect"
SCOPE_COMPARE = "facegrid.compare"
SCOPE_SEARCH = "facegrid.search"
SCOPE_READ = "facegrid.read"
SCOPE_ENROL = "facegrid.enrol"
SCOPE_DELETE = "facegrid.delete"
SCOPE_ADMIN = "facegrid.admin"
SCOPE_AUDIT = "facegrid.audit"
# Examiners: record and read decisions on the candidates of identification calls.
SCOPE_REVIEW = "facegrid.review"
SCOPE_INGEST_ADMIN = "facegrid.ingest.admin"
SCOPE_INGEST_PUSH = "facegrid.ingest.push"
SCOPE_INGEST_WATCH = "facegrid.ingest.watch"
ALL_SCOPES = (
    SCOPE_DETECT,
    SCOPE_COMPARE,
    SCOPE_SEARCH,
    SCOPE_READ,
    SCOPE_ENROL,
    SCOPE_DELETE,
    SCOPE_ADMIN,
    SCOPE_AUDIT,
    SCOPE_REVIEW,
    SCOPE_INGEST_ADMIN,
    SCOPE_INGEST_PUSH,
    SCOPE_INGEST_WATCH,
)

LOCAL_ADMIN = "local-admin"
DEFAULT_TOKEN_FILE = Path("var/admin.token")
TOKEN_ENV = "FACEGRID_TOKEN"
TOKEN_PREFIX = "fgt_"


# What a caller may say an identification is for: common.proto's purposes, by name.
_PURPOSE = common_pb2.IdentificationContext.Purpose
PURPOSES = tuple(name for name in _PURPOSE.keys() if name != "PURPOSE_UNSPECIFIED")  # noqa: SIM118


@dataclass(frozen=True)
class Principal:
    name: str
    scopes: frozenset[str]
    # The purposes the administrator allows this caller; empty: any purpose.
    purposes: frozenset[str] = frozenset()


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Credentials:
    """The principals of a credentials file, looked up by token in constant time."""

    def __init__(
        self,
        entries: Iterable[tuple[str, str, Iterable[str]]],
        purposes: dict[str, Iterable[str]] | None = None,
    ) -> None:
        """``entries``: (principal, token digest, scopes); ``purposes``: per principal,
        the purposes it may use (a principal not named may use any)."""
        allowed = purposes or {}
        self._by_digest = {
            digest: Principal(name, frozenset(scopes), frozenset(allowed.get(name, ())))
            for name, digest, scopes in entries
        }

    @classmethod
    def load(cls, path: Path) -> Credentials:
        if not path.exists():
            return cls([])
        document = json.loads(path.read_text())
        entries = []
        purposes = {}
        for entry in document.get("principals", []):
            unknown = set(entry["scopes"]) - set(ALL_SCOPES)
            if unknown:
                raise ValueError(f"{path}: unknown scopes {sorted(unknown)}")
            unknown = set(entry.get("purposes", [])) - set(PURPOSES)
            if unknown:
                raise ValueError(f"{path}: unknown purposes {sorted(unknown)}")
            entries.append((entry["principal"], entry["token_sha256"], entry["scopes"]))
            purposes[entry["principal"]] = entry.get("purposes", [])
        return cls(entries, purposes)

    def __len__(self) -> int:
        return len(self._by_digest)

    def authenticate(self, token: str) -> Principal | None:
        digest = token_digest(token)
        for known, principal in self._by_digest.items():
            if hmac.compare_digest(known, digest):
                return principal
        return None


def create_token(
    path: Path, principal: str, scopes: Iterable[str], purposes: Iterable[str] = ()
) -> str:
    """Add a principal with a fresh token to the credentials file; return the token.
    ``purposes``: the only purposes it may identify for (none given: any)."""
    granted = sorted(set(scopes))
    unknown = set(granted) - set(ALL_SCOPES)
    if unknown or not granted:
        raise ValueError(f"scopes must be some of {', '.join(ALL_SCOPES)}")
    allowed = sorted(set(purposes))
    if set(allowed) - set(PURPOSES):
        raise ValueError(f"purposes must be some of {', '.join(PURPOSES)}")
    # A recognisable prefix (secret scanners can match it) that also keeps a token from
    # starting with "-", which a command line would take for an option.
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    document = json.loads(path.read_text()) if path.exists() else {"principals": []}
    document["principals"] = [e for e in document["principals"] if e["principal"] != principal] + [
        {
            "principal": principal,
            "token_sha256": token_digest(token),
            "scopes": granted,
            **({"purposes": allowed} if allowed else {}),
        }
    ]
    _write_private(path, json.dumps(document, indent=2) + "\n")
    return token


def ensure_local_admin(credentials_file: Path, token_file: Path = DEFAULT_TOKEN_FILE) -> str:
    """The one-machine default: a local admin with every scope, its token in a 0600 file."""
    if token_file.exists() and credentials_file.exists():
        token = token_file.read_text().strip()
        if Credentials.load(credentials_file).authenticate(token) is not None:
            return token
    token = create_token(credentials_file, LOCAL_ADMIN, ALL_SCOPES)
    _write_private(token_file, token + "\n")
    return token


def read_token(explicit: str | None = None, token_file: Path = DEFAULT_TOKEN_FILE) -> str:
    """The caller's token: given, else $FACEGRID_TOKEN, else the local admin's token file."""
    if explicit:
        return explicit
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    if token_file.exists():
        return token_file.read_text().strip()
    raise FileNotFoundError(
        f"no token: pass --token, set ${TOKEN_ENV}, or run `facegrid up` (writes {token_file})"
    )


def bearer_metadata(token: str) -> tuple[tuple[str, str]]:
    return ((AUTHORIZATION_HEADER, BEARER_PREFIX + token),)


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    os.replace(temporary, path)
