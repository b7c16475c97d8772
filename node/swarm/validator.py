"""Publishing contribution records in the DHT under subkeys only their owner can fill.

Layout: DHT key `f"{swarm_id}/records"`, one subkey per record `"[ed25519-owner:<peer id>]:<seq>"`,
value = the signed record envelope (protocol/record.py), exactly the bytes of the ledger line.

`RecordsValidator` accepts a value under that key only if it is a valid signed record of
this swarm whose signer is the subkey's owner and whose seq is the subkey's seq, within the
size bound. So nobody can write into another peer's subkeys, and re-storing an old record
under a newer seq is refused; re-storing a record under its own subkey only stores the same
bytes again (harmless). Other keys pass untouched, so it composes with hivemind's validators.

Why not hivemind's `[owner:...]` marker: hivemind's RSASignatureValidator (installed by
hivemind.Optimizer's progress tracker) parses whatever follows `[owner:` as an RSA key and
would choke on an Ed25519 peer id; our records carry their own signature, so the marker
here is `[ed25519-owner:` and the check is ours.

    dht = hivemind.DHT(..., record_validators=[RecordsValidator(swarm_id)])
    publish_record(dht, swarm_id, blob, expiration=get_dht_time() + 3600)
    blobs = collect_records(dht, swarm_id)   # sorted by (peer, seq); bad values dropped and logged
"""

from __future__ import annotations

import logging
import re
from typing import Any

from hivemind.dht import DHT
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer, get_dht_time

from protocol.record import MAX_BLOB_BYTES, RecordError, verify_signed

logger = logging.getLogger(__name__)

_SUBKEY_RE = re.compile(r"\[ed25519-owner:([1-9A-HJ-NP-Za-km-z]{1,64})\]:(0|[1-9][0-9]{0,15})")
_MSGPACK_OVERHEAD = 8  # bin32 header: a bytes value is its length + at most 5 bytes


def records_key(swarm_id: str) -> str:
    return f"{swarm_id}/records"


def owner_subkey(peer_id: str, seq: int) -> str:
    return f"[ed25519-owner:{peer_id}]:{seq}"


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


class RecordsValidator(RecordValidatorBase):
    """Accept values under `{swarm_id}/records` only if they pass `check_value`."""

    def __init__(self, swarm_id: str):
        self.swarm_id = swarm_id
        self._key_id = DHTID.generate(source=records_key(swarm_id)).to_bytes()

    def explain(self, record: DHTRecord) -> str:
        """Why `record` is refused; "" if accepted (or not under this swarm's records key)."""
        if record.key != self._key_id:
            return ""
        if len(record.value) > MAX_BLOB_BYTES + _MSGPACK_OVERHEAD:
            return f"value of {len(record.value)} bytes is over the {MAX_BLOB_BYTES}-byte bound"
        try:
            subkey = MSGPackSerializer.loads(record.subkey)
            value = MSGPackSerializer.loads(record.value)
        except Exception as e:  # msgpack raises many types on junk; all mean "badly encoded"
            return f"badly encoded DHT value: {type(e).__name__}"
        return check_value(self.swarm_id, subkey, value)

    def validate(self, record: DHTRecord) -> bool:
        reason = self.explain(record)
        if reason:
            logger.warning(f"refused a record under {records_key(self.swarm_id)}: {reason}")
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
    found = dht.get(records_key(swarm_id), latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    kept = []
    for subkey, item in found.value.items():
        value = getattr(item, "value", None)
        reason = check_value(swarm_id, subkey, value)
        if reason:
            logger.warning(f"dropped a DHT value under {records_key(swarm_id)}: {reason}")
            continue
        match = _SUBKEY_RE.fullmatch(subkey)
        kept.append((match.group(1), int(match.group(2)), value))
    return [blob for _, _, blob in sorted(kept)]
