"""Ed25519 identities: the peer id embeds the key, so a signature checks out against the peer id alone."""

import os
import stat

import pytest

from node.net.identity import Identity, IdentityError, public_key_of, verify


def test_sign_and_verify_against_the_peer_id_alone():
    me, other = Identity.generate(), Identity.generate()
    assert me.peer_id.startswith("12D3KooW") and me.peer_id != other.peer_id
    signature = me.sign(b"vote")
    assert verify(me.peer_id, b"vote", signature)
    assert not verify(me.peer_id, b"vote!", signature)  # tampered message
    assert not verify(other.peer_id, b"vote", signature)  # someone else's name
    assert not verify(me.peer_id, b"vote", signature[:-1] + bytes([signature[-1] ^ 1]))
    assert not verify("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", b"vote", signature)  # RSA-style id
    assert public_key_of("not base58 0OIl") is None


def test_save_and_load(tmp_path):
    path = tmp_path / "id.key"
    created = Identity.load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = Identity.load_or_create(path)
    assert loaded.peer_id == created.peer_id
    assert verify(created.peer_id, b"x", loaded.sign(b"x"))
    nested = Identity.load_or_create(tmp_path / "keys" / "node" / "id.key")  # parent dirs are created
    assert Identity.load_or_create(tmp_path / "keys" / "node" / "id.key").peer_id == nested.peer_id
    (tmp_path / "file").write_text("")
    with pytest.raises(IdentityError, match="cannot write identity"):
        Identity.load_or_create(tmp_path / "file" / "id.key")  # a typed error, not a traceback


@pytest.mark.parametrize("content", [b"", b"\x08\x00\x12\x40" + b"\x00" * 64, b"garbage" * 20])
def test_unusable_identity_files_are_clear_errors(tmp_path, content):
    path = tmp_path / "id.key"
    path.write_bytes(content)
    with pytest.raises(IdentityError, match="Ed25519"):
        Identity.load_or_create(path)


def test_corrupt_public_half_is_detected(tmp_path):
    path = tmp_path / "id.key"
    Identity.load_or_create(path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(IdentityError, match="corrupt"):
        Identity.load_or_create(path)
