"""AIP-158 pagination shared by every service: page sizes and opaque page tokens.

A page token carries the key to continue after and a fingerprint of the request's
other fields, so a token used with different parameters is INVALID_ARGUMENT.
"""

from __future__ import annotations

import base64
import hashlib
import json

from facegrid.errors import invalid_argument

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def page_size(value: int, field: str = "page_size") -> int:
    """0 means the default; larger than the maximum means the maximum; negative is invalid."""
    if value < 0:
        raise invalid_argument(field, f"must not be negative, got {value}")
    return DEFAULT_PAGE_SIZE if value == 0 else min(value, MAX_PAGE_SIZE)


def request_fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def encode_page_token(after: str, fingerprint: str) -> str:
    raw = json.dumps({"a": after, "f": fingerprint}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, fingerprint: str, field: str = "page_token") -> str:
    """The key to continue after; "" for the first page."""
    if not token:
        return ""
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        after, expected = str(data["a"]), str(data["f"])
    except (ValueError, KeyError, TypeError) as exc:
        raise invalid_argument(field, "not a page token of this service") from exc
    if expected != fingerprint:
        raise invalid_argument(field, "the page token belongs to a request with other parameters")
    return after
