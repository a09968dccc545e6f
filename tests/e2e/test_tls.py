"""TLS on every hop, with test certificate authorities (trustme): internal services
require a client certificate from their CA, the gateway serves TLS to callers and calls
the internal services with its own certificate, a rotated certificate is served without
a restart, and plaintext is refused anywhere but on a loopback address."""

from __future__ import annotations

import asyncio
import http.client
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import nats
import numpy as np
import psycopg
import pytest
import trustme
from conftest import (
    MILVUS_VENV,
    SHARED_DATA,
    TRITON_VENV,
    Stack,
    inference_overrides,
    start_service,
    start_stack,
    stop_stack,
)
from cryptography import x509
from facegrid import tls
from facegrid.audit_postgres import PostgresAuditLog
from facegrid.auth import bearer_metadata
from facegrid.config import InferenceBackendKind, InferenceSettings, StoreSettings, TlsSettings
from facegrid.errors import ServiceError
from facegrid.inference import TritonBackend
from facegrid.internal.v1 import search_pb2, search_pb2_grpc
from facegrid.v1 import common_pb2, face_service_pb2, face_service_pb2_grpc, resources_pb2
from facegrid_harness.milvus_server import MilvusServer
from facegrid_harness.nats_server import NatsServer
from facegrid_harness.triton_server import TritonInstall, TritonServer
from facegrid_ingest.event_log import EventLog
from facegrid_search.store import MilvusStore
from grpc_helpers import rpc_error

from tests.e2e.audit_helpers import append
from tests.e2e.postgres_server import PostgresServer, find_bindir

F = face_service_pb2
PHOTO = SHARED_DATA / "faces" / "misc" / "lin-manuel-miranda.png"
HOST = "127.0.0.1"


@dataclass
class Pem:
    """A certificate chain and its key, as files."""

    cert: Path
    key: Path

    def credentials(self, ca: Path) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            ca.read_bytes(), self.key.read_bytes(), self.cert.read_bytes()
        )


def _write(leaf: trustme.LeafCert, folder: Path, name: str) -> Pem:
    pem = Pem(folder / f"{name}.crt", folder / f"{name}.key")
    leaf.private_key_pem.write_to_path(str(pem.key))
    leaf.cert_chain_pems[0].write_to_path(str(pem.cert))
    for extra in leaf.cert_chain_pems[1:]:
        extra.write_to_path(str(pem.cert), append=True)
    return pem


@dataclass
class Pki:
    folder: Path
    ca: trustme.CA
    ca_file: Path
    server: Pem
    client: Pem
    other_ca_file: Path
    other_client: Pem  # issued by another CA
    expired_client: Pem

    def server_settings(self, mutual: bool = True) -> list[str]:
        settings = [f"tls.cert_file={self.server.cert}", f"tls.key_file={self.server.key}"]
        return [*settings, f"tls.client_ca_file={self.ca_file}"] if mutual else settings

    def client_tls(self, pem: Pem) -> TlsSettings:
        """A caller's tls.* settings: this CA, presenting ``pem``."""
        return TlsSettings(
            ca_file=str(self.ca_file),
            client_cert_file=str(pem.cert),
            client_key_file=str(pem.key),
        )

    def client_settings(self) -> list[str]:
        return [
            f"tls.ca_file={self.ca_file}",
            f"tls.client_cert_file={self.client.cert}",
            f"tls.client_key_file={self.client.key}",
        ]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    other.cert_pem.write_to_path(str(folder / "other-ca.pem"))
    past = datetime.now(UTC) - timedelta(days=2)
    return Pki(
        folder,
        ca,
        folder / "ca.pem",
        _write(ca.issue_cert(HOST, "localhost"), folder, "server"),
        _write(ca.issue_cert("gateway.facegrid.test"), folder, "client"),
        folder / "other-ca.pem",
        _write(other.issue_cert("intruder"), folder, "other-client"),
        _write(
            ca.issue_cert("late", not_before=past, not_after=past + timedelta(days=1)),
            folder,
            "expired-client",
        ),
    )


