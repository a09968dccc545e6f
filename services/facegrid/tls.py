"""TLS for every facegrid server and channel, from PEM files that may be rotated.

Servers: with ``tls.cert_file`` and ``tls.key_file`` set, a server serves TLS; with
``tls.client_ca_file`` set too, it requires a client certificate issued under that CA
(mutual TLS: what the internal services set). gRPC asks for the certificate on every
new connection; the files are then checked (their sizes and modification times) and
read again when one changed, so a rotated certificate is served without a restart. A
key that does not match its certificate (a rotation half copied) is not used: new
connections keep the previous pair until the files match, with a warning.

Channels: with ``tls.ca_file`` set, a service calls the others over TLS, verifying
their certificates against that bundle, and presents ``tls.client_cert_file`` and
``tls.client_key_file`` when set. They are read when a channel is made: gRPC cannot
reload client credentials in place, so channels made later use a rotated client
certificate.

Without a certificate a server serves plaintext, on a loopback address only (``facegrid
up`` on one machine), and says so when it starts; on any other address it refuses to
start.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
import threading
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from facegrid.config import TlsSettings

log = logging.getLogger(__name__)


class PlaintextRefusedError(RuntimeError):
    """A server without a certificate asked to listen beyond the loopback interface."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_plaintext_allowed(name: str, host: str) -> None:
    """Plaintext only where no other machine can connect; else refuse to start."""
    if not is_loopback(host):
        raise PlaintextRefusedError(
            f"{name}: refusing to serve plaintext on {host}: set tls.cert_file and "
            "tls.key_file (and tls.client_ca_file for an internal service), or bind a "
            "loopback address (server.host=127.0.0.1)"
        )
    log.warning(
        "%s serves PLAINTEXT on %s: reachable from this machine only; set tls.cert_file "
        "and tls.key_file for anything else",
        name,
        host,
    )


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def _check_pair(key_pem: bytes, chain_pem: bytes) -> None:
    """Raise ValueError unless the key is the private key of the chain's first cert."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    certificate = x509.load_pem_x509_certificate(chain_pem)
    encoding, form = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(encoding, form) != certificate.public_key().public_bytes(
        encoding, form
    ):
        raise ValueError("the key does not belong to the certificate")


class RotatingServerCertificate:
    """The server's certificate, key and client CA, read again when a file changes."""

    def __init__(self, settings: TlsSettings) -> None:
        self._settings = settings
        files = (settings.cert_file, settings.key_file, settings.client_ca_file)
        self._paths = [path for path in files if path]
        self._lock = threading.Lock()
        self._stamp = self._stamps()
        self.initial = self._configuration()

    def _stamps(self) -> tuple[tuple[int, int], ...]:
        return tuple((s.st_size, s.st_mtime_ns) for s in (os.stat(p) for p in self._paths))

    def _configuration(self) -> Any:
        key, chain = _read(self._settings.key_file), _read(self._settings.cert_file)
        _check_pair(key, chain)
        roots = _read(self._settings.client_ca_file) if self._settings.client_ca_file else None
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=roots)

    def fetch(self) -> Any:
        """gRPC's per-handshake question: a new configuration, or None to keep the last."""
        with self._lock:
            try:
                stamp = self._stamps()
                if stamp == self._stamp:
                    return None
                configuration = self._configuration()
            except (OSError, ValueError) as error:
                # Mid-rotation (one file written, not the other): keep serving the last.
                log.warning("not reloading the TLS certificate yet: %s", error)
                return None
            self._stamp = stamp
            log.info("reloaded the TLS certificate from %s", self._settings.cert_file)
            return configuration


def server_credentials(settings: TlsSettings) -> grpc.ServerCredentials | None:
    """Credentials of a server (None: plaintext), rotating with their files."""
    if not settings.cert_file:
        return None
    certificate = RotatingServerCertificate(settings)
    return grpc.dynamic_ssl_server_credentials(
        certificate.initial,
        certificate.fetch,
        require_client_authentication=bool(settings.client_ca_file),
    )


def channel_credentials(settings: TlsSettings) -> grpc.ChannelCredentials | None:
    """Credentials of a channel to another facegrid service (None: plaintext)."""
    if not settings.ca_file:
        return None
    key = _read(settings.client_key_file) if settings.client_key_file else None
    chain = _read(settings.client_cert_file) if settings.client_cert_file else None
    if key is not None and chain is not None:
        _check_pair(key, chain)
    return grpc.ssl_channel_credentials(_read(settings.ca_file), key, chain)


def client_ssl_context(settings: TlsSettings) -> ssl.SSLContext | None:
    """An SSL context for a client of a server that is not gRPC (NATS): it verifies the
    server against ``tls.ca_file`` and presents ``tls.client_cert_file`` if set. None
    without a CA (plaintext)."""
    if not settings.ca_file:
        return None
    context = ssl.create_default_context(cafile=settings.ca_file)
    if settings.client_cert_file and settings.client_key_file:
        _check_pair(_read(settings.client_key_file), _read(settings.client_cert_file))
        context.load_cert_chain(settings.client_cert_file, settings.client_key_file)
    return context


def check_plaintext_client_allowed(name: str, url: str) -> None:
    """A plaintext connection (no ``tls.ca_file``) only to a loopback address."""
    host = urllib.parse.urlsplit(url).hostname or ""
    if not is_loopback(host):
        raise PlaintextRefusedError(
            f"{name}: refusing a plaintext connection to {host}: set tls.ca_file (and "
            "tls.client_cert_file/tls.client_key_file where the server asks for them)"
        )


def channel(
    address: str, settings: TlsSettings, options: Sequence[tuple[str, Any]]
) -> grpc.Channel:
    """A blocking channel, over TLS when configured."""
    credentials = channel_credentials(settings)
    if credentials is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, credentials, options=options)


def aio_channel(
    address: str,
    settings: TlsSettings,
    options: Sequence[tuple[str, Any]],
    interceptors: Sequence[Any] = (),
) -> grpc.aio.Channel:
    """An asyncio channel, over TLS when configured."""
    credentials = channel_credentials(settings)
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)
