"""A stand-in OIDC provider on 127.0.0.1, for the console's sign-in flow: no real one
(Keycloak, Dex) can run here. It serves its OpenID configuration, a JWKS, an
authorization endpoint where the person is already signed in (it sends the browser
straight back with a code, as a provider with a live session does) and a token
endpoint that checks the code, the redirect URI, the client and the PKCE verifier
before it issues an access token signed with its RSA key."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

KEY_ID = "console-test-key"


class OidcProvider:
    def __init__(self, issuer: str, client_id: str, subject: str, scopes: list[str]) -> None:
        self.issuer = issuer
        self.client_id = client_id
        self.subject = subject
        self.scopes = scopes
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.codes: dict[str, dict[str, str]] = {}
        self.token_requests: list[dict[str, str]] = []
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                if url.path == "/.well-known/openid-configuration":
                    self._json(200, provider.configuration())
                elif url.path == "/certs":
                    self._json(200, {"keys": [provider.jwk()]})
                elif url.path == "/authorize":
                    self._redirect(provider.authorize(query))
                else:
                    self._json(404, {"error": "not_found"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
                if self.path != "/token":
                    self._json(404, {"error": "not_found"})
                    return
                status, body = provider.exchange(form)
                self._json(status, body)

            def _json(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _redirect(self, location: str) -> None:
                self.send_response(302)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def configuration(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "authorization_endpoint": f"{self.url}/authorize",
            "token_endpoint": f"{self.url}/token",
            "jwks_uri": f"{self.url}/certs",
            "code_challenge_methods_supported": ["S256"],
        }

    def jwk(self) -> dict[str, Any]:
        public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        return {**public, "kid": KEY_ID, "alg": "RS256", "use": "sig"}

    def authorize(self, query: dict[str, str]) -> str:
        redirect = query["redirect_uri"]
        if query.get("client_id") != self.client_id or query.get("code_challenge_method") != "S256":
            return _with(redirect, error="unauthorized_client", state=query.get("state", ""))
        code = secrets.token_urlsafe(16)
        self.codes[code] = {"challenge": query["code_challenge"], "redirect_uri": redirect}
        return _with(redirect, code=code, state=query.get("state", ""))

    def exchange(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        self.token_requests.append(form)
        issued = self.codes.pop(form.get("code", ""), None)  # a code works once
        if issued is None or form.get("client_id") != self.client_id:
            return 400, {"error": "invalid_grant"}
        verifier = form.get("code_verifier", "")
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
        if challenge.decode().rstrip("=") != issued["challenge"]:
            return 400, {"error": "invalid_grant", "error_description": "PKCE"}
        if form.get("redirect_uri") != issued["redirect_uri"]:
            return 400, {"error": "invalid_grant", "error_description": "redirect_uri"}
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "aud": "facegrid",
            "sub": self.subject,
            "scope": " ".join(["openid", *self.scopes]),
            "iat": now,
            "exp": now + 300,
        }
        token = jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": KEY_ID})
        return 200, {"access_token": token, "token_type": "Bearer", "expires_in": 300}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _with(url: str, **query: str) -> str:
    return url + ("&" if "?" in url else "?") + urllib.parse.urlencode(query)
