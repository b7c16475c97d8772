"""libp2p peer ids for Ed25519 keys, both ways.

A libp2p Ed25519 peer id *embeds* the public key, so a verifier needs nothing but the
peer id to check a signature:

    PublicKey protobuf  = 08 01 12 20 <32-byte key>     (Type=Ed25519=1, Data=key)
    identity multihash  = 00 24 <36-byte protobuf>       (code 0x00 = identity, length 36)
    peer id             = base58btc(multihash)           -> "12D3KooW..."

Only this one form is accepted on the way back (`public_key_from_peer_id`): no SHA-256
multihash ids (RSA keys), no CIDv1 forms, no non-canonical base58. Spec:
https://github.com/libp2p/specs/blob/master/peer-ids/peer-ids.md

    >>> peer_id = peer_id_from_public_key(bytes(32))
    >>> public_key_from_peer_id(peer_id) == bytes(32)
    True
"""

from __future__ import annotations

import functools

import base58

ED25519_KEY_TYPE = 1  # libp2p crypto.pb KeyType.Ed25519
_PUBKEY_PROTO_PREFIX = bytes([0x08, ED25519_KEY_TYPE, 0x12, 32])  # field 1 varint, field 2 len=32
_PRIVKEY_PROTO_PREFIX = bytes([0x08, ED25519_KEY_TYPE, 0x12, 64])  # Data = seed32 || pub32
_MULTIHASH_PREFIX = bytes([0x00, len(_PUBKEY_PROTO_PREFIX) + 32])  # identity multihash, 36 bytes
PEER_ID_BYTES = len(_MULTIHASH_PREFIX) + len(_PUBKEY_PROTO_PREFIX) + 32  # 38
MAX_PEER_ID_CHARS = 64  # an Ed25519 peer id is 52 characters; anything much longer is junk
_BASE58_ALPHABET = frozenset("123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz")


def peer_id_from_public_key(public_key: bytes) -> str:
    """The libp2p peer id ("12D3KooW...") of a raw 32-byte Ed25519 public key."""
    if not isinstance(public_key, bytes) or len(public_key) != 32:
        raise ValueError("an Ed25519 public key is exactly 32 bytes")
    return _encode(public_key)


def public_key_from_peer_id(peer_id: str) -> bytes:
    """The raw 32-byte Ed25519 public key embedded in `peer_id`.

    Raises ValueError for anything but a canonical base58btc identity-multihash Ed25519 peer id.
    """
    if not isinstance(peer_id, str):
        raise ValueError(f"peer id must be a str, got {type(peer_id).__name__}")
    return _decode(peer_id)


# Cached: both are pure, base58 is pure Python, and a swarm has few peers (errors are not cached).
@functools.lru_cache(maxsize=4096)
def _encode(public_key: bytes) -> str:
    return base58.b58encode(_MULTIHASH_PREFIX + _PUBKEY_PROTO_PREFIX + public_key).decode("ascii")


@functools.lru_cache(maxsize=4096)
def _decode(peer_id: str) -> bytes:
    if not peer_id or len(peer_id) > MAX_PEER_ID_CHARS or not set(peer_id) <= _BASE58_ALPHABET:
        raise ValueError(f"peer id {peer_id[:80]!r} is not base58btc text of sane length")
    raw = base58.b58decode(peer_id)
    if len(raw) != PEER_ID_BYTES or not raw.startswith(_MULTIHASH_PREFIX):
        raise ValueError(
            f"peer id {peer_id!r} is not an identity multihash of an Ed25519 key "
            "(RSA and hashed peer ids do not embed the key)"
        )
    proto = raw[len(_MULTIHASH_PREFIX) :]
    if not proto.startswith(_PUBKEY_PROTO_PREFIX):
        raise ValueError(f"peer id {peer_id!r} does not hold an Ed25519 PublicKey protobuf")
    public_key = proto[len(_PUBKEY_PROTO_PREFIX) :]
    if _encode(public_key) != peer_id:  # base58 admits no second spelling, but be sure
        raise ValueError(f"peer id {peer_id!r} is not canonically encoded")
    return public_key


def marshal_private_key(seed: bytes, public_key: bytes) -> bytes:
    """libp2p's marshalled Ed25519 private key: PrivateKey{Type=Ed25519, Data=seed||pub}.

    This is the identity file format that the libp2p daemon (p2pd) reads with `-id`.
    """
    if len(seed) != 32 or len(public_key) != 32:
        raise ValueError("Ed25519 seed and public key are 32 bytes each")
    return _PRIVKEY_PROTO_PREFIX + seed + public_key
