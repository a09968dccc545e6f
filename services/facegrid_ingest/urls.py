"""Which video sources the ingest service may pull from, and how their URLs are logged.

A pull URL is chosen by an API caller but opened by our process, inside our network: without
a policy it is a server-side request forgery tool (``http://169.254.169.254/``, an internal
admin port, ``file:///etc/shadow``). :func:`parse_pull_url` is that policy, applied before
anything is opened:

- Only ``rtsp``, ``rtsps``, ``http``, ``https`` and ``file`` are accepted. FFmpeg knows many
  more (``concat:``, ``subfile:``, ``crypto+...``, ``pipe:``), several of which read local
  files or wrap other URLs the policy would never see.
- Network URLs must name a host matched by ``allowed_hosts``: exact names or IP addresses,
  ``*.example.org`` (any name *below* example.org, not example.org itself: list both to allow
  both), CIDR ranges (``10.0.0.0/8``, ``fd00::/8``) or ``*`` for any host. Names are never
  resolved here: a CIDR range matches IP literals only. Resolving at check time would not
  bind the later connection to the checked address (DNS rebinding), so the honest policy
  for names is to list them.
- ``file`` URLs must resolve, after following symbolic links and ``..``, to a path under one
  of ``allowed_dirs``. :attr:`PullUrl.target` is the URL of that resolved path, so a link
  swapped after the check cannot redirect the reader elsewhere (short of swapping a directory
  inside the allowed tree, which needs write access there anyway).
- An empty list allows nothing of that kind, so a deployment that lists no directories
  serves no local files.

A rejected URL raises :class:`UrlRejected`; ``permission`` tells the caller whether the URL
was well formed but not allowed (``PERMISSION_DENIED``) or malformed (``INVALID_ARGUMENT``).

:func:`masked` hides credentials in anything that is logged or returned: camera URLs often
carry a password (``rtsp://admin:secret@cam/``) or a token in the query.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import SplitResult, quote, unquote, urlsplit

NETWORK_SCHEMES = frozenset({"rtsp", "rtsps", "http", "https"})
SCHEMES = NETWORK_SCHEMES | {"file"}
MAX_URL_LENGTH = 4096

# Query parameters that cameras and streaming gateways use for secrets.
_SECRET_PARAMETERS = frozenset(
    {
        "password",
        "passwd",
        "pass",
        "pwd",
        "token",
        "access_token",
        "auth",
        "authorization",
        "key",
        "api_key",
        "apikey",
        "secret",
        "signature",
        "sig",
    }
)

# A URL anywhere in a text, up to whitespace or the quotes FFmpeg's error messages put
# around URLs.
_URL_TOKEN = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<rest>[^\s'\"<>]*)")
_QUERY_SECRET = re.compile(r"(?P<name>[?&;](?P<key>[A-Za-z_\-]+)=)(?P<value>[^&#;\s'\"]*)")
_CONTROL = re.compile(r"[\x00-\x20\x7f]")


class UrlRejected(Exception):  # noqa: N818 (the name is the ingest API's)
    """A pull URL the policy refuses.

    ``reason`` is a short machine-readable code (``scheme``, ``malformed``, ``no_host``,
    ``host_not_allowed``, ``path_not_allowed``, ...); ``message`` is for people and never
    contains the URL's password; ``permission`` is True when the URL is well formed but not
    allowed (PERMISSION_DENIED) and False when it is malformed (INVALID_ARGUMENT).
    """

    def __init__(self, reason: str, message: str, permission: bool) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.permission = permission


@dataclass(frozen=True)
class PullUrl:
    """An accepted pull URL.

    ``url`` is the URL as given (credentials included: pass it to the reader, never log it);
    ``masked`` is the loggable form; ``host`` is the lower-cased host name or IP address
    (None for files); ``path`` is the resolved local path (None for network URLs); ``target``
    is the URL to open: the original one for network sources, the resolved ``file://`` URL
    for files.
    """

    url: str
    masked: str
    scheme: str
    host: str | None
    port: int | None
    path: Path | None
    target: str


def masked(url: str) -> str:
    """``url`` (or any text containing URLs) with passwords and secret query values as ``***``.

    The user name stays (it tells an operator which account a camera uses); the password in
    the userinfo and the values of query parameters such as ``password=`` or ``token=`` are
    replaced. Text without URLs, and URLs without secrets, come back unchanged.
    """

    def hide_password(match: re.Match[str]) -> str:
        rest = match["rest"]
        end = len(rest)
        for stop in "/?#":
            index = rest.find(stop)
            if 0 <= index < end:
                end = index
        authority = rest[:end]
        at = authority.rfind("@")
        if at < 0:
            # Not RFC 3986 userinfo, but an unencoded "/" in a password still must not
            # reach a log: "rtsp://admin:pa/ss@cam" hides "pa/ss". (The price: a URL with
            # a port and a later "@", such as "http://h:80/a@b", is shown as "h:***@b".)
            at = rest.find("@", end)
            if at < 0 or ":" not in authority:
                return match[0]
        userinfo = rest[:at]
        colon = userinfo.find(":")
        if colon < 0:
            return match[0]
        return f"{match['scheme']}{userinfo[:colon]}:***{rest[at:]}"

    def hide_query_secret(match: re.Match[str]) -> str:
        if match["key"].lower() not in _SECRET_PARAMETERS or not match["value"]:
            return match[0]
        return f"{match['name']}***"

    text = _URL_TOKEN.sub(hide_password, url)
    if "://" in text:
        text = _QUERY_SECRET.sub(hide_query_secret, text)
    return text


def parse_pull_url(
    url: str, allowed_hosts: Sequence[str], allowed_dirs: Sequence[str | Path]
) -> PullUrl:
    """Check ``url`` against the pull policy (see the module's docstring); raise UrlRejected."""
    if not isinstance(url, str) or not url:
        raise UrlRejected("malformed", "the URL is empty", permission=False)
    shown = masked(url)
    if len(url) > MAX_URL_LENGTH:
        raise UrlRejected(
            "malformed", f"the URL is longer than {MAX_URL_LENGTH} characters", permission=False
        )
    if _CONTROL.search(url):
        # Spaces, NULs and line breaks have no place in a URL; FFmpeg would cut or
        # reinterpret them, so what is checked would not be what is opened.
        raise UrlRejected(
            "malformed", f"the URL contains spaces or control characters: {shown!r}", False
        )
    try:
        parts = urlsplit(url)
    except ValueError as error:
        raise UrlRejected("malformed", f"malformed URL {shown!r}: {error}", False) from None
    scheme = parts.scheme.lower()
    if not scheme or "://" not in url[: len(scheme) + 3]:
        raise UrlRejected(
            "malformed", f"not an absolute URL (scheme://...): {shown!r}", permission=False
        )
    if scheme not in SCHEMES:
        raise UrlRejected(
            "scheme",
            f"scheme {scheme!r} is not supported (use one of {', '.join(sorted(SCHEMES))})",
            permission=False,
        )
    if scheme == "file":
        path = _check_file(url, parts, shown, allowed_dirs)
        return PullUrl(
            url=url,
            masked=shown,
            scheme=scheme,
            host=None,
            port=None,
            path=path,
            target="file://" + quote(str(path)),
        )
    host, port = _check_host(parts, shown, allowed_hosts)
    return PullUrl(
        url=url, masked=shown, scheme=scheme, host=host, port=port, path=None, target=url
    )


def host_allowed(host: str, allowed_hosts: Sequence[str]) -> bool:
    """Whether a (lower-case, bracket-free) host matches one of the patterns.

    A pattern that is neither an address, a network, ``*`` nor ``*.suffix`` is an exact
    host name. Patterns are compared case-insensitively and without a trailing dot.
    """
    address = _ip(host)
    for raw in allowed_hosts:
        pattern = raw.strip().lower().rstrip(".")
        if not pattern:
            continue
        if pattern == "*":
            return True
        if pattern.startswith("*."):
            if address is None and host.endswith(pattern[1:]):
                return True
            continue
        if "/" in pattern:
            try:
                network = ipaddress.ip_network(pattern, strict=False)
            except ValueError:
                continue
            if address is not None and address.version == network.version and address in network:
                return True
            continue
        pattern_address = _ip(pattern.strip("[]"))
        if pattern_address is not None:
            if address is not None and address == pattern_address:
                return True
            continue
        if host == pattern:
            return True
    return False


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    # ::ffff:10.0.0.1 is 10.0.0.1 to the kernel; compare it as such.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _check_host(
    parts: SplitResult, shown: str, allowed_hosts: Sequence[str]
) -> tuple[str, int | None]:
    try:
        hostname = parts.hostname
        port = parts.port
    except ValueError as error:
        raise UrlRejected("malformed", f"malformed URL {shown!r}: {error}", False) from None
    if not hostname:
        raise UrlRejected("no_host", f"the URL names no host: {shown!r}", permission=False)
    if "\\" in (parts.netloc or ""):
        # Browsers read a backslash as "/", FFmpeg and urlsplit do not: refuse the ambiguity.
        raise UrlRejected("malformed", f"backslash in the host part of {shown!r}", False)
    host = hostname.rstrip(".")
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise UrlRejected("malformed", f"invalid host name in {shown!r}", False) from None
    host = host.lower()
    if "%" in host:
        # IPv6 zone ids (fe80::1%eth0) select an interface: nothing a camera needs.
        raise UrlRejected("malformed", f"invalid host in {shown!r}", permission=False)
    if not allowed_hosts:
        raise UrlRejected(
            "host_not_allowed",
            "no network sources are allowed here (the allowed host list is empty)",
            permission=True,
        )
    if not host_allowed(host, allowed_hosts):
        raise UrlRejected(
            "host_not_allowed", f"host {host!r} is not in the allowed host list", True
        )
    return host, port


