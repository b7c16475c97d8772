"""Signed contribution records and key-rotation statements: the one encoder, signer and verifier.

A contribution record says what one peer did in one round. It is signed by the peer's
Ed25519 key, whose public half is embedded in its libp2p peer id (protocol/peerid.py),
so anyone can verify a record offline with nothing but the record.

Body (canonical JSON): one object, keys sorted, no whitespace, ASCII only, integers only
(0 <= n < 2**53 unless stated), strings only lowercase hex or base58, one list (`shards`,
sorted, distinct). The decoder parses and then re-encodes and compares bytes, so one
record has exactly one valid byte string; floats, bools, NaN, escapes, duplicate, missing or
extra keys, leading zeros, "-0" and nesting are all rejected.

Envelope (what is stored in the ledger, one per line, and published in the DHT) is itself a
JSON object with a fixed key order and the body embedded verbatim, so a ledger is JSON lines
(`jq .body.samples ledger.jsonl` works) while the signed bytes stay exact:

    {"signer":"<peer id>","sig":"<128 lowercase hex>","body":<body>}

The signature covers DOMAIN_TAG + body. The verifier checks size and envelope shape, recovers
the public key from the signer's peer id, checks the signature over the exact body bytes,
and only then parses the body; the body's `peer_id` must equal the signer.

    >>> blob = sign_record(record, private_key)      # bytes, <= MAX_BLOB_BYTES
    >>> record = verify_signed(blob)                  # or RecordError(code, detail)
    >>> record_hash(blob)                             # sha256(body) hex: the next record's prev_hash

A key-rotation statement (KeyRotation) uses the same body rules, its own domain tag, and an
envelope signed by both keys:
    {"old":"<peer id>","new":"<peer id>","sig_old":"<hex>","sig_new":"<hex>","body":<body>}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from protocol.peerid import peer_id_from_public_key, public_key_from_peer_id

RECORD_VERSION = 1
DOMAIN_TAG = b"swarmtune/contrib/v1\0"
ROTATION_DOMAIN_TAG = b"swarmtune/rotate/v1\0"
RECEIPT_DOMAIN_TAG = b"swarmtune/receipt/v1\0"  # protocol/receipt.py: RoundReceipt
CHECK_DOMAIN_TAG = b"swarmtune/check/v1\0"  # protocol/receipt.py: SpotCheck
_DOMAIN_TAGS = (DOMAIN_TAG, ROTATION_DOMAIN_TAG, RECEIPT_DOMAIN_TAG, CHECK_DOMAIN_TAG)
MAX_BLOB_BYTES = 4096  # whole envelope; a record with 256 shards stays under ~2.5 KiB
MAX_SHARDS = 256
MAX_INT = 2**53 - 1  # integers survive any JSON implementation (IEEE double) unchanged
FIXED_POINT = 1_000_000  # loss 2.345678 is stored as 2345678
ZERO_HASH = "0" * 64
_SIG_HEX = 128
_HEX = frozenset("0123456789abcdef")


class RecordError(ValueError):
    """A record or statement that is not accepted. `code` is stable; `detail` says exactly why.

    Codes: size, envelope, peer-id, signature, signer, encoding, schema.
    """

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail

    @property
    def reason(self) -> str:
        return str(self)


def to_fixed(value: float) -> int:
    """Loss as a fixed-point integer (value * 1_000_000, rounded half to even)."""
    if not math.isfinite(value):
        raise ValueError(f"loss must be finite to be recorded, got {value}")
    fixed = round(value * FIXED_POINT)
    if abs(fixed) > MAX_INT:
        raise ValueError(f"loss {value} is too large to record")
    return fixed


def from_fixed(value: int) -> float:
    return value / FIXED_POINT


@dataclasses.dataclass(frozen=True)
class ContributionRecord:
    version: int  # RECORD_VERSION
    swarm_id: str  # 64 lowercase hex: the manifest hash
    peer_id: str  # libp2p Ed25519 peer id of the signer
    seq: int  # 0-based, +1 per record of this peer in this swarm
    prev_hash: str  # record_hash of record seq-1; ZERO_HASH for seq 0
    round: int  # swarm round / optimizer epoch the work was averaged in
    shards: tuple[int, ...]  # adapter shards trained, sorted, distinct
    samples: int  # samples processed in the round
    tokens: int  # tokens processed in the round
    loss_before: int  # to_fixed(mean loss at the start of the round); may be negative
    loss_after: int  # to_fixed(mean loss at the end of the round); may be negative
    adapter_hash: str  # 64 hex: adapter state the round started from
    data_commitment: str  # 64 hex: commitment to the samples used
    grad_commitment: str  # 64 hex: commitment to the gradient sent to the all-reduce
    start_ms: int  # unix time, milliseconds
    end_ms: int  # unix time, milliseconds, >= start_ms


@dataclasses.dataclass(frozen=True)
class KeyRotation:
    version: int  # RECORD_VERSION
    swarm_id: str  # the chain (swarm) this statement cuts
    old_peer_id: str  # key being retired
    new_peer_id: str  # key taking over
    old_next_seq: int  # records of the old key with seq >= this are rejected
    old_head_hash: str  # record_hash of the old key's record old_next_seq-1 (ZERO_HASH if none)
    time_ms: int  # when the rotation was made


_RECORD_FIELDS = {f.name: f for f in dataclasses.fields(ContributionRecord)}
_ROTATION_FIELDS = {f.name: f for f in dataclasses.fields(KeyRotation)}
_HEX_FIELDS = {"swarm_id", "prev_hash", "adapter_hash", "data_commitment", "grad_commitment", "old_head_hash"}
_PEER_FIELDS = {"peer_id", "old_peer_id", "new_peer_id"}
_SIGNED_INT_FIELDS = {"loss_before", "loss_after"}


# ---------------------------------------------------------------- validation of values


def _check_hex(name: str, value: Any) -> None:
    if type(value) is not str or len(value) != 64 or not set(value) <= _HEX:
        raise RecordError("schema", f"field {name!r} must be 64 lowercase hex characters")


def _check_peer(name: str, value: Any) -> None:
    if type(value) is not str:
        raise RecordError("schema", f"field {name!r} must be a peer id string")
    try:
        public_key_from_peer_id(value)
    except ValueError as e:
        raise RecordError("schema", f"field {name!r}: {e}") from None


def _check_value(name: str, value: Any) -> None:
    """Raise RecordError('schema', ...) unless `value` is a legal value of field `name`."""
    if name in _HEX_FIELDS:
        _check_hex(name, value)
    elif name in _PEER_FIELDS:
        _check_peer(name, value)
    elif name == "shards":
        if type(value) is not tuple:
            raise RecordError("schema", "field 'shards' must be a list of integers")
        if len(value) > MAX_SHARDS:
            raise RecordError("schema", f"field 'shards' has {len(value)} entries, at most {MAX_SHARDS} allowed")
        for s in value:
            _check_int("shards", s, signed=False)
        if list(value) != sorted(set(value)):
            raise RecordError("schema", "field 'shards' must be sorted and without duplicates")
    else:
        _check_int(name, value, signed=name in _SIGNED_INT_FIELDS)


def _check_int(name: str, value: Any, *, signed: bool) -> None:
    if type(value) is not int:  # bool is an int subclass: excluded on purpose
        raise RecordError("schema", f"field {name!r} must be an integer, got {type(value).__name__}")
    low = -MAX_INT if signed else 0
    if not low <= value <= MAX_INT:
        raise RecordError("schema", f"field {name!r} = {value} is outside [{low}, 2^53)")


def _check_record(r: ContributionRecord) -> None:
    for name in _RECORD_FIELDS:
        _check_value(name, getattr(r, name))
    if r.version != RECORD_VERSION:
        raise RecordError("schema", f"unsupported record version {r.version} (this node reads {RECORD_VERSION})")
    if (r.seq == 0) != (r.prev_hash == ZERO_HASH):
        raise RecordError("schema", "prev_hash must be all zeros exactly when seq is 0")
    if r.end_ms < r.start_ms:
        raise RecordError("schema", f"end_ms {r.end_ms} is before start_ms {r.start_ms}")


def _check_rotation(r: KeyRotation) -> None:
    for name in _ROTATION_FIELDS:
        _check_value(name, getattr(r, name))
    if r.version != RECORD_VERSION:
        raise RecordError("schema", f"unsupported rotation version {r.version}")
    if r.old_peer_id == r.new_peer_id:
        raise RecordError("schema", "a rotation must name two different keys")
    if (r.old_next_seq == 0) != (r.old_head_hash == ZERO_HASH):
        raise RecordError("schema", "old_head_hash must be all zeros exactly when old_next_seq is 0")


# ---------------------------------------------------------------- canonical body encoding


def _encode(obj: Any) -> bytes:
    fields = {name: getattr(obj, name) for name in obj.__dataclass_fields__}
    fields = {name: list(v) if type(v) is tuple else v for name, v in fields.items()}  # list fields
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode(
        "ascii"
    )


def encode_record(record: ContributionRecord) -> bytes:
    """The canonical body bytes of `record` (validated first: an illegal record is never encoded)."""
    _check_record(record)
    return _encode(record)


def _reject_constant(name: str) -> Any:
    raise RecordError("encoding", f"{name} is not allowed")


def _reject_float(text: str) -> Any:
    raise RecordError("encoding", f"non-integer number {text[:32]} is not allowed")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise RecordError("encoding", f"duplicate key {k!r}")
        out[k] = v
    return out


def _parse_body(body: bytes, fields: dict[str, dataclasses.Field], cls: type, check: Any = None) -> Any:
    """Parse canonical body bytes into `cls`, validated by `check` (record and rotation checks by
    default); list fields (typed tuple[...]) become tuples. Shared by every signed statement."""
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError as e:
        raise RecordError("encoding", f"body is not ASCII (byte {e.start})") from None
    if text.count("[") + text.count("{") > 2:  # a valid body has one of each; only then scan
        depth = 0
        for ch in text:  # bounded before parsing: a valid body nests exactly 2 deep
            if ch in "[{":
                depth += 1
                if depth > 2:
                    raise RecordError("encoding", "nesting deeper than 2 levels")
            elif ch in "]}":
                depth -= 1
    try:
        obj = json.loads(
            text, parse_float=_reject_float, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates
        )
    except json.JSONDecodeError as e:
        raise RecordError("encoding", f"not valid JSON: {e.msg} at offset {e.pos}") from None
    except RecordError:
        raise
    except ValueError as e:  # e.g. an integer literal longer than Python's digit limit
        raise RecordError("encoding", f"not valid JSON: {e}"[:200]) from None
    if type(obj) is not dict:
        raise RecordError("encoding", "body must be a JSON object")
    missing = sorted(set(fields) - set(obj))
    extra = sorted(set(obj) - set(fields))
    if missing:
        raise RecordError("schema", f"missing field(s) {', '.join(missing)}")
    if extra:
        raise RecordError("schema", f"unknown field(s) {', '.join(extra)[:200]}")
    values = {}
    for name, value in obj.items():
        if str(fields[name].type).startswith("tuple"):
            if type(value) is not list:
                what = "integers" if "int" in str(fields[name].type) else "strings"
                raise RecordError("schema", f"field {name!r} must be a list of {what}")
            value = tuple(value)
        elif type(value) is list:
            raise RecordError("schema", f"field {name!r} must not be a list")
        values[name] = value  # types are checked, with precise reasons, by the check below
    parsed = cls(**values)
    if check is None:
        check = _check_record if cls is ContributionRecord else _check_rotation
    check(parsed)
    if _encode(parsed) != body:
        raise RecordError("encoding", "body is not in canonical form (key order, spacing, escapes or number form)")
    return parsed


def decode_record(body: bytes) -> ContributionRecord:
    """Parse canonical body bytes (no signature check: use verify_signed for anything received)."""
    return _parse_body(body, _RECORD_FIELDS, ContributionRecord)


# ---------------------------------------------------------------- signing and verification


def public_bytes(private_key: Ed25519PrivateKey) -> bytes:
    return private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def sign_record(record: ContributionRecord, private_key: Ed25519PrivateKey) -> bytes:
    """The signed envelope of `record`. The key must be the one `record.peer_id` names."""
    signer = peer_id_from_public_key(public_bytes(private_key))
    if signer != record.peer_id:
        raise ValueError(f"record names peer {record.peer_id} but the key belongs to {signer}")
    body = encode_record(record)
    blob = _join({"signer": signer, "sig": _sign_statement(private_key, DOMAIN_TAG, body)}, body)
    if len(blob) > MAX_BLOB_BYTES:
        raise ValueError(f"record is {len(blob)} bytes, over the {MAX_BLOB_BYTES}-byte bound")
    return blob


def _sign_statement(private_key: Ed25519PrivateKey, domain_tag: bytes, body: bytes) -> str:
    """The hex signature of `domain_tag + body`: what every swarmtune signature covers (records,
    rotations, and protocol/receipt.py's receipts and spot checks each with their own tag)."""
    if domain_tag not in _DOMAIN_TAGS:
        raise ValueError(f"unknown domain tag {domain_tag!r}")
    return private_key.sign(domain_tag + body).hex()


def _join(strings: dict[str, str], body: bytes) -> bytes:
    head = ",".join(f'"{name}":"{value}"' for name, value in strings.items())
    return b"{" + head.encode("ascii") + b',"body":' + body + b"}"


def _split(blob: bytes, names: tuple[str, ...], max_bytes: int = MAX_BLOB_BYTES) -> list[bytes]:
    """The string fields `names` (in this order) and the verbatim body of an envelope."""
    if not isinstance(blob, (bytes, bytearray)):
        raise RecordError("envelope", f"expected bytes, got {type(blob).__name__}")
    if not blob:
        raise RecordError("size", "empty value")
    if len(blob) > max_bytes:
        raise RecordError("size", f"{len(blob)} bytes, over the {max_bytes}-byte bound")
    data = bytes(blob)
    pos, out = 0, []
    for i, name in enumerate(names):
        prefix = (b'{"' if i == 0 else b',"') + name.encode() + b'":"'
        if not data.startswith(prefix, pos):
            raise RecordError("envelope", f"expected {prefix.decode()!r} at byte {pos}")
        pos += len(prefix)
        end = data.find(b'"', pos)
        if end < 0:
            raise RecordError("envelope", f"unterminated {name!r} string")
        out.append(data[pos:end])
        pos = end + 1
    if not data.startswith(b',"body":', pos):
        raise RecordError("envelope", f"expected ',\"body\":' at byte {pos}")
    if not data.endswith(b"}"):
        raise RecordError("envelope", "envelope must end with '}'")
    out.append(data[pos + len(b',"body":') : -1])
    return out


_RECORD_ENVELOPE = ("signer", "sig")
_ROTATION_ENVELOPE = ("old", "new", "sig_old", "sig_new")


def _peer_key(raw: bytes) -> tuple[str, Ed25519PublicKey]:
    try:
        peer_id = raw.decode("ascii")
        key = public_key_from_peer_id(peer_id)
    except (UnicodeDecodeError, ValueError) as e:
        raise RecordError("peer-id", f"signer is not an Ed25519 peer id: {e}"[:300]) from None
    try:
        return peer_id, Ed25519PublicKey.from_public_bytes(key)
    except ValueError as e:
        raise RecordError("peer-id", f"peer id holds an invalid Ed25519 key: {e}") from None


def _signature(raw: bytes) -> bytes:
    if len(raw) != _SIG_HEX or not set(raw.decode("latin-1")) <= _HEX:
        raise RecordError("envelope", f"signature must be {_SIG_HEX} lowercase hex characters")
    return bytes.fromhex(raw.decode("ascii"))


def _verify(key: Ed25519PublicKey, signature: bytes, message: bytes, who: str) -> None:
    try:
        key.verify(signature, message)
    except InvalidSignature:
        raise RecordError("signature", f"signature does not verify under the key of {who}") from None


def verify_signed(blob: bytes) -> ContributionRecord:
    """The record in `blob` if its signature verifies and its body is canonical; else RecordError."""
    signer_raw, sig_raw, body = _split(blob, _RECORD_ENVELOPE)
    signer, key = _peer_key(signer_raw)
    signature = _signature(sig_raw)
    _verify(key, signature, DOMAIN_TAG + body, signer)
    record = decode_record(body)
    if record.peer_id != signer:
        raise RecordError("signer", f"body names peer {record.peer_id} but was signed by {signer}")
    return record


def body_of(blob: bytes) -> bytes:
    """The body bytes of an envelope (structure only; no verification)."""
    return _split(blob, _RECORD_ENVELOPE)[2]


def record_hash(blob: bytes) -> str:
    """sha256 of the record body, hex. Hashing the body (not the envelope) keeps the chain
    independent of signature encoding: a record has one hash whatever carried it."""
    return hashlib.sha256(body_of(blob)).hexdigest()


def sign_rotation(
    rotation: KeyRotation, old_key: Ed25519PrivateKey, new_key: Ed25519PrivateKey
) -> bytes:
    """A rotation statement signed by both the retiring and the new key."""
    old_id = peer_id_from_public_key(public_bytes(old_key))
    new_id = peer_id_from_public_key(public_bytes(new_key))
    if (old_id, new_id) != (rotation.old_peer_id, rotation.new_peer_id):
        raise ValueError("the keys do not match the peer ids named in the rotation")
    _check_rotation(rotation)
    body = _encode(rotation)
    signatures = {
        "sig_old": _sign_statement(old_key, ROTATION_DOMAIN_TAG, body),
        "sig_new": _sign_statement(new_key, ROTATION_DOMAIN_TAG, body),
    }
    return _join({"old": old_id, "new": new_id, **signatures}, body)


def verify_rotation(blob: bytes) -> KeyRotation:
    """The rotation in `blob` if both signatures verify and the body is canonical; else RecordError."""
    old_raw, new_raw, old_sig_raw, new_sig_raw, body = _split(blob, _ROTATION_ENVELOPE)
    old_id, old_key = _peer_key(old_raw)
    new_id, new_key = _peer_key(new_raw)
    message = ROTATION_DOMAIN_TAG + body
    _verify(old_key, _signature(old_sig_raw), message, f"old key {old_id}")
    _verify(new_key, _signature(new_sig_raw), message, f"new key {new_id}")
    rotation = _parse_body(body, _ROTATION_FIELDS, KeyRotation)
    if (rotation.old_peer_id, rotation.new_peer_id) != (old_id, new_id):
        raise RecordError("signer", "rotation body names other keys than its signers")
    return rotation
