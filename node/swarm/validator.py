"""Publishing signed statements in the DHT under subkeys only their owner can fill.

Layout, per swarm (values are the signed envelopes of protocol/, exactly the bytes of the ledger
and receipts lines):

    key                      subkey                                             value
    {swarm_id}/records       [ed25519-owner:<peer>]:<seq>                       a record of <peer> with that seq
    {swarm_id}/receipts      [ed25519-owner:<peer>]:<round>:<shard>             a receipt signed by <peer> for that round, shard
    {swarm_id}/checks        [ed25519-owner:<peer>]:<round>:<shard>:<target>    a spot check by <peer> of <target>
    {swarm_id}/rotations     [ed25519-owner:<old peer>]                         a key rotation retiring <old peer>

`RecordsValidator` accepts a value under one of these keys only if it is a valid signed statement
of that kind for this swarm, signed by the subkey's owner, matching what the subkey names, within
its size bound. So nobody can write into another peer's subkeys, and re-storing an old record under
a newer seq (or a receipt under another round) is refused; re-storing a statement under its own
subkey only stores the same bytes again (harmless). Other keys pass untouched, so it composes with
hivemind's validators.

Why not hivemind's `[owner:...]` marker: hivemind's RSASignatureValidator (installed by
hivemind.Optimizer's progress tracker) parses whatever follows `[owner:` as an RSA key and
would choke on an Ed25519 peer id; our statements carry their own signature, so the marker
here is `[ed25519-owner:` and the check is ours.

    dht = hivemind.DHT(..., record_validators=[RecordsValidator(swarm_id)])
    publish_record(dht, swarm_id, blob, expiration=get_dht_time() + 3600)
    blobs = collect_records(dht, swarm_id)   # sorted by (peer, seq); bad values dropped and logged
    publish_receipt / collect_receipts, publish_check / collect_checks, publish_rotation / collect_rotations
"""

from __future__ import annotations

import logging
import re
from typing import Any, Sequence

from hivemind.dht import DHT
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer, get_dht_time

from protocol.receipt import MAX_CHECK_BYTES, MAX_RECEIPT_BYTES, verify_check, verify_receipt
from protocol.record import MAX_BLOB_BYTES, RecordError, verify_rotation, verify_signed

logger = logging.getLogger(__name__)

_PEER = r"([1-9A-HJ-NP-Za-km-z]{1,64})"
_INT = r"(0|[1-9][0-9]{0,15})"
_SUBKEY_RE = re.compile(rf"\[ed25519-owner:{_PEER}\]:{_INT}")
_RECEIPT_SUBKEY_RE = re.compile(rf"\[ed25519-owner:{_PEER}\]:{_INT}:{_INT}")
_CHECK_SUBKEY_RE = re.compile(rf"\[ed25519-owner:{_PEER}\]:{_INT}:{_INT}:{_PEER}")
_ROTATION_SUBKEY_RE = re.compile(rf"\[ed25519-owner:{_PEER}\]")
_MSGPACK_OVERHEAD = 8  # bin32 header: a bytes value is its length + at most 5 bytes


def records_key(swarm_id: str) -> str:
    return f"{swarm_id}/records"


def owner_subkey(peer_id: str, seq: int) -> str:
    return f"[ed25519-owner:{peer_id}]:{seq}"


def receipts_key(swarm_id: str) -> str:
    return f"{swarm_id}/receipts"


def checks_key(swarm_id: str) -> str:
    return f"{swarm_id}/checks"


def rotations_key(swarm_id: str) -> str:
    return f"{swarm_id}/rotations"


def receipt_subkey(peer_id: str, round_: int, shard: int) -> str:
    return f"[ed25519-owner:{peer_id}]:{round_}:{shard}"


def check_subkey(peer_id: str, round_: int, shard: int, target: str) -> str:
    return f"[ed25519-owner:{peer_id}]:{round_}:{shard}:{target}"


def rotation_subkey(old_peer_id: str) -> str:
    return f"[ed25519-owner:{old_peer_id}]"


def check_value(swarm_id: str, subkey: Any, value: Any) -> str:
    """Why (subkey, value) may not be stored under this swarm's records key; "" if it may."""
    if not isinstance(subkey, str):
        return f"subkey must be a string, got {type(subkey).__name__}"
    match = _SUBKEY_RE.fullmatch(subkey)
    if match is None:
        return f"subkey {subkey[:100]!r} is not of the form [ed25519-owner:<peer id>]:<seq>"
    if not isinstance(value, bytes):
        return f"value must be bytes, got {type(value).__name__}"
    try:
        record = verify_signed(value)
    except RecordError as e:
        return f"value rejected: {e}"
    owner, seq = match.group(1), int(match.group(2))
    if record.peer_id != owner:
        return f"record signed by {record.peer_id} written to the subkey of {owner}"
    if record.seq != seq:
        return f"record seq {record.seq} written to the subkey for seq {seq}"
    if record.swarm_id != swarm_id:
        return f"record is for swarm {record.swarm_id}, not {swarm_id}"
    return ""


