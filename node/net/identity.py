"""The node's libp2p identity (Ed25519) doubles as its signing key for verification records.

An Ed25519 libp2p peer id embeds the public key itself (an identity multihash of the
protobuf-encoded key), so anyone who knows a peer id can check that peer's signature
with nothing else: a record signed by peer X cannot be forged by anyone without X's
private key, and the same key authenticates X's p2p streams.
"""

from __future__ import annotations

import os
from pathlib import Path

import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

# libp2p crypto.proto: message PrivateKey/PublicKey { KeyType Type = 1; bytes Data = 2; }, Ed25519 = 1
_ED25519_TYPE = b"\x08\x01"
_PUBLIC_PROTO_PREFIX = _ED25519_TYPE + b"\x12\x20"  # field 2, 32 bytes
_PRIVATE_PROTO_PREFIX = _ED25519_TYPE + b"\x12\x40"  # field 2, 64 bytes (seed + public key)
_IDENTITY_MULTIHASH = b"\x00"


class IdentityError(RuntimeError):
    """The identity file cannot be used (unreadable, or not an Ed25519 libp2p key)."""


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def peer_id_of(public_key: bytes) -> str:
    proto = _PUBLIC_PROTO_PREFIX + public_key
    return base58.b58encode(_IDENTITY_MULTIHASH + bytes([len(proto)]) + proto).decode()


def public_key_of(peer_id: str) -> Ed25519PublicKey | None:
    """The Ed25519 key a peer id embeds, or None (another key type, or not a peer id)."""
    try:
        raw = base58.b58decode(peer_id)
    except ValueError:
        return None
    expected = 2 + len(_PUBLIC_PROTO_PREFIX) + 32
    if len(raw) != expected or raw[:2] != _IDENTITY_MULTIHASH + bytes([expected - 2]):
        return None
    if raw[2:6] != _PUBLIC_PROTO_PREFIX:
        return None
    return Ed25519PublicKey.from_public_bytes(raw[6:])


def verify(peer_id: str, message: bytes, signature: bytes) -> bool:
    key = public_key_of(peer_id)
    if key is None:
        return False
    try:
        key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


class Identity:
    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.peer_id = peer_id_of(_raw_public(private_key.public_key()))

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: str | Path) -> Identity:
        """Read a libp2p Ed25519 key file; create one (mode 0600) if the file does not exist."""
        path = Path(path)
        if not path.exists():
            identity = cls.generate()
            identity.save(path)
            return identity
        try:
            data = path.read_bytes()
        except OSError as error:
            raise IdentityError(f"cannot read identity {path}: {error}") from error
        if len(data) != len(_PRIVATE_PROTO_PREFIX) + 64 or not data.startswith(_PRIVATE_PROTO_PREFIX):
            raise IdentityError(
                f"identity {path} is not an Ed25519 libp2p key (gossiptrain signs verification records with it; "
                "an RSA key from hivemind cannot be used: move it away and a new Ed25519 one is created)")
        body = data[len(_PRIVATE_PROTO_PREFIX):]
        identity = cls(Ed25519PrivateKey.from_private_bytes(body[:32]))
        if _raw_public(identity._key.public_key()) != body[32:]:
            raise IdentityError(f"identity {path} is corrupt: its public half does not match the private key")
        return identity

    def save(self, path: str | Path) -> None:
        path = Path(path)
        seed = self._key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                       serialization.NoEncryption())
        temporary = path.with_name(path.name + ".tmp")
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as file:
                file.write(_PRIVATE_PROTO_PREFIX + seed + _raw_public(self._key.public_key()))
            os.replace(temporary, path)
        except OSError as error:
            raise IdentityError(f"cannot write identity {path}: {error}") from error

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)