def _check_file(
    url: str, parts: SplitResult, shown: str, allowed_dirs: Sequence[str | Path]
) -> Path:
    if parts.netloc not in ("", "localhost"):
        raise UrlRejected(
            "malformed",
            f"file URLs must name a local path (file:///path), not a host: {shown!r}",
            permission=False,
        )
    if "?" in url or "#" in url:
        raise UrlRejected(
            "malformed", f"file URLs take no query or fragment: {shown!r}", permission=False
        )
    raw = unquote(parts.path)
    if "\x00" in raw or not raw.startswith("/"):
        raise UrlRejected(
            "malformed", f"file URLs need an absolute path: {shown!r}", permission=False
        )
    if not allowed_dirs:
        raise UrlRejected(
            "path_not_allowed",
            "no local files are allowed here (the allowed directory list is empty)",
            permission=True,
        )
    # resolve() follows every symbolic link and removes "..", so "/allowed/../etc/x" and a
    # link inside an allowed directory pointing outside it are both judged by where they
    # really lead. (The message names the path as given: where links lead is ours to know.)
    resolved = Path(raw).resolve()
    for directory in allowed_dirs:
        if resolved.is_relative_to(Path(directory).resolve()):
            return resolved
    raise UrlRejected(
        "path_not_allowed", f"{raw!r} is not under an allowed directory", permission=True
    )
