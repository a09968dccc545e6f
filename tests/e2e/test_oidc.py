"""OIDC access tokens: checked against a real JWKS server on 127.0.0.1 that rotates its
keys, and accepted by a running gateway, which re-reads its token file on SIGHUP."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from conftest import start_service
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from facegrid.auth import SCOPE_AUDIT, SCOPE_READ, bearer_metadata, create_token
from facegrid.config import OidcSettings
from facegrid.oidc import OidcVerifier
from facegrid.v1 import face_service_pb2, face_service_pb2_grpc

F = face_service_pb2
ISSUER = "https://idp.agency.test/realms/police"


class Jwks:
    """A JWKS endpoint whose key set the test changes; counts its fetches."""

    def __init__(self) -> None:
        self.keys: dict[str, Any] = {}  # kid -> private key
        self.fetches = 0
        self.delay_s = 0.0
        jwks = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                jwks.fetches += 1
                time.sleep(jwks.delay_s)
                body = json.dumps({"keys": [jwks.public(k) for k in list(jwks.keys)]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/certs"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add_rsa(self, kid: str) -> None:
        self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def add_ec(self, kid: str) -> None:
        self.keys[kid] = ec.generate_private_key(ec.SECP256R1())

    def public(self, kid: str) -> dict[str, Any]:
        key = self.keys[kid]
        if isinstance(key, rsa.RSAPrivateKey):
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
            alg = "RS256"
        else:
            jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
            alg = "ES256"
        return {**jwk, "kid": kid, "alg": alg, "use": "sig"}

    def token(self, kid: str, **claims: Any) -> str:
        now = int(time.time())
        body = {
            "iss": ISSUER,
            "aud": "facegrid",
            "sub": "officer-4711",
            "scope": f"openid {SCOPE_READ} {SCOPE_AUDIT} email",
            "iat": now,
            "exp": now + 300,
            **claims,
        }
        key = self.keys[kid]
        alg = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"
        return jwt.encode(body, key, algorithm=alg, headers={"kid": kid})

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def jwks() -> Iterator[Jwks]:
    server = Jwks()
    server.add_rsa("k1")
    yield server
    server.close()


def settings(jwks: Jwks, **fields: Any) -> OidcSettings:
    return OidcSettings(issuer=ISSUER, jwks_url=jwks.url, **fields)


def check(verifier: OidcVerifier, token: str) -> Any:
    return asyncio.run(verifier.authenticate(token))


def test_a_valid_token_names_its_caller_and_its_facegrid_scopes(jwks: Jwks) -> None:
    principal = check(OidcVerifier(settings(jwks)), jwks.token("k1"))
    assert principal.name == "officer-4711"
    assert principal.scopes == {SCOPE_READ, SCOPE_AUDIT}  # "openid", "email" are not ours
    jwks.add_ec("e1")
    listed = jwks.token("e1", scope=[SCOPE_READ], sub="analyst-2")
    principal = check(OidcVerifier(settings(jwks)), listed)
    assert (principal.name, principal.scopes) == ("analyst-2", {SCOPE_READ})
    assert principal.purposes == frozenset()  # no claim: any purpose
    limited = jwks.token("k1", facegrid_purposes="PURPOSE_MISSING_PERSON PURPOSE_MADE_UP")
    assert check(OidcVerifier(settings(jwks)), limited).purposes == {"PURPOSE_MISSING_PERSON"}


def test_tokens_that_do_not_hold_are_refused(jwks: Jwks) -> None:
    verifier = OidcVerifier(settings(jwks))
    now = int(time.time())
    public_pem = (
        jwks.keys["k1"]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    refused = {
        "another issuer": jwks.token("k1", iss="https://evil.test"),
        "another audience": jwks.token("k1", aud="someone-else"),
        "expired": jwks.token("k1", exp=now - 120),
        "not yet valid": jwks.token("k1", nbf=now + 120),
        "no exp": jwt.encode(
            {"iss": ISSUER, "aud": "facegrid", "sub": "x"},
            jwks.keys["k1"],
            algorithm="RS256",
            headers={"kid": "k1"},
        ),
        "alg none": jwt.encode(
            {"iss": ISSUER, "aud": "facegrid", "sub": "x", "exp": now + 60},
            None,
            algorithm="none",
            headers={"kid": "k1"},
        ),
        # The public key used as an HMAC secret: refused by the pinned algorithms.
        "HS256 with the public key": _hs256(public_pem, now),
        "an unknown key": _other_key_token(now),
        "tampered": jwks.token("k1")[:-4] + "AAAA",
        "not a JWT": "fgt_not-a-jwt",
    }
    for what, token in refused.items():
        assert check(verifier, token) is None, what
    # Within the leeway, a just-expired token still holds (clocks differ).
    assert check(verifier, jwks.token("k1", exp=now - 10)) is not None


def _hs256(secret: bytes, now: int) -> str:
    """What PyJWT itself refuses to make: an HMAC token keyed with a public key."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "kid": "k1", "typ": "JWT"}).encode())
    body = b64(json.dumps({"iss": ISSUER, "aud": "facegrid", "sub": "x", "exp": now + 60}).encode())
    signature = hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{b64(signature)}"