def _parse(subkey: Any, pattern: re.Pattern, form: str, value: Any) -> tuple[re.Match | None, str]:
    if not isinstance(subkey, str):
        return None, f"subkey must be a string, got {type(subkey).__name__}"
    match = pattern.fullmatch(subkey)
    if match is None:
        return None, f"subkey {subkey[:100]!r} is not of the form {form}"
    if not isinstance(value, bytes):
        return None, f"value must be bytes, got {type(value).__name__}"
    return match, ""


def check_receipt_value(swarm_id: str, subkey: Any, value: Any) -> str:
    """Why (subkey, value) may not be stored under this swarm's receipts key; "" if it may."""
    match, reason = _parse(subkey, _RECEIPT_SUBKEY_RE, "[ed25519-owner:<peer id>]:<round>:<shard>", value)
    if reason:
        return reason
    try:
        receipt = verify_receipt(value)
    except RecordError as e:
        return f"value rejected: {e}"
    owner, round_, shard = match.group(1), int(match.group(2)), int(match.group(3))
    if receipt.peer_id != owner:
        return f"receipt signed by {receipt.peer_id} written to the subkey of {owner}"
    if (receipt.round, receipt.shard) != (round_, shard):
        return f"receipt for round {receipt.round} shard {receipt.shard} written to the subkey for round {round_} shard {shard}"
    if receipt.swarm_id != swarm_id:
        return f"receipt is for swarm {receipt.swarm_id}, not {swarm_id}"
    return ""


def check_check_value(swarm_id: str, subkey: Any, value: Any) -> str:
    """Why (subkey, value) may not be stored under this swarm's checks key; "" if it may."""
    match, reason = _parse(subkey, _CHECK_SUBKEY_RE, "[ed25519-owner:<peer id>]:<round>:<shard>:<target>", value)
    if reason:
        return reason
    try:
        check = verify_check(value)
    except RecordError as e:
        return f"value rejected: {e}"
    owner, round_, shard, target = match.group(1), int(match.group(2)), int(match.group(3)), match.group(4)
    if check.peer_id != owner:
        return f"spot check signed by {check.peer_id} written to the subkey of {owner}"
    if (check.round, check.shard, check.target) != (round_, shard, target):
        return (f"spot check of {check.target} in round {check.round} shard {check.shard} written to the subkey "
                f"for {target} in round {round_} shard {shard}")
    if check.swarm_id != swarm_id:
        return f"spot check is for swarm {check.swarm_id}, not {swarm_id}"
    return ""


def check_rotation_value(swarm_id: str, subkey: Any, value: Any) -> str:
    """Why (subkey, value) may not be stored under this swarm's rotations key; "" if it may."""
    match, reason = _parse(subkey, _ROTATION_SUBKEY_RE, "[ed25519-owner:<old peer id>]", value)
    if reason:
        return reason
    try:
        rotation = verify_rotation(value)
    except RecordError as e:
        return f"value rejected: {e}"
    if rotation.old_peer_id != match.group(1):
        return f"rotation of {rotation.old_peer_id} written to the subkey of {match.group(1)}"
    if rotation.swarm_id != swarm_id:
        return f"rotation is for swarm {rotation.swarm_id}, not {swarm_id}"
    return ""


# kind -> (DHT key, value bound, check, subkey pattern): the four keys a swarm's validator guards
_KINDS = {
    "records": (records_key, MAX_BLOB_BYTES, check_value, _SUBKEY_RE),
    "receipts": (receipts_key, MAX_RECEIPT_BYTES, check_receipt_value, _RECEIPT_SUBKEY_RE),
    "checks": (checks_key, MAX_CHECK_BYTES, check_check_value, _CHECK_SUBKEY_RE),
    "rotations": (rotations_key, MAX_BLOB_BYTES, check_rotation_value, _ROTATION_SUBKEY_RE),
}


class RecordsValidator(RecordValidatorBase):
    """Accept values under `{swarm_id}/records`, `/receipts`, `/checks` and `/rotations` only if
    they pass that kind's check (`check_value`, `check_receipt_value`, ...)."""

    def __init__(self, swarm_id: str):
        self.swarm_id = swarm_id
        self._keys = {
            DHTID.generate(source=key_of(swarm_id)).to_bytes(): (key_of(swarm_id), bound, check)
            for key_of, bound, check, _ in _KINDS.values()
        }

    def explain(self, record: DHTRecord) -> str:
        """Why `record` is refused; "" if accepted (or not under one of this swarm's keys)."""
        kind = self._keys.get(record.key)
        if kind is None:
            return ""
        _, bound, check = kind
        if len(record.value) > bound + _MSGPACK_OVERHEAD:
            return f"value of {len(record.value)} bytes is over the {bound}-byte bound"
        try:
            subkey = MSGPackSerializer.loads(record.subkey)
            value = MSGPackSerializer.loads(record.value)
        except Exception as e:  # msgpack raises many types on junk; all mean "badly encoded"
            return f"badly encoded DHT value: {type(e).__name__}"
        return check(self.swarm_id, subkey, value)

    def validate(self, record: DHTRecord) -> bool:
        reason = self.explain(record)
        if reason:
            logger.warning(f"refused a value under {self._keys[record.key][0]}: {reason}")
        return not reason

    @property
    def priority(self) -> int:
        return 5  # below RSASignatureValidator (10): it strips its signature before we look

    def merge_with(self, other: RecordValidatorBase) -> bool:
        # Two validators for the same swarm are one; different swarms stay separate and each
        # passes the other's keys.
        return isinstance(other, RecordsValidator) and other.swarm_id == self.swarm_id


