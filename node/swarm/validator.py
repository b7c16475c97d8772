"""Publishing signed statements in the DHT under subkeys only their owner can fill.

Layout, per swarm (values are the signed envelopes of protocol/, exactly the bytes of the ledger
and receipts lines; receipts and checks have one key per round, node/swarm/statements.py, so a
node reads one round's worth; records one key per RECORDS_BUCKET rounds):

    key                          subkey                                      value
    {swarm_id}/records/<bucket>  [ed25519-owner:<peer>]:<seq>                a record of <peer> with that seq, for a
                                                                             round in the bucket (round // RECORDS_BUCKET)
    {swarm_id}/rotations         [ed25519-owner:<old peer>]                  a key rotation retiring <old peer>
    {swarm_id}/receipts/<round>  [ed25519-owner:<peer>]:<shard>              a receipt signed by <peer> for that round, shard
    {swarm_id}/checks/<round>    [ed25519-owner:<peer>]:<shard>:<target>     a spot check by <peer> of <target>

Why buckets: a DHT read returns a key's whole dictionary. Under one records key, every read of the swarm's
credit moved every record of its history, and a node's groupmate served that read after each round (a
2-node swarm sent 2.19 MB per round at round 5 and 2.36 MB at round 55, growing 3.5 KB a round). A reader
now reads the buckets it has not seen complete: the newest one and the empty ones above it, each time.

`RecordsValidator` refuses, under the swarm's rotations key, anything but a valid signed statement of
that kind for this swarm, signed by the subkey's owner, matching what the subkey names, within its
size bound. Per-round keys cannot be listed in advance (a DHT key is a hash), so there the
rule follows the subkey: any value under a subkey starting with `[ed25519-owner:`, whatever its key,
must be a valid signed statement (record, rotation, receipt or check) whose own fields put it at
exactly that key and subkey. So nobody can write into another peer's subkeys (an unsigned or
misplaced value cannot overwrite an honest receipt), and re-storing an old record under a newer seq,
or a receipt under another round, is refused; re-storing a statement under its own subkey only stores
the same bytes again (harmless). Other keys and subkeys pass untouched, so it composes with hivemind's
validators.

Why not hivemind's `[owner:...]` marker: hivemind's RSASignatureValidator (installed by
hivemind.Optimizer's progress tracker) parses whatever follows `[owner:` as an RSA key and
would choke on an Ed25519 peer id; our statements carry their own signature, so the marker
here is `[ed25519-owner:` and the check is ours.

    dht = hivemind.DHT(..., record_validators=[RecordsValidator(swarm_id)])
    publish_record(dht, swarm_id, blob, expiration=get_dht_time() + 3600)
    blobs = collect_records(dht, swarm_id)   # every bucket, sorted by (peer, seq); bad values dropped and logged
    collect_record_bucket(dht, swarm_id, b)  # one bucket's (the credit view re-reads only the open ones)
    publish_rotation / collect_rotations;  receipts and checks: node/swarm/statements.py
    collect_all(dht, swarm_id)               # all four kinds, receipts and checks of the records' rounds
"""

from __future__ import annotations

import logging
import re
from functools import partial
from typing import Any, Iterable

from hivemind.dht import DHT
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer, get_dht_time

from node.swarm.statements import (
    check_subkey,
    checks_key,
    collect_rounds,
    receipt_subkey,
    receipts_key,
)
from protocol.receipt import MAX_RECEIPT_BYTES, classify, verify_check, verify_receipt
from protocol.record import MAX_BLOB_BYTES, RecordError, verify_rotation, verify_signed

logger = logging.getLogger(__name__)

OWNER_MARKER = "[ed25519-owner:"
_PEER = r"([1-9A-HJ-NP-Za-km-z]{1,64})"
_SUBKEY_RE = re.compile(rf"\[ed25519-owner:{_PEER}\]:(0|[1-9][0-9]{{0,15}})")
_ROTATION_SUBKEY_RE = re.compile(rf"\[ed25519-owner:{_PEER}\]")
_MSGPACK_OVERHEAD = 8  # bin32 header: a bytes value is its length + at most 5 bytes


RECORDS_BUCKET = 16  # rounds per records key


def records_bucket_key(swarm_id: str, bucket: int) -> str:
    return f"{swarm_id}/records/{bucket}"