def _list_collections(address: str, credentials: grpc.ChannelCredentials | None) -> None:
    channel = (
        grpc.insecure_channel(address)
        if credentials is None
        else grpc.secure_channel(address, credentials)
    )
    with channel:
        search_pb2_grpc.SearchServiceStub(channel).ListCollections(
            search_pb2.ListCollectionsRequest(), timeout=5
        )


def _served_serial(port: int, pki: Pki) -> int:
    """The serial number of the certificate the server presents to a new connection."""
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    context.load_cert_chain(str(pki.client.cert), str(pki.client.key))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((HOST, port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=HOST) as wrapped,
    ):
        der = wrapped.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_an_internal_service_serves_only_callers_with_a_certificate_from_its_ca(
    pki: Pki, tmp_path: Path
) -> None:
    good = pki.client.credentials(pki.ca_file)
    service = start_service(
        "search",
        [f"store.uri={tmp_path / 'facegrid.db'}", *pki.server_settings()],
        tmp_path,
        credentials=good,
    )
    try:
        _list_collections(service.address, good)
        refused = {
            "plaintext": None,
            "TLS without a client certificate": grpc.ssl_channel_credentials(
                pki.ca_file.read_bytes()
            ),
            "a client certificate of another CA": pki.other_client.credentials(pki.ca_file),
            "an expired client certificate": pki.expired_client.credentials(pki.ca_file),
            # The caller checks the server too: one that trusts another CA refuses it.
            "a server its CA did not issue": pki.client.credentials(pki.other_ca_file),
        }
        for what, credentials in refused.items():
            error = rpc_error(lambda c=credentials: _list_collections(service.address, c))
            assert error.code() == grpc.StatusCode.UNAVAILABLE, what
        _list_collections(service.address, good)  # and it is still serving
        assert "(TLS)" in service.log()
    finally:
        assert service.stop() == 0


def test_a_rotated_certificate_is_served_without_a_restart_and_fails_no_call(
    pki: Pki, tmp_path: Path
) -> None:
    folder = tmp_path / "certs"
    folder.mkdir()
    served = _write(pki.ca.issue_cert(HOST), folder, "served")
    good = pki.client.credentials(pki.ca_file)
    service = start_service(
        "search",
        [
            f"store.uri={tmp_path / 'facegrid.db'}",
            f"tls.cert_file={served.cert}",
            f"tls.key_file={served.key}",
            f"tls.client_ca_file={pki.ca_file}",
            # Clients reconnect every second, so new handshakes happen all the time.
            "server.max_connection_age_s=1",
        ],
        tmp_path,
        credentials=good,
    )
    port = int(service.address.rsplit(":", 1)[1])
    before = _served_serial(port, pki)
    outcomes: list[str] = []
    stop = threading.Event()

    def load() -> None:
        with grpc.secure_channel(service.address, good) as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            while not stop.is_set():
                try:
                    stub.ListCollections(search_pb2.ListCollectionsRequest(), timeout=5)
                    outcomes.append("ok")
                except grpc.RpcError as error:
                    outcomes.append(f"{error.code()}: {error.details()}")
                time.sleep(0.02)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        time.sleep(1.5)
        # A rotation as a secret mount does it, one file after the other: for a moment
        # the key is new and the certificate old, which must not be served.
        rotated = pki.ca.issue_cert(HOST)
        rotated.private_key_pem.write_to_path(str(served.key))
        time.sleep(2.5)  # connections renewed meanwhile still get the old pair
        rotated.cert_chain_pems[0].write_to_path(str(served.cert))
        deadline = time.monotonic() + 10
        while (after := _served_serial(port, pki)) == before and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.5)  # calls go on over connections with the new certificate
    finally:
        stop.set()
        worker.join(30)
        code = service.stop()
    failures = [o for o in outcomes if o != "ok"]
    assert not failures, f"{len(failures)} of {len(outcomes)} calls failed: {failures[:3]}"
    assert len(outcomes) > 50
    assert after != before
    assert "reloaded the TLS certificate" in service.log()
    assert "not reloading the TLS certificate yet" in service.log()
    assert code == 0


