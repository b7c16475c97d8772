"""Round receipts and spot-check statements in the DHT, one key per round, so a node reads one round's worth.

Layout: `f"{swarm_id}/receipts/{round}"`, subkey `"[ed25519-owner:<signer>]:<shard>"`, value = the signed
receipt (protocol/receipt.py), and `f"{swarm_id}/checks/{round}"`, subkey
`"[ed25519-owner:<checker>]:<shard>:<target>"`. Values that are not valid statements of that swarm, round and
owner are dropped on reading.

    publish_receipt(dht, swarm_id, blob, expiration);  collect_receipts(dht, swarm_id, round_)
    publish_check(dht, swarm_id, blob, expiration);    collect_checks(dht, swarm_id, round_)
"""

from __future__ import annotations

import logging

from hivemind.dht import DHT

from protocol.receipt import verify_check, verify_receipt
from protocol.record import RecordError

logger = logging.getLogger(__name__)

# The call to the DHT process travels through a pipe that a message over 16 KiB can break (see
# Swarm.store_many); a receipt of a group over ~80 members is bigger, and stays in receipts.jsonl only.
MAX_DHT_VALUE_BYTES = 15 * 1024


def receipts_key(swarm_id: str, round_: int) -> str:
    return f"{swarm_id}/receipts/{round_}"


def checks_key(swarm_id: str, round_: int) -> str:
    return f"{swarm_id}/checks/{round_}"


def receipt_subkey(peer_id: str, shard: int) -> str:
    return f"[ed25519-owner:{peer_id}]:{shard}"


def check_subkey(peer_id: str, shard: int, target: str) -> str:
    return f"[ed25519-owner:{peer_id}]:{shard}:{target}"


def publish_receipt(dht: DHT, swarm_id: str, blob: bytes, expiration: float, return_future: bool = False):
    r = verify_receipt(blob)
    if r.swarm_id != swarm_id:
        raise ValueError("refusing to publish a receipt of another swarm")
    if len(blob) > MAX_DHT_VALUE_BYTES:
        logger.warning(f"receipt of round {r.round} shard {r.shard} ({len(r.members)} members, {len(blob)} bytes) "
                       f"is over {MAX_DHT_VALUE_BYTES} bytes: kept in receipts.jsonl, not published to the DHT")
        return False
    stored = dht.store(receipts_key(swarm_id, r.round), blob, expiration_time=expiration,
                       subkey=receipt_subkey(r.peer_id, r.shard), return_future=return_future)
    return stored if return_future else bool(stored)


def publish_check(dht: DHT, swarm_id: str, blob: bytes, expiration: float, return_future: bool = False):
    c = verify_check(blob)
    if c.swarm_id != swarm_id:
        raise ValueError("refusing to publish a spot-check of another swarm")
    stored = dht.store(checks_key(swarm_id, c.round), blob, expiration_time=expiration,
                       subkey=check_subkey(c.peer_id, c.shard, c.target), return_future=return_future)
    return stored if return_future else bool(stored)


def _collect(dht: DHT, key: str, subkey_of, verify) -> list[bytes]:
    return _kept(key, dht.get(key, latest=True), subkey_of, verify)


def _kept(key: str, found, subkey_of, verify) -> list[bytes]:
    """The valid statements of what a DHT read of `key` found, sorted by subkey."""
    if found is None or not isinstance(found.value, dict):
        return []
    kept = []
    for subkey, item in found.value.items():
        value = getattr(item, "value", None)
        try:
            statement = verify(value) if isinstance(value, bytes) else None
        except RecordError as e:
            statement = None
            logger.info("dropped a DHT value under %s: %s", key, e)
        if statement is not None and subkey_of(statement) == subkey:
            kept.append((subkey, value))
    return [blob for _, blob in sorted(kept)]


def _receipt_subkey(swarm_id: str, round_: int):
    return lambda r: r.round == round_ and r.swarm_id == swarm_id and receipt_subkey(r.peer_id, r.shard)


def _check_subkey(swarm_id: str, round_: int):
    return lambda c: c.round == round_ and c.swarm_id == swarm_id and check_subkey(c.peer_id, c.shard, c.target)


def collect_receipts(dht: DHT, swarm_id: str, round_: int) -> list[bytes]:
    """The valid receipts of one round, each under its signer's subkey."""
    return _collect(dht, receipts_key(swarm_id, round_), _receipt_subkey(swarm_id, round_), verify_receipt)


def collect_checks(dht: DHT, swarm_id: str, round_: int) -> list[bytes]:
    """The valid spot-check statements of one round, each under its checker's subkey."""
    return _collect(dht, checks_key(swarm_id, round_), _check_subkey(swarm_id, round_), verify_check)


READS_IN_FLIGHT = 32  # DHT reads collect_rounds keeps going at once


def collect_rounds(dht: DHT, swarm_id: str, rounds) -> dict[int, tuple[list[bytes], list[bytes]]]:
    """{round: (its valid receipts, its valid checks)} for these rounds. Two keys a round, read READS_IN_FLIGHT at
    a time: one at a time, each read waits out its own network round trips, and a day of 10 s rounds is 17 k."""
    wanted = [(kind, r) for r in sorted(set(rounds)) for kind in ("receipts", "checks")]
    found = {}
    for i in range(0, len(wanted), READS_IN_FLIGHT):
        batch = wanted[i : i + READS_IN_FLIGHT]
        futures = [dht.get((receipts_key if kind == "receipts" else checks_key)(swarm_id, r), latest=True,
                           return_future=True) for kind, r in batch]
        for item, future in zip(batch, futures):
            found[item] = future.result()
    return {r: (_kept(receipts_key(swarm_id, r), found["receipts", r], _receipt_subkey(swarm_id, r), verify_receipt),
                _kept(checks_key(swarm_id, r), found["checks", r], _check_subkey(swarm_id, r), verify_check))
            for r in sorted(set(rounds))}
