"""Identity keys: creation, loading errors, the libp2p identity seen in a real DHT, rotation, `keygen`.

Run: python -m pytest tests/test_identity.py -q
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import socket
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from node.cli import main
from node.identity import (
    IdentityError,
    generate_identity,
    libp2p_private_key_bytes,
    load_identity,
    rotate_identity,
    write_libp2p_identity,
)
from protocol.peerid import public_key_from_peer_id
from protocol.record import DOMAIN_TAG, RecordError, verify_rotation

SWARM = "ab" * 32


def test_generate_and_load(tmp_path):
    path = tmp_path / "sub" / "identity.key"
    identity = generate_identity(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = load_identity(path)
    assert loaded.peer_id == identity.peer_id and loaded.peer_id.startswith("12D3KooW")
    assert public_key_from_peer_id(loaded.peer_id) == loaded.public_bytes
    signature = loaded.private_key.sign(b"message")
    identity.private_key.public_key().verify(signature, b"message")
    assert [p.name for p in path.parent.iterdir()] == ["identity.key"]  # no temp file left behind


def test_generate_refuses_to_overwrite(tmp_path):
    path = tmp_path / "identity.key"
    first = generate_identity(path)
    with pytest.raises(IdentityError, match="refusing to overwrite"):
        generate_identity(path)
    assert load_identity(path).peer_id == first.peer_id


def test_missing_key_is_an_error_naming_path_and_fix(tmp_path):
    path = tmp_path / "nope.key"
    with pytest.raises(IdentityError) as info:
        load_identity(path)
    assert str(path) in str(info.value) and "swarmtune keygen" in str(info.value)
    assert not path.exists()  # never silently a new key


def test_too_open_permissions(tmp_path):
    path = tmp_path / "identity.key"
    generate_identity(path)
    os.chmod(path, 0o644)
    with pytest.raises(IdentityError, match=f"chmod 600 {path}"):
        load_identity(path)


def test_corrupt_and_foreign_keys(tmp_path):
    corrupt = tmp_path / "corrupt.key"
    corrupt.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    os.chmod(corrupt, 0o600)
    with pytest.raises(IdentityError, match="corrupt"):
        load_identity(corrupt)
    ec_key = tmp_path / "ec.key"
    ec_key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    )
    os.chmod(ec_key, 0o600)
    with pytest.raises(IdentityError, match="not an Ed25519 key"):
        load_identity(ec_key)
    with pytest.raises(IdentityError, match="not a regular file"):
        load_identity(tmp_path)


def test_unreadable_key(tmp_path):
    path = tmp_path / "identity.key"
    path.symlink_to(path)  # a symlink loop: stat fails even for root (mode 000 would not stop root)
    with pytest.raises(IdentityError, match=f"cannot read identity key {path}"):
        load_identity(path)


def test_libp2p_identity_format(tmp_path):
    identity = generate_identity(tmp_path / "identity.key")
    data = libp2p_private_key_bytes(identity)
    assert data[:4] == bytes([0x08, 0x01, 0x12, 0x40]) and len(data) == 68
    assert data[-32:] == identity.public_bytes
    path = write_libp2p_identity(identity, tmp_path / "p2p.id")
    assert path.read_bytes() == data and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert write_libp2p_identity(identity, path) == path  # same content: kept
    other = generate_identity(tmp_path / "other.key")
    with pytest.raises(IdentityError, match="different libp2p identity"):
        write_libp2p_identity(other, path)


@pytest.fixture
def no_leaked_sockets():
    """Remove the hivemind unix sockets our DHT leaves behind (only new ones nobody listens on)."""
    before = set(glob.glob("/tmp/hivemind-*.sock"))
    yield
    for path in set(glob.glob("/tmp/hivemind-*.sock")) - before:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(path)
            except ConnectionRefusedError:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            except OSError:
                pass


@pytest.mark.timeout(60)
def test_dht_peer_id_is_the_identity_key(tmp_path, no_leaked_sockets):
    """The peer id hivemind's p2p daemon announces is the key that signs our records."""
    import hivemind

    identity = generate_identity(tmp_path / "identity.key")
    p2p_identity = write_libp2p_identity(identity, tmp_path / "p2p.id")
    dht = hivemind.DHT(
        start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], identity_path=str(p2p_identity), check_if_identity_free=False
    )
    try:
        assert str(dht.peer_id) == identity.peer_id
        # and the peer id alone verifies a signature made with the key file
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        Ed25519PublicKey.from_public_bytes(public_key_from_peer_id(str(dht.peer_id))).verify(
            identity.private_key.sign(b"hello"), b"hello"
        )
    finally:
        dht.shutdown()