def publish_record(dht: DHT, swarm_id: str, blob: bytes, expiration: float) -> bool:
    """Store a signed record under its owner's subkey until `expiration` (absolute DHT time,
    e.g. `get_dht_time() + 3600`). Returns whether the DHT accepted it."""
    reason = ""
    try:
        record = verify_signed(blob)
    except RecordError as e:
        reason = str(e)
    if reason or record.swarm_id != swarm_id:
        raise ValueError(f"refusing to publish an invalid record: {reason or 'it belongs to another swarm'}")
    if expiration <= get_dht_time():
        raise ValueError("expiration is an absolute DHT time (get_dht_time() + ttl seconds); got a time in the past")
    return bool(
        dht.store(records_key(swarm_id), blob, expiration_time=expiration, subkey=owner_subkey(record.peer_id, record.seq))
    )


def collect_records(dht: DHT, swarm_id: str) -> list[bytes]:
    """Every valid record of the swarm found in the DHT, sorted by (peer id, seq)."""
    return _collect(dht, swarm_id, "records")


def _collect(dht: DHT, swarm_id: str, kind: str) -> list[bytes]:
    """Every valid value of `kind` in the DHT, sorted by its subkey's fields (numbers as numbers)."""
    key_of, _, check, pattern = _KINDS[kind]
    key = key_of(swarm_id)
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
    return [blob for _, blob in sorted(kept)]


def _publish(dht: DHT, swarm_id: str, kind: str, statement: Any, subkey: str, blob: bytes, expiration: float) -> bool:
    if statement.swarm_id != swarm_id:
        raise ValueError(f"refusing to publish a {kind} of another swarm ({statement.swarm_id})")
    if expiration <= get_dht_time():
        raise ValueError("expiration is an absolute DHT time (get_dht_time() + ttl seconds); got a time in the past")
    return bool(dht.store(_KINDS[kind][0](swarm_id), blob, expiration_time=expiration, subkey=subkey))


def _verified(verify: Any, blob: bytes, kind: str) -> Any:
    try:
        return verify(blob)
    except RecordError as e:
        raise ValueError(f"refusing to publish an invalid {kind}: {e}") from None


def publish_receipt(dht: DHT, swarm_id: str, blob: bytes, expiration: float) -> bool:
    """Store a signed round receipt under its signer's subkey for its round and shard until
    `expiration` (absolute DHT time). Returns whether the DHT accepted it."""
    r = _verified(verify_receipt, blob, "receipt")
    return _publish(dht, swarm_id, "receipts", r, receipt_subkey(r.peer_id, r.round, r.shard), blob, expiration)


def collect_receipts(dht: DHT, swarm_id: str) -> list[bytes]:
    """Every valid receipt of the swarm found in the DHT, sorted by (signer, round, shard)."""
    return _collect(dht, swarm_id, "receipts")


def publish_check(dht: DHT, swarm_id: str, blob: bytes, expiration: float) -> bool:
    """Store a signed spot check under its checker's subkey for (round, shard, target)."""
    c = _verified(verify_check, blob, "spot check")
    return _publish(dht, swarm_id, "checks", c, check_subkey(c.peer_id, c.round, c.shard, c.target), blob, expiration)


def collect_checks(dht: DHT, swarm_id: str) -> list[bytes]:
    """Every valid spot check of the swarm found in the DHT, sorted by (checker, round, shard, target)."""
    return _collect(dht, swarm_id, "checks")


def publish_rotation(dht: DHT, swarm_id: str, blob: bytes, expiration: float) -> bool:
    """Store a key rotation statement under the retired key's subkey."""
    r = _verified(verify_rotation, blob, "rotation")
    return _publish(dht, swarm_id, "rotations", r, rotation_subkey(r.old_peer_id), blob, expiration)


def collect_rotations(dht: DHT, swarm_id: str) -> list[bytes]:
    """Every valid key rotation statement of the swarm found in the DHT, sorted by old key."""
    return _collect(dht, swarm_id, "rotations")


def collect_all(dht: DHT, swarm_id: str, kinds: Sequence[str] = tuple(_KINDS)) -> dict[str, list[bytes]]:
    """{"records": [...], "receipts": [...], "checks": [...], "rotations": [...]} from the DHT."""
    unknown = set(kinds) - set(_KINDS)
    if unknown:
        raise ValueError(f"unknown statement kind(s) {sorted(unknown)}; known: {sorted(_KINDS)}")
    return {kind: _collect(dht, swarm_id, kind) for kind in kinds}