def records_key(swarm_id: str, round_: int) -> str:
    """The DHT key of the records of `round_`: its bucket's."""
    return records_bucket_key(swarm_id, round_ // RECORDS_BUCKET)


def owner_subkey(peer_id: str, seq: int) -> str:
    return f"[ed25519-owner:{peer_id}]:{seq}"


def rotations_key(swarm_id: str) -> str:
    return f"{swarm_id}/rotations"


def rotation_subkey(old_peer_id: str) -> str:
    return f"[ed25519-owner:{old_peer_id}]"


def _owned(subkey: Any, value: Any, pattern: re.Pattern, form: str, verify) -> tuple[Any, Any, str]:
    """(subkey match, verified statement, "") or (None, None, why not) for a value under an owner subkey."""
    if not isinstance(subkey, str):
        return None, None, f"subkey must be a string, got {type(subkey).__name__}"
    match = pattern.fullmatch(subkey)
    if match is None:
        return None, None, f"subkey {subkey[:100]!r} is not of the form {form}"
    if not isinstance(value, bytes):
        return None, None, f"value must be bytes, got {type(value).__name__}"
    try:
        return match, verify(value), ""
    except RecordError as e:
        return None, None, f"value rejected: {e}"


def _checked_record(swarm_id: str, subkey: Any, value: Any):
    """(the verified record, "") if (subkey, value) may be stored under one of this swarm's records keys, else
    (None, why not)."""
    match, record, why = _owned(subkey, value, _SUBKEY_RE, "[ed25519-owner:<peer id>]:<seq>", verify_signed)
    if why:
        return None, why
    owner, seq = match.group(1), int(match.group(2))
    if record.peer_id != owner:
        return None, f"record signed by {record.peer_id} written to the subkey of {owner}"
    if record.seq != seq:
        return None, f"record seq {record.seq} written to the subkey for seq {seq}"
    if record.swarm_id != swarm_id:
        return None, f"record is for swarm {record.swarm_id}, not {swarm_id}"
    return record, ""


def check_value(swarm_id: str, subkey: Any, value: Any) -> str:
    """Why (subkey, value) may not be stored under one of this swarm's records keys; "" if it may."""
    return _checked_record(swarm_id, subkey, value)[1]


def _check_bucket_value(bucket: int, swarm_id: str, subkey: Any, value: Any) -> str:
    """Why (subkey, value) may not be stored under this swarm's records key of `bucket`; "" if it may."""
    record, why = _checked_record(swarm_id, subkey, value)
    if why:
        return why
    round_ = record.round
    if round_ // RECORDS_BUCKET != bucket:
        return (f"record of round {round_} written to records bucket {bucket} (rounds {bucket * RECORDS_BUCKET}.."
                f"{(bucket + 1) * RECORDS_BUCKET - 1})")
    return ""


def check_rotation_value(swarm_id: str, subkey: Any, value: Any) -> str:
    """Why (subkey, value) may not be stored under this swarm's rotations key; "" if it may."""
    match, rotation, why = _owned(subkey, value, _ROTATION_SUBKEY_RE, "[ed25519-owner:<old peer id>]", verify_rotation)
    if why:
        return why
    if rotation.old_peer_id != match.group(1):
        return f"rotation of {rotation.old_peer_id} written to the subkey of {match.group(1)}"
    if rotation.swarm_id != swarm_id:
        return f"rotation is for swarm {rotation.swarm_id}, not {swarm_id}"
    return ""


def place_of(blob: bytes) -> tuple[str, str, str]:
    """(kind, DHT key, subkey) where a signed statement belongs, from its own fields; RecordError if
    it is not a valid statement."""
    kind = classify(blob)
    if kind == "record":
        r = verify_signed(blob)
        return kind, records_key(r.swarm_id, r.round), owner_subkey(r.peer_id, r.seq)
    if kind == "rotation":
        rot = verify_rotation(blob)
        return kind, rotations_key(rot.swarm_id), rotation_subkey(rot.old_peer_id)
    if kind == "receipt":
        rec = verify_receipt(blob)
        return kind, receipts_key(rec.swarm_id, rec.round), receipt_subkey(rec.peer_id, rec.shard)
    c = verify_check(blob)
    return kind, checks_key(c.swarm_id, c.round), check_subkey(c.peer_id, c.shard, c.target)


def _key_id(key: str) -> bytes:
    return DHTID.generate(source=key).to_bytes()


def check_owned_value(key: str | bytes, subkey: str, value: Any) -> str:
    """Why `value` may not be stored under an `[ed25519-owner:...]` subkey of `key` (the key string or
    its DHT id); "" if it is a valid signed statement that belongs exactly there."""
    if not isinstance(value, bytes):
        return f"value must be bytes, got {type(value).__name__}"
    try:
        kind, place, expected = place_of(value)
    except RecordError as e:
        return f"value under an ed25519-owner subkey rejected: {e}"
    if subkey != expected:
        return f"{kind} belongs under subkey {expected[:120]!r}, not {subkey[:120]!r}"
    if (key if isinstance(key, bytes) else _key_id(key)) != _key_id(place):
        return f"{kind} belongs under key {place!r}" + ("" if isinstance(key, bytes) else f", not {key[:120]!r}")
    return ""


class RecordsValidator(RecordValidatorBase):
    """Refuse what `check_rotation_value` refuses under this swarm's rotations key, and what
    `check_owned_value` refuses under any `[ed25519-owner:` subkey (records, receipts, checks)."""

    BUCKETS_AHEAD = 1024  # records buckets known by key id beyond the highest one a valid record was seen in
    EXTEND_WITHIN = 64  # ... extended again when a valid record lands this close to the last known bucket

    def __init__(self, swarm_id: str):
        self.swarm_id = swarm_id
        # key id -> (key, value bound, check(swarm_id, subkey, value), records bucket or None)
        self._keys = {
            _key_id(rotations_key(swarm_id)): (rotations_key(swarm_id), MAX_BLOB_BYTES, check_rotation_value, None),
        }
        # a records bucket's key is a hash too: the buckets from 0 to BUCKETS_AHEAD past the highest seen are
        # known by id, so junk under other subkeys cannot bloat the dictionary every reader downloads
        self._buckets_known = 0
        self._know_buckets(self.BUCKETS_AHEAD)

    def _know_buckets(self, upto: int) -> None:
        for bucket in range(self._buckets_known, upto):
            name = records_bucket_key(self.swarm_id, bucket)
            self._keys[_key_id(name)] = (name, MAX_BLOB_BYTES, partial(_check_bucket_value, bucket), bucket)
        self._buckets_known = max(self._buckets_known, upto)

    def explain(self, record: DHTRecord) -> str:
        """Why `record` is refused; "" if accepted (or none of our business)."""
        known = self._keys.get(record.key)
        try:
            subkey = MSGPackSerializer.loads(record.subkey)
        except Exception as e:  # msgpack raises many types on junk; all mean "badly encoded"
            return f"badly encoded DHT subkey: {type(e).__name__}" if known else ""
        owned = isinstance(subkey, str) and subkey.startswith(OWNER_MARKER)
        if known is None and not owned:
            return ""  # another subsystem's key: not ours to judge
        bound = known[1] if known else MAX_RECEIPT_BYTES
        if len(record.value) > bound + _MSGPACK_OVERHEAD:
            return f"value of {len(record.value)} bytes is over the {bound}-byte bound"
        try:
            value = MSGPackSerializer.loads(record.value)
        except Exception as e:
            return f"badly encoded DHT value: {type(e).__name__}"
        if known is not None:
            _name, _bound, check, bucket = known
            why = check(self.swarm_id, subkey, value)
            if not why and bucket is not None and bucket + self.EXTEND_WITHIN > self._buckets_known:
                self._know_buckets(bucket + self.BUCKETS_AHEAD)
            return why
        return check_owned_value(record.key, subkey, value)

    def validate(self, record: DHTRecord) -> bool:
        reason = self.explain(record)
        if reason:
            where = self._keys[record.key][0] if record.key in self._keys else "an ed25519-owner subkey"
            logger.warning(f"refused a value under {where}: {reason}")
        return not reason

    @property
    def priority(self) -> int:
        return 5  # below RSASignatureValidator (10): it strips its signature before we look

    def merge_with(self, other: RecordValidatorBase) -> bool:
        # Two validators for the same swarm are one; different swarms stay separate and each
        # passes the other's keys.
        return isinstance(other, RecordsValidator) and other.swarm_id == self.swarm_id


def publish_record(dht: DHT, swarm_id: str, blob: bytes, expiration: float, return_future: bool = False):
    """Store a signed record under its owner's subkey until `expiration` (absolute DHT time,
    e.g. `get_dht_time() + 3600`). Returns whether the DHT accepted it (with `return_future`, a future of
    that, and the caller goes on while the store travels)."""
    reason = ""
    try:
        record = verify_signed(blob)
    except RecordError as e:
        reason = str(e)
    if reason or record.swarm_id != swarm_id:
        raise ValueError(f"refusing to publish an invalid record: {reason or 'it belongs to another swarm'}")
    if expiration <= get_dht_time():
        raise ValueError("expiration is an absolute DHT time (get_dht_time() + ttl seconds); got a time in the past")
    stored = dht.store(records_key(swarm_id, record.round), blob, expiration_time=expiration,
                       subkey=owner_subkey(record.peer_id, record.seq), return_future=return_future)
    return stored if return_future else bool(stored)


def _collect(dht: DHT, key: str, check, pattern: re.Pattern, swarm_id: str) -> list[tuple]:
    found = dht.get(key, latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    kept = []
    for subkey, item in found.value.items():
        value = getattr(item, "value", None)
        reason = check(swarm_id, subkey, value)
        if reason:
            logger.warning(f"dropped a DHT value under {key}: {reason}")
            continue
        fields = pattern.fullmatch(subkey).groups()
        kept.append((tuple(int(f) if f.isdigit() else f for f in fields), value))
    return sorted(kept)


def _bucket_items(dht: DHT, swarm_id: str, bucket: int) -> list[tuple]:
    return _collect(dht, records_bucket_key(swarm_id, bucket), partial(_check_bucket_value, bucket), _SUBKEY_RE, swarm_id)


def collect_record_bucket(dht: DHT, swarm_id: str, bucket: int) -> list[bytes]:
    """The valid records of one bucket (rounds bucket * RECORDS_BUCKET ..), sorted by (peer id, seq)."""
    return [blob for _, blob in _bucket_items(dht, swarm_id, bucket)]


EMPTY_BUCKETS_TO_END = 2  # a scan of the buckets ends after this many empty ones in a row (a stalled stretch)


def scan_record_buckets(read_bucket, first: int = 0) -> dict:
    """{bucket: read_bucket(bucket)} from `first` up to and including the EMPTY_BUCKETS_TO_END empty buckets
    in a row that end it."""
    found, empty, bucket = {}, 0, first
    while empty < EMPTY_BUCKETS_TO_END:
        found[bucket] = read_bucket(bucket)
        empty = 0 if found[bucket] else empty + 1
        bucket += 1
    return found


def collect_records(dht: DHT, swarm_id: str) -> list[bytes]:
    """Every valid record of the swarm found in the DHT, sorted by (peer id, seq): the buckets from the first up
    to EMPTY_BUCKETS_TO_END empty ones in a row."""
    found = scan_record_buckets(lambda b: _bucket_items(dht, swarm_id, b))
    return [blob for _, blob in sorted(item for items in found.values() for item in items)]


def publish_rotation(dht: DHT, swarm_id: str, blob: bytes, expiration: float) -> bool:
    """Store a key rotation statement under the retired key's subkey. Returns whether the DHT accepted it."""
    try:
        rotation = verify_rotation(blob)
    except RecordError as e:
        raise ValueError(f"refusing to publish an invalid rotation: {e}") from None
    if rotation.swarm_id != swarm_id:
        raise ValueError(f"refusing to publish a rotation of another swarm ({rotation.swarm_id})")
    if expiration <= get_dht_time():
        raise ValueError("expiration is an absolute DHT time (get_dht_time() + ttl seconds); got a time in the past")
    return bool(dht.store(rotations_key(swarm_id), blob, expiration_time=expiration,
                          subkey=rotation_subkey(rotation.old_peer_id)))


def collect_rotations(dht: DHT, swarm_id: str) -> list[bytes]:
    """Every valid key rotation statement of the swarm found in the DHT, sorted by old key."""
    return [blob for _, blob in _collect(dht, rotations_key(swarm_id), check_rotation_value, _ROTATION_SUBKEY_RE,
                                         swarm_id)]


def collect_all(dht: DHT, swarm_id: str, rounds: Iterable[int] | None = None) -> dict[str, list[bytes]]:
    """{"records", "rotations", "receipts", "checks": [...]} from the DHT: receipts and checks of
    `rounds` (default: every round a record found names; credit needs no others)."""
    records = collect_records(dht, swarm_id)
    if rounds is None:
        rounds = {verify_signed(blob).round for blob in records}
    by_round = collect_rounds(dht, swarm_id, rounds)
    return {"records": records, "rotations": collect_rotations(dht, swarm_id),
            "receipts": [blob for receipts, _ in by_round.values() for blob in receipts],
            "checks": [blob for _, checks in by_round.values() for blob in checks]}
