"""Round receipts and spot checks: signed statements that make credit depend on others' word.

A RoundReceipt is signed by one member of the group that summed one shard in one round. It names
the group (sorted member ids), what this signer, as a reducer, received from each member (a sha256
commitment per member; empty when the signer reduced no part), and the hash of the group's exact
integer sum, which every member computes identically. A record earns credit only when receipts of
other members of its group name it (node/credit.py says exactly when).

A SpotCheck is signed by a checker that `spot_checks` drew for one target of one round: the checker
recomputed one microbatch of the target's assigned examples (`check_unit` draws which) from the round's
start state, compared its gradient sketch with the one the target announced, and the part the target
committed to with the sum of its announced sketches (node/spotcheck.py). `failed` = 1 is an accusation; the accused's
round earns nothing.

The body rules are those of protocol/record.py (canonical JSON, integers only, one byte string per
statement; the same encoder and parser). Envelopes, one per line, classifiable from the line alone
(`classify`), so a ledger file or DHT dump may mix records, rotations, receipts and checks:

    record    {"signer":"<peer id>","sig":"<hex>","body":{..}}
    rotation  {"old":"<peer id>","new":"<peer id>","sig_old":"<hex>","sig_new":"<hex>","body":{..}}
    receipt   {"signer":"<peer id>","sig":"<hex>","kind":"receipt","body":{..}}
    check     {"signer":"<peer id>","sig":"<hex>","kind":"check","body":{..}}

Each signature covers its own domain tag + body (RECEIPT_DOMAIN_TAG, CHECK_DOMAIN_TAG), so no
statement verifies as another kind. `kind` itself is not signed; changing it only makes the
signature check use the other tag and fail.

    >>> blob = sign_receipt(receipt, private_key)      # bytes, <= MAX_RECEIPT_BYTES
    >>> receipt = verify_receipt(blob)                 # or RecordError(code, detail)
    >>> spot_checks(receipt.result_hash, receipt.members, receipt.check_rate_ppm / 1e6, receipt.reducers)

The draw: each member is checked with probability `rate`, independently, from the round's result
hash, which is known only once the group's sum is; so nobody can choose or dodge it. At the default
rate of 0.21 a member that cheats every round is caught within `catch_rounds(0.21)` = 20 rounds
with probability >= 99 %.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.peerid import peer_id_from_public_key
from protocol.record import (
    CHECK_DOMAIN_TAG,
    MAX_INT,
    RECEIPT_DOMAIN_TAG,
    RecordError,
    _check_hex,
    _check_int,
    _check_peer,
    _encode,
    _join,
    _parse_body,
    _peer_key,
    _sign_statement,
    _signature,
    _split,
    _verify,
    public_bytes,
)

RECEIPT_VERSION = 1
MAX_MEMBERS = 256
MAX_SHARD = 255
# A member costs ~180 bytes (a 52-char peer id as member and as reducer and a 64-char commitment,
# quoted, with commas): 256 members are ~45 KiB; the rest of the envelope is under 500 bytes.
MAX_RECEIPT_BYTES = 48 * 1024
MAX_CHECK_BYTES = 2048  # a check is ~700 bytes
DEFAULT_SPOT_CHECK_RATE = 0.21  # 1 - 0.79**20 = 0.9910: a constant cheater is caught within 20 rounds at >= 99 %
KINDS = ("record", "rotation", "receipt", "check")


@dataclasses.dataclass(frozen=True)
class RoundReceipt:
    version: int  # RECEIPT_VERSION
    swarm_id: str  # 64 hex: the manifest hash
    round: int  # swarm round the group summed in
    shard: int  # adapter shard the group summed, 0..255
    peer_id: str  # the signer; one of `members`
    members: tuple[str, ...]  # the group: sorted, distinct peer ids, 1..256 of them
    commitments: tuple[str, ...]  # () (the signer reduced no part) or, per member, sha256 hex of its part as received
    result_hash: str  # 64 hex: sha256 of the group's exact integer sum of the shard (the same at every member)
    reducers: tuple[str, ...] = ()  # the members that reduced a part (sorted): the only possible checkers
    check_rate_ppm: int = 0  # the group's chance to draw each member for a spot-check, parts per million


@dataclasses.dataclass(frozen=True)
class SpotCheck:
    version: int  # RECEIPT_VERSION
    swarm_id: str  # 64 hex
    round: int
    shard: int  # 0..255
    peer_id: str  # the checker (the signer)
    target: str  # the member checked
    result_hash: str  # 64 hex: the round's sum, which identifies the group and seeds the draw
    commitment: str  # 64 hex: the target's part hash as the checker reduced it (its receipt's commitment)
    evidence_hash: str  # 64 hex: sha256 of the checker's recomputed microbatch sketch (float32 little-endian)
    error_ppm: int  # the larger relative L2 error of the two comparisons (node/spotcheck.py) x 1e6, capped at 2**53-1
    tolerance_ppm: int  # the tolerance the check applied
    failed: int  # 1 exactly when error_ppm > tolerance_ppm (an accusation), else 0
    time_ms: int  # when the check was made, unix milliseconds


_RECEIPT_FIELDS = {f.name: f for f in dataclasses.fields(RoundReceipt)}
_CHECK_FIELDS = {f.name: f for f in dataclasses.fields(SpotCheck)}
_ENVELOPE = ("signer", "sig", "kind")


# ---------------------------------------------------------------- validation


def _check_common(s: Any) -> None:
    if type(s.version) is not int or s.version != RECEIPT_VERSION:
        raise RecordError("schema", f"unsupported version {s.version!r} (this node reads {RECEIPT_VERSION})")
    _check_hex("swarm_id", s.swarm_id)
    _check_int("round", s.round, signed=False)
    _check_int("shard", s.shard, signed=False)
    if s.shard > MAX_SHARD:
        raise RecordError("schema", f"field 'shard' = {s.shard} is outside [0, {MAX_SHARD}]")
    _check_peer("peer_id", s.peer_id)
    _check_hex("result_hash", s.result_hash)


def check_receipt(r: RoundReceipt) -> None:
    """Raise RecordError('schema', ...) unless `r` is a legal receipt."""
    _check_common(r)
    if type(r.members) is not tuple or not 1 <= len(r.members) <= MAX_MEMBERS:
        raise RecordError("schema", f"field 'members' must list 1..{MAX_MEMBERS} peer ids")
    for m in r.members:
        _check_peer("members", m)
    if list(r.members) != sorted(set(r.members)):
        raise RecordError("schema", "field 'members' must be sorted and without duplicates")
    if r.peer_id not in r.members:
        raise RecordError("schema", f"signer {r.peer_id} is not one of the members")
    if type(r.commitments) is not tuple or len(r.commitments) not in (0, len(r.members)):
        n = len(r.commitments) if type(r.commitments) is tuple else "?"
        raise RecordError(
            "schema", f"field 'commitments' has {n} entries: it must be empty or one per member ({len(r.members)})"
        )
    for c in r.commitments:
        _check_hex("commitments", c)
    if type(r.reducers) is not tuple or list(r.reducers) != sorted(set(r.reducers)) or not set(r.reducers) <= set(r.members):
        raise RecordError("schema", "field 'reducers' must be a sorted, duplicate-free subset of the members")
    if bool(r.commitments) != (r.peer_id in r.reducers):
        raise RecordError("schema", "a signer has commitments exactly when it is one of the reducers")
    _check_int("check_rate_ppm", r.check_rate_ppm, signed=False)
    if r.check_rate_ppm > 1_000_000:
        raise RecordError("schema", f"field 'check_rate_ppm' = {r.check_rate_ppm} is outside [0, 1000000]")


def check_spot_check(c: SpotCheck) -> None:
    """Raise RecordError('schema', ...) unless `c` is a legal spot check."""
    _check_common(c)
    _check_peer("target", c.target)
    if c.target == c.peer_id:
        raise RecordError("schema", "a checker cannot check itself")
    for name in ("commitment", "evidence_hash"):
        _check_hex(name, getattr(c, name))
    for name in ("error_ppm", "tolerance_ppm", "failed", "time_ms"):
        _check_int(name, getattr(c, name), signed=False)
    if c.failed not in (0, 1):
        raise RecordError("schema", f"field 'failed' must be 0 or 1, got {c.failed}")
    if c.failed != int(c.error_ppm > c.tolerance_ppm):
        raise RecordError(
            "schema",
            f"failed={c.failed} contradicts error {c.error_ppm} ppm vs tolerance {c.tolerance_ppm} ppm "
            "(failed must be 1 exactly when the error exceeds the tolerance)",
        )


def error_ppm(relative_error: float) -> int:
    """A relative L2 error as integer parts per million, capped at 2**53-1 (inf and NaN cap too)."""
    if not relative_error >= 0 or relative_error * 1e6 >= MAX_INT:  # NaN fails the first test
        return MAX_INT
    return round(relative_error * 1e6)


# ---------------------------------------------------------------- signing and verification


def _sign(statement: Any, kind: str, tag: bytes, check: Any, bound: int, private_key: Ed25519PrivateKey) -> bytes:
    signer = peer_id_from_public_key(public_bytes(private_key))
    if signer != statement.peer_id:
        raise ValueError(f"{kind} names signer {statement.peer_id} but the key belongs to {signer}")
    check(statement)
    body = _encode(statement)
    blob = _join({"signer": signer, "sig": _sign_statement(private_key, tag, body), "kind": kind}, body)
    if len(blob) > bound:
        raise ValueError(f"{kind} is {len(blob)} bytes, over the {bound}-byte bound")
    return blob


def _open(blob: bytes, kind: str, tag: bytes, fields: dict, cls: type, check: Any, bound: int) -> Any:
    signer_raw, sig_raw, kind_raw, body = _split(blob, _ENVELOPE, bound)
    if kind_raw != kind.encode():
        raise RecordError("envelope", f"kind is {kind_raw[:20]!r}, expected {kind!r}")
    signer, key = _peer_key(signer_raw)
    _verify(key, _signature(sig_raw), tag + body, signer)
    statement = _parse_body(body, fields, cls, check)
    if statement.peer_id != signer:
        raise RecordError("signer", f"body names peer {statement.peer_id} but was signed by {signer}")
    return statement


def sign_receipt(receipt: RoundReceipt, private_key: Ed25519PrivateKey) -> bytes:
    """The signed envelope of `receipt`; the key must be the one `receipt.peer_id` names."""
    return _sign(receipt, "receipt", RECEIPT_DOMAIN_TAG, check_receipt, MAX_RECEIPT_BYTES, private_key)


def verify_receipt(blob: bytes) -> RoundReceipt:
    """The receipt in `blob` if its signature verifies and its body is canonical; else RecordError."""
    return _open(blob, "receipt", RECEIPT_DOMAIN_TAG, _RECEIPT_FIELDS, RoundReceipt, check_receipt, MAX_RECEIPT_BYTES)


def sign_check(check: SpotCheck, private_key: Ed25519PrivateKey) -> bytes:
    """The signed envelope of a spot check; the key must be the checker's (`check.peer_id`)."""
    return _sign(check, "check", CHECK_DOMAIN_TAG, check_spot_check, MAX_CHECK_BYTES, private_key)