def test_plaintext_is_refused_beyond_the_loopback_interface(tmp_path: Path) -> None:
    assert all(tls.is_loopback(h) for h in ("127.0.0.1", "127.0.0.3", "::1", "localhost"))
    assert not any(tls.is_loopback(h) for h in ("0.0.0.0", "10.1.2.3", "", "facegrid"))
    command = [sys.executable, "-m", "facegrid.cli", "serve", "search", "--port", "0"]
    settings = ["server.host=0.0.0.0", "search.metrics_port=0", f"store.uri={tmp_path}/x.db"]
    for setting in settings:
        command += ["--set", setting]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "refusing to serve plaintext on 0.0.0.0" in done.stdout + done.stderr


@pytest.fixture(scope="module")
def tls_stack(
    pki: Pki, model_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The four services over TLS: the internal ones require the gateway's client
    certificate; the gateway serves TLS to callers (who bring tokens, not certificates)."""
    stack = start_stack(
        [
            *inference_overrides("local", model_repo, None),
            *pki.server_settings(),
            *pki.client_settings(),
        ],
        tmp_path_factory.mktemp("tls-stack"),
        extra={"gateway": ["tls.client_ca_file="]},
    )
    yield stack
    stop_stack(stack)


@pytest.mark.skipif(not PHOTO.is_file(), reason=f"{PHOTO} is missing")
def test_every_hop_of_a_search_is_tls(pki: Pki, tls_stack: Stack) -> None:
    group, token = tls_stack.group, tls_stack.token
    gateway = tls_stack.address
    caller = grpc.ssl_channel_credentials(pki.ca_file.read_bytes())  # no certificate
    md = bearer_metadata(token)
    with grpc.secure_channel(gateway, caller) as channel:
        api = face_service_pb2_grpc.FaceServiceStub(channel)
        api.CreateCollection(
            F.CreateCollectionRequest(collection_id="tls", collection=resources_pb2.Collection()),
            metadata=md,
            timeout=60,
        )
        photo = PHOTO.read_bytes()
        api.IndexFaces(
            F.IndexFacesRequest(parent="collections/tls", image=photo), metadata=md, timeout=60
        )
        context = common_pb2.IdentificationContext(
            purpose=common_pb2.IdentificationContext.PURPOSE_TESTING, case_id="TLS-1"
        )
        reply = api.SearchFacesByImage(
            F.SearchFacesByImageRequest(parent="collections/tls", image=photo, context=context),
            metadata=md,
            timeout=60,
        )
        assert reply.face_matches
    with grpc.insecure_channel(gateway) as plain:
        error = rpc_error(
            lambda: face_service_pb2_grpc.FaceServiceStub(plain).ListCollections(
                F.ListCollectionsRequest(), metadata=md, timeout=5
            )
        )
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    # The internal services refuse the caller's plaintext and its certificate-less TLS.
    search = group.services["search"].address
    for credentials in (None, caller):
        error = rpc_error(lambda c=credentials: _list_collections(search, c))  # type: ignore[misc]
        assert error.code() == grpc.StatusCode.UNAVAILABLE


def _plaintext_get(host: str, port: int, path: str) -> int:
    plain = http.client.HTTPConnection(host, port, timeout=10)
    try:
        plain.request("GET", path)
        return plain.getresponse().status
    finally:
        plain.close()


def test_the_console_serves_https_and_calls_the_gateway_over_tls(
    pki: Pki, tls_stack: Stack, tmp_path: Path
) -> None:
    """The console with the gateway's TLS settings: HTTPS to browsers (a Secure session
    cookie, HSTS), TLS to the gateway, whose acceptance of the token is what signs in."""
    console = tls_stack.group.start(
        "console",
        port=0,
        extra=["tls.client_ca_file=", f"console.session_key_file={tmp_path / 'session.key'}"],
    )
    try:
        context = ssl.create_default_context(cafile=str(pki.ca_file))
        host, port = console.address.rsplit(":", 1)
        connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=30)
        connection.request("GET", "/sign-in")
        page = connection.getresponse()
        html = page.read().decode()
        assert page.status == 200
        assert page.getheader("strict-transport-security")
        nonce = page.getheader("set-cookie", "").split(";", 1)[0]
        assert "; secure" in page.getheader("set-cookie", "").lower()
        csrf = re.search(r'name="csrf" value="([^"]+)"', html)
        assert csrf is not None
        form = urllib.parse.urlencode({"csrf": csrf.group(1), "token": tls_stack.token})
        connection.request(
            "POST",
            "/sign-in",
            body=form,
            headers={"Content-Type": "application/x-www-form-urlencoded", "Cookie": nonce},
        )
        signed = connection.getresponse()
        signed.read()
        connection.close()
        assert signed.status == 303, signed.status  # the gateway, over TLS, accepted it
        session = [v for k, v in signed.getheaders() if k.lower() == "set-cookie"]
        assert any(v.startswith("facegrid_session=") and "Secure" in v for v in session)
        with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
            _plaintext_get(host, int(port), "/sign-in")
    finally:
        tls_stack.group.services.pop(console.name)
        console.process.terminate()
        assert console.process.wait(timeout=30) == 0


# ---------------------------------------------------------------- NATS


def test_nats_with_mutual_tls_serves_only_clients_with_a_certificate_of_its_ca(
    pki: Pki, tmp_path: Path
) -> None:
    """The event store's hop: nats-server with --tlsverify, ingest's client context
    (facegrid.tls.client_ssl_context) from the same tls.* settings as its gRPC calls."""
    client = pki.client_tls(pki.client)
    intruder = pki.client_tls(pki.other_client)
    with NatsServer(
        tmp_path / "nats", tls_cert=pki.server.cert, tls_key=pki.server.key, tls_ca=pki.ca_file
    ) as server:
        assert server.url.startswith("tls://")

        async def body() -> None:
            nc = await nats.connect(
                server.url, tls=tls.client_ssl_context(client), max_reconnect_attempts=0
            )
            try:
                events = await EventLog.open(nc, max_age_s=60, max_bytes=1 << 20)
                await events.publish("proc-a", "cam-1", str(uuid.uuid4()), b"over tls")
                page, _ = await events.page(processor_id="proc-a", limit=10)
                assert [e.payload for e in page] == [b"over tls"]
            finally:
                await nc.close()
            for refused in (
                None,  # plaintext
                tls.client_ssl_context(TlsSettings(ca_file=str(pki.ca_file))),  # no cert
                tls.client_ssl_context(intruder),  # a certificate of another CA
            ):
                with pytest.raises(Exception):  # noqa: B017, PT011 (nats-py's errors vary)
                    await nats.connect(
                        server.url.replace("tls://", "nats://") if refused is None else server.url,
                        tls=refused,
                        connect_timeout=2,
                        max_reconnect_attempts=0,
                        allow_reconnect=False,
                    )

        asyncio.run(asyncio.wait_for(body(), 60))
    # Without a CA, ingest connects in plaintext only to a loopback address.
    tls.check_plaintext_client_allowed("ingest", "nats://127.0.0.1:4222")
    with pytest.raises(tls.PlaintextRefusedError):
        tls.check_plaintext_client_allowed("ingest", "nats://nats.facegrid.svc:4222")


# ---------------------------------------------------------------- Triton


def test_triton_with_mutual_tls_serves_only_clients_with_a_certificate_of_its_ca(
    pki: Pki, model_repo: Path, tmp_path: Path
) -> None:
    """Detection's and embedding's hop to Triton: tritonserver with --grpc-use-ssl-mutual,
    the inference backend's channel from the same tls.* settings as any other call."""
    settings = InferenceSettings(
        model_repository=model_repo, backend=InferenceBackendKind.TRITON, triton_timeout_s=30
    )
    client = pki.client_tls(pki.client)
    intruder = pki.client_tls(pki.other_client)
    chips = np.zeros((1, 150, 150, 3), np.uint8)
    with TritonServer(
        TritonInstall.discover(TRITON_VENV),
        model_repo,
        tmp_path / "triton",
        tls_cert=pki.server.cert,
        tls_key=pki.server.key,
        tls_ca=pki.ca_file,
    ) as server:
        url = settings.model_copy(update={"triton_url": server.grpc_url})

        async def embed(tls_settings: TlsSettings) -> object:
            backend = TritonBackend(url, tls_settings)
            try:
                return await backend.infer("face_embedder", {"chips": chips}, ["descriptors"])
            finally:
                await backend.close()

        result = asyncio.run(embed(client))
        assert result["descriptors"].shape == (1, 128)  # type: ignore[index]
        for refused in (TlsSettings(), TlsSettings(ca_file=str(pki.ca_file)), intruder):
            with pytest.raises(ServiceError) as caught:
                asyncio.run(embed(refused))
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE, caught.value
    # Without a CA, a Triton elsewhere than on loopback is refused at start.
    with pytest.raises(tls.PlaintextRefusedError):
        TritonBackend(
            settings.model_copy(update={"triton_url": "triton.facegrid:8001"}), TlsSettings()
        )


