"""Signed checkpoints of the audit chain's head, so the database's owner cannot rewrite it.

The hash chain shows that records were changed, unless whoever runs the database
rewrites the whole chain from the change onwards (the owner can disable triggers).
A checkpoint is the head (sequence number and record hash) signed with an Ed25519 key
that the gateway holds and the database never sees; anyone who kept a checkpoint can
later check that the chain still holds that record with that hash
(``facegrid audit verify --checkpoint FILE --public-key FILE``).

The text is a signed note in the style of C2SP's checkpoints (as Go's sumdb and
Trillian use them)::

    facegrid-audit
    1234
    <base64 of record 1234's record_hash; 32 zero bytes for an empty log>
    2026-12-02T03:04:05Z

    — facegrid-audit <base64 of key id (4 bytes) and signature (64 bytes)>

The signature covers the body (the lines before the blank line, each ending in a
newline); the key id is the first 4 bytes of SHA-256 over the key name, a newline, 0x01
(Ed25519) and the raw public key.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ORIGIN = "facegrid-audit"
KEY_NAME = ORIGIN
_ED25519 = b"\x01"
_SIGNATURE_PREFIX = "\u2014 "  # an em dash and a space, as in C2SP signed notes


class CheckpointError(ValueError):
    """Not a checkpoint, a signature that does not verify, or a key that is not Ed25519."""


@dataclass(frozen=True)
class Checkpoint:
    sequence_number: int
    record_hash: bytes
    time: datetime

    def body(self) -> str:
        stamp = self.time.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        # An empty log (sequence 0) has no head: 32 zero bytes stand for its hash.
        digest = base64.b64encode(self.record_hash or bytes(32)).decode()
        return f"{ORIGIN}\n{self.sequence_number}\n{digest}\n{stamp}\n"


def key_id(public_key: Ed25519PublicKey) -> bytes:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(KEY_NAME.encode() + b"\n" + _ED25519 + raw).digest()[:4]


def sign(checkpoint: Checkpoint, key: Ed25519PrivateKey) -> str:
    """The signed note of ``checkpoint``."""
    body = checkpoint.body()
    signature = key.sign(body.encode())
    blob = base64.b64encode(key_id(key.public_key()) + signature).decode()
    return f"{body}\n{_SIGNATURE_PREFIX}{KEY_NAME} {blob}\n"


def verify(note: str, public_key: Ed25519PublicKey) -> Checkpoint:
    """The checkpoint in ``note`` if ``public_key`` signed it; CheckpointError otherwise."""
    body, separator, signatures = note.partition("\n\n")
    if not separator:
        raise CheckpointError("not a signed checkpoint: no blank line before the signature")
    body += "\n"
    lines = body.splitlines()
    if len(lines) != 4 or lines[0] != ORIGIN:
        raise CheckpointError(f"not a {ORIGIN} checkpoint")
    wanted = key_id(public_key)
    for line in signatures.splitlines():
        if not line.startswith(_SIGNATURE_PREFIX):
            continue
        name, _, encoded = line.removeprefix(_SIGNATURE_PREFIX).partition(" ")
        try:
            blob = base64.b64decode(encoded, validate=True)
        except ValueError:
            continue
        if name != KEY_NAME or blob[:4] != wanted:
            continue
        try:
            public_key.verify(blob[4:], body.encode())
        except InvalidSignature as exc:
            raise CheckpointError("the checkpoint's signature does not verify") from exc
        try:
            return Checkpoint(
                sequence_number=int(lines[1]),
                record_hash=base64.b64decode(lines[2], validate=True),
                time=datetime.strptime(lines[3], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC),
            )
        except ValueError as exc:
            raise CheckpointError(f"a malformed checkpoint: {exc}") from exc
    raise CheckpointError("the checkpoint carries no signature by this key")


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The signing key in ``path``; a new one (mode 0600, public key beside it) if missing."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return load_or_create_key(path)  # another replica made it first
        with os.fdopen(descriptor, "wb") as out:
            out.write(pem)
        public_path(path).write_bytes(public_pem(key.public_key()))
        return key
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(loaded, Ed25519PrivateKey):
        raise CheckpointError(f"{path} does not hold an Ed25519 private key")
    return loaded


def public_path(private_path: Path) -> Path:
    return private_path.with_name(private_path.name + ".pub")


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_public_key(data: bytes) -> Ed25519PublicKey:
    loaded = serialization.load_pem_public_key(data)
    if not isinstance(loaded, Ed25519PublicKey):
        raise CheckpointError("not an Ed25519 public key")
    return loaded