def verify_check(blob: bytes) -> SpotCheck:
    """The spot check in `blob` if its signature verifies and its body is canonical; else RecordError."""
    return _open(blob, "check", CHECK_DOMAIN_TAG, _CHECK_FIELDS, SpotCheck, check_spot_check, MAX_CHECK_BYTES)


def statement_body(blob: bytes) -> bytes:
    """The body bytes of a receipt or check envelope (structure only; no verification)."""
    return _split(blob, _ENVELOPE, MAX_RECEIPT_BYTES)[3]


def statement_hash(blob: bytes) -> str:
    """sha256 of a receipt's or check's body, hex: one statement has one hash whatever carried it."""
    return hashlib.sha256(statement_body(blob)).hexdigest()


def classify(blob: bytes) -> str:
    """"record", "rotation", "receipt" or "check", from the envelope's shape alone (nothing is
    verified); RecordError('envelope' or 'size') for anything else."""
    if not isinstance(blob, (bytes, bytearray)):
        raise RecordError("envelope", f"expected bytes, got {type(blob).__name__}")
    if len(blob) > MAX_RECEIPT_BYTES:
        raise RecordError("size", f"{len(blob)} bytes, over the {MAX_RECEIPT_BYTES}-byte bound of any statement")
    data = bytes(blob)
    if data.startswith(b'{"old":"'):
        return "rotation"
    if not data.startswith(b'{"signer":"'):
        raise RecordError("envelope", "not a swarmtune statement (expected '{\"signer\":' or '{\"old\":')")
    end = data.find(b'"', len(b'{"signer":"'))
    if end < 0 or not data.startswith(b',"sig":"', end + 1):
        raise RecordError("envelope", "expected a signer and a signature")
    end = data.find(b'"', end + 1 + len(b',"sig":"'))
    rest = data[end + 1 :] if end >= 0 else b""
    if rest.startswith(b',"body":'):
        return "record"
    for kind in ("receipt", "check"):
        if rest.startswith(b',"kind":"' + kind.encode() + b'","body":'):
            return kind
    raise RecordError("envelope", "unknown statement kind")