def test_rotation_statement(tmp_path):
    old = generate_identity(tmp_path / "old.key")
    new, blob = rotate_identity(
        old, tmp_path / "new.key", swarm_id=SWARM, old_next_seq=4, old_head_hash="cd" * 32, time_ms=1
    )
    rotation = verify_rotation(blob)
    assert (rotation.old_peer_id, rotation.new_peer_id, rotation.old_next_seq) == (old.peer_id, new.peer_id, 4)
    assert load_identity(tmp_path / "new.key").peer_id == new.peer_id
    # the new key alone cannot make a rotation: it needs the old key's signature too
    fields = json.loads(blob)
    body = body_of_rotation(blob)
    forged = new.private_key.sign(b"swarmtune/rotate/v1\0" + body).hex()
    with pytest.raises(RecordError, match="old key"):
        verify_rotation(blob.replace(fields["sig_old"].encode(), forged.encode()))
    contrib = old.private_key.sign(DOMAIN_TAG + body).hex()
    with pytest.raises(RecordError, match="old key"):
        verify_rotation(blob.replace(fields["sig_old"].encode(), contrib.encode()))


def body_of_rotation(blob: bytes) -> bytes:
    return blob.split(b',"body":', 1)[1][:-1]


# ---------------------------------------------------------------- CLI


def test_keygen_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SWARMTUNE_HOME", str(tmp_path / "home"))
    assert main(["keygen"]) == 0
    out = capsys.readouterr().out
    default = tmp_path / "home" / "identity.key"
    peer_id = load_identity(default).peer_id
    assert peer_id in out and str(default) in out
    assert main(["keygen", "--show"]) == 0
    assert capsys.readouterr().out.strip() == peer_id
    assert main(["keygen"]) == 2  # exists: refused, key unchanged
    assert "refusing to overwrite" in capsys.readouterr().err
    assert load_identity(default).peer_id == peer_id
    other = tmp_path / "other.key"
    assert main(["keygen", "--key", str(other)]) == 0 and other.exists()
    capsys.readouterr()
    assert main(["keygen", "--show", "--key", str(tmp_path / "missing.key")]) == 2
    assert "no identity key at" in capsys.readouterr().err


def test_keygen_rotate_cli(tmp_path, capsys):
    from node.credit import verify_logs
    from node.ledger import Ledger

    old_key, new_key, ledger_path = tmp_path / "old.key", tmp_path / "new.key", tmp_path / "ledger.jsonl"
    old = generate_identity(old_key)
    fields = dict(
        swarm_id=SWARM, shards=(0,), samples=4, tokens=40, loss_before=1, loss_after=1, adapter_hash="1" * 64,
        data_commitment="2" * 64, grad_commitment="3" * 64, start_ms=0, end_ms=1,
    )
    with Ledger.open(ledger_path) as ledger:
        blobs = [ledger.append_new(old.private_key, round=r, **fields) for r in range(2)]
    assert main(["keygen", "--rotate", str(new_key), "--key", str(old_key)]) == 2
    assert "--ledger" in capsys.readouterr().err
    assert main(["keygen", "--rotate", str(new_key), "--key", str(old_key), "--ledger", str(ledger_path)]) == 0
    statements = (tmp_path / "rotations.jsonl").read_bytes().splitlines()
    rotation = verify_rotation(statements[0])
    assert (rotation.old_next_seq, rotation.new_peer_id) == (2, load_identity(new_key).peer_id)
    # the old key keeps signing after the cut (stolen, or a node not restarted): rejected
    with Ledger.open(ledger_path) as ledger:
        late = ledger.append_new(old.private_key, round=5, **fields)
    report = verify_logs({"l": blobs + [late]}, SWARM, 10, rotations=statements, require_receipts=False)
    assert [v.status for v in report.records] == ["ok", "ok", "fail"]
    assert "rotated-out key" in report.records[2].reason
    assert main(["keygen", "--rotate", str(new_key), "--key", str(old_key), "--ledger", str(ledger_path)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