# ---------------------------------------------------------------- Milvus


def test_search_reaches_a_milvus_server_over_mutual_tls(pki: Pki, tmp_path: Path) -> None:
    """The search service's hop to a Milvus server (tlsMode 2): pymilvus over mutual TLS
    from the tls.* settings; the server refuses plaintext, no client certificate and a
    certificate of another CA (checked with plain gRPC channels: pymilvus reuses one
    connection per address within a process)."""
    client = pki.client_tls(pki.client)
    with MilvusServer(
        MILVUS_VENV,
        tmp_path / "milvus",
        tls_cert=pki.server.cert,
        tls_key=pki.server.key,
        tls_ca=pki.ca_file,
        tls_client=(pki.client.cert, pki.client.key),
    ) as server:
        assert server.uri.startswith("https://")
        store = MilvusStore(StoreSettings(uri=server.uri), True, client)
        try:
            assert store.list_specs() == []  # the registry was created over TLS
        finally:
            store.close()
        address = server.uri.removeprefix("https://")
        ca = pki.ca_file.read_bytes()
        for channel in (
            grpc.insecure_channel(address),
            grpc.secure_channel(address, grpc.ssl_channel_credentials(ca)),
            grpc.secure_channel(address, pki.other_client.credentials(pki.other_ca_file)),
            grpc.secure_channel(address, pki.other_client.credentials(pki.ca_file)),
        ):
            with channel:
                check = channel.unary_unary(
                    "/milvus.proto.milvus.MilvusService/CheckHealth",
                    request_serializer=lambda _: b"",
                    response_deserializer=lambda data: data,
                )
                with pytest.raises(grpc.RpcError):
                    check(None, timeout=3)
    with pytest.raises(tls.PlaintextRefusedError):
        MilvusStore(StoreSettings(uri="http://milvus.facegrid:19530"), True, TlsSettings())


# ---------------------------------------------------------------- PostgreSQL


@pytest.mark.skipif(find_bindir() is None, reason="no PostgreSQL server")
def test_the_audit_log_reaches_postgresql_over_verified_tls(pki: Pki) -> None:
    """The audit (and quota) database's hop: libpq's own TLS, from the URL
    (sslmode=verify-full, sslrootcert=the CA); a server that takes only TLS."""
    with PostgresServer(tls=(pki.server.cert, pki.server.key)) as server:
        verified = f"{server.url}?sslmode=verify-full&sslrootcert={pki.ca_file}"
        log = PostgresAuditLog(verified)
        try:
            written = append(log, 2)
            assert [r.sequence_number for r in written] == [1, 2]
        finally:
            log.close()
        with psycopg.connect(verified) as connection:
            row = connection.execute(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            ).fetchone()
            assert row == (True,)
        for refused in (
            f"{server.url}?sslmode=disable",  # plaintext: the server refuses
            f"{server.url}?sslmode=verify-full&sslrootcert={pki.other_ca_file}",  # not its CA
        ):
            with pytest.raises(psycopg.OperationalError):
                psycopg.connect(refused, connect_timeout=5).close()