def _other_key_token(now: int) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    claims = {"iss": ISSUER, "aud": "facegrid", "sub": "x", "exp": now + 60}
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k-unknown"})


def test_a_rotated_key_set_is_fetched_once_and_retired_keys_stop_working(jwks: Jwks) -> None:
    verifier = OidcVerifier(settings(jwks, jwks_min_refresh_s=0.5))

    async def scenario() -> None:
        old = jwks.token("k1")
        assert await verifier.authenticate(old) is not None
        assert jwks.fetches == 1
        assert await verifier.authenticate(old) is not None  # cached
        assert jwks.fetches == 1
        # The issuer rotates: k2 published, k1 withdrawn.
        jwks.add_rsa("k2")
        del jwks.keys["k1"]
        await asyncio.sleep(0.6)
        new = [jwks.token("k2", sub=f"user-{i}") for i in range(20)]
        found = await asyncio.gather(*(verifier.authenticate(t) for t in new))
        assert all(p is not None for p in found)
        assert jwks.fetches == 2  # twenty tokens, one fetch
        # Made-up key ids cannot make it hammer the issuer.
        for i in range(50):
            forged = jwt.encode(
                {"iss": ISSUER, "aud": "facegrid", "sub": "x", "exp": int(time.time()) + 60},
                jwks.keys["k2"],
                algorithm="RS256",
                headers={"kid": f"made-up-{i}"},
            )
            assert await verifier.authenticate(forged) is None
        assert jwks.fetches <= 3
        await asyncio.sleep(0.6)
        assert await verifier.authenticate(old) is None  # k1 is gone from the new set

    asyncio.run(scenario())


def test_a_slow_issuer_does_not_block_the_event_loop(jwks: Jwks) -> None:
    jwks.delay_s = 1.0
    verifier = OidcVerifier(settings(jwks))

    async def scenario() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        task = asyncio.create_task(ticker())
        assert await verifier.authenticate(jwks.token("k1")) is not None
        task.cancel()
        return ticks

    assert asyncio.run(scenario()) >= 10  # the loop ran on while the fetch waited


def test_the_issuer_is_reached_over_https_only_beyond_loopback() -> None:
    with pytest.raises(ValueError, match="https"):
        OidcVerifier(OidcSettings(issuer=ISSUER, jwks_url="http://idp.agency.test/certs"))
    with pytest.raises(ValueError, match="asymmetric"):
        OidcSettings(issuer=ISSUER, jwks_url="https://x/certs", algorithms=["HS256"])


def test_the_gateway_accepts_oidc_tokens_and_rereads_its_token_file_on_sighup(
    jwks: Jwks, tmp_path: Path
) -> None:
    credentials = tmp_path / "credentials.json"
    first = create_token(credentials, "auditor-1", [SCOPE_AUDIT])
    gateway = start_service(
        "gateway",
        [
            f"gateway.credentials_file={credentials}",
            f"gateway.audit_path={tmp_path / 'audit.db'}",
            f"oidc.issuer={ISSUER}",
            f"oidc.jwks_url={jwks.url}",
        ],
        tmp_path,
    )
    try:
        with grpc.insecure_channel(gateway.address) as channel:
            api = face_service_pb2_grpc.FaceServiceStub(channel)

            def audit_records(token: str) -> list[Any]:
                reply = api.ListAuditRecords(
                    F.ListAuditRecordsRequest(), metadata=bearer_metadata(token), timeout=10
                )
                return list(reply.audit_records)

            audit_records(jwks.token("k1"))
            records = audit_records(first)
            assert records[0].principal == "officer-4711"  # as the token names its caller
            with pytest.raises(grpc.RpcError) as refused:
                audit_records(jwks.token("k1", aud="other"))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # A caller added to the file is known after SIGHUP, without a restart.
            second = create_token(credentials, "auditor-2", [SCOPE_AUDIT])
            with pytest.raises(grpc.RpcError):
                audit_records(second)
            gateway.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while True:
                try:
                    audit_records(second)
                    break
                except grpc.RpcError:
                    assert time.monotonic() < deadline, "SIGHUP did not re-read the file"
                    time.sleep(0.2)
            assert "re-read" in gateway.log()
    finally:
        assert gateway.stop() == 0