# ---------------------------------------------------------------- the draw


def _uniform(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("|".join(parts).encode("ascii")).digest(), "big")


def spot_checks(result_hash: str, members: Sequence[str], rate: float,
                checkers: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """[(checker, target), ...]: each member is checked with probability `rate` (from
    sha256(result_hash|"check"|target) read as a uniform number in [0, 1)), by a checker drawn from
    sha256(result_hash|"checker"|target) among the other `checkers` (default: the members; in a round,
    the reducers, which hold the parts), sorted. Nobody can choose or dodge it: the result hash is known
    only once the group's sum is. A member with no other checker is not checked."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"spot-check rate must be in [0, 1], got {rate}")
    out = []
    group = sorted(set(members))
    pool = sorted(set(checkers)) if checkers is not None else group
    for target in group:
        others = [m for m in pool if m != target]
        if not others or _uniform(result_hash, "check", target) >= rate * 2**256:
            continue
        out.append((others[_uniform(result_hash, "checker", target) % len(others)], target))
    return out


def check_unit(result_hash: str, target: str, units: int) -> int:
    """Which of a drawn member's `units` microbatches its checker recomputes (from sha256(result_hash|"unit"|
    target)): known only once the group's sum is, so a member cannot compute just the one that will be checked."""
    if units < 1:
        raise ValueError(f"a checked member has at least one microbatch, got {units}")
    return _uniform(result_hash, "unit", target) % units


def catch_rounds(rate: float, prob: float = 0.99) -> int:
    """Rounds after which a member that cheats every round has been checked (caught) at least once
    with probability >= `prob`: the least n with 1 - (1 - rate)**n >= prob."""
    if not 0.0 < rate <= 1.0 or not 0.0 < prob < 1.0:
        raise ValueError(f"need 0 < rate <= 1 and 0 < prob < 1, got rate={rate}, prob={prob}")
    if rate == 1.0:
        return 1
    n = math.ceil(math.log(1.0 - prob) / math.log(1.0 - rate))
    while 1.0 - (1.0 - rate) ** n < prob:  # float rounding at the boundary
        n += 1
    while n > 1 and 1.0 - (1.0 - rate) ** (n - 1) >= prob:
        n -= 1
    return n

