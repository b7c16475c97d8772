"""A rotated key continues in a swarm: whose ledger is whose, the chain of rotation statements, the handover.

`swarmtune keygen --rotate NEW --ledger L` (node/cli/keys.py) appends a statement signed by the old
and the new key (protocol/record.py KeyRotation) to `rotations.jsonl` next to the ledger. When the
node later starts with NEW, the swarm's folder still holds the old key's `ledger.jsonl`:

    plan = plan_ledger(workdir, peer_id, key_path)   # in prepare(): RotationError before anything is written
    if plan: retire_ledger(plan)                     # ledger.jsonl -> ledger-<old peer id>.jsonl (atomic, fsynced)
    Ledger.open(workdir / "ledger.jsonl")            # the new key's chain starts at seq 0

A ledger of another key is continued only through statements that cut that ledger at its head
(`old_next_seq` = head seq + 1, `old_head_hash` = the head's hash) and lead, one key after the
other, to the running key; a key in the middle of the chain (A->B, B->C with B never run) must
have cut its chain at seq 0. Anything else is refused with the keys involved and the fix.

The statements are also published in the DHT, so that `ledger verify --dht-peer` sees them: key
`f"{swarm_id}/rotations"`, subkey `"[ed25519-owner:<old peer id>]"`, value the statement's bytes
(`rotation_entry`, read back with `read_dht_rotations`).
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
from pathlib import Path
from typing import Iterable

from node.durable import fsync_dir
from node.ledger import LedgerError, read_log
from protocol.record import ZERO_HASH, ContributionRecord, KeyRotation, RecordError, record_hash, verify_rotation, verify_signed

logger = logging.getLogger(__name__)

LEDGER_FILENAME = "ledger.jsonl"
ROTATIONS_FILENAME = "rotations.jsonl"
MAX_CHAIN = 64  # rotations followed from a ledger's key to the running one (a loop is refused long before)


class RotationError(Exception):
    """The swarm's ledger belongs to another key and no valid rotation leads to this one; says the fix."""


def retired_ledger_name(peer_id: str) -> str:
    return f"ledger-{peer_id}.jsonl"


# ---------------------------------------------------------------- reading ledgers and statements


@dataclasses.dataclass(frozen=True)
class Head:
    record: ContributionRecord
    hash: str  # record_hash of the head's line


def ledger_head(path: Path) -> Head | None:
    """The last whole, validly signed record of a ledger file, read without changing it (a torn or
    invalid last line is skipped, as Ledger.open drops it); None for a missing or empty ledger."""
    if not path.exists():
        return None
    blobs = read_log(path).blobs
    for blob in reversed(blobs[-2:]):  # only the last line can be torn or junk
        try:
            return Head(verify_signed(blob), record_hash(blob))
        except RecordError:
            continue
    return None


def read_rotation_file(path: Path) -> list[bytes]:
    """The valid statements in a rotations file (one per line); bad lines are logged and skipped."""
    try:
        lines = path.read_bytes().split(b"\n")
    except FileNotFoundError:
        return []
    except OSError as e:
        raise RotationError(f"cannot read {path}: {e.strerror}; check its permissions") from None
    kept = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            verify_rotation(line)
        except RecordError as e:
            logger.warning("%s, line %d: not a valid rotation statement (%s); ignored", path, i + 1, e)
            continue
        kept.append(line)
    return kept


def swarm_rotations(blobs: Iterable[bytes], swarm_id: str) -> list[tuple[bytes, KeyRotation]]:
    out = []
    for blob in blobs:
        rotation = verify_rotation(blob)
        if rotation.swarm_id == swarm_id:
            out.append((blob, rotation))
    return out


def find_chain(blobs: Iterable[bytes], swarm_id: str, head: Head | None, from_peer: str, to_peer: str) -> list[bytes]:
    """The statements leading from `from_peer` (whose chain ends at `head`; None: it wrote nothing)
    to `to_peer` in this swarm. RotationError says which link is missing or does not fit."""
    by_old: dict[str, list[tuple[bytes, KeyRotation]]] = {}
    for blob, rotation in swarm_rotations(blobs, swarm_id):
        by_old.setdefault(rotation.old_peer_id, []).append((blob, rotation))
    chain: list[bytes] = []
    peer, next_seq, head_hash = from_peer, (head.record.seq + 1 if head else 0), (head.hash if head else ZERO_HASH)
    while peer != to_peer:
        if len(chain) >= MAX_CHAIN:
            raise RotationError(f"the rotation statements from {from_peer} loop or run past {MAX_CHAIN} keys")
        candidates = by_old.get(peer, [])
        fitting = [(b, r) for b, r in candidates if r.old_next_seq == next_seq and r.old_head_hash == head_hash]
        if not fitting:
            if candidates:
                r = candidates[-1][1]
                raise RotationError(
                    f"the rotation of {peer} to {r.new_peer_id} cuts its chain at seq {r.old_next_seq}, but that "
                    f"key's chain here ends at seq {next_seq - 1} ({'hash ' + head_hash[:16] + '…' if next_seq else 'no records'}): "
                    f"the statement does not fit this ledger (records were written after it, or it is from another copy)")
            raise RotationError(f"no rotation statement of {peer} in this swarm")
        blob, rotation = fitting[-1]
        chain.append(blob)
        peer, next_seq, head_hash = rotation.new_peer_id, 0, ZERO_HASH  # a key in the middle wrote nothing here
    return chain


# ---------------------------------------------------------------- the daemon's handover


@dataclasses.dataclass(frozen=True)
class LedgerPlan:
    """The swarm's ledger is another key's, and `chain` leads from it to the running key."""

    path: Path  # workdir/ledger.jsonl
    head: Head  # its last record (checked again at the rename)
    chain: tuple[bytes, ...]

    @property
    def old_peer_id(self) -> str:
        return self.head.record.peer_id

    @property
    def retired_path(self) -> Path:
        return self.path.with_name(retired_ledger_name(self.old_peer_id))


def plan_ledger(workdir: Path, peer_id: str, key_path: Path | None = None) -> LedgerPlan | None:
    """None when `workdir`'s ledger is missing, empty or this key's; a LedgerPlan when it is another key's
    and `rotations.jsonl` there leads from that key to this one; RotationError otherwise. Writes nothing."""
    path = Path(workdir) / LEDGER_FILENAME
    try:
        head = ledger_head(path)
    except LedgerError as e:
        raise RotationError(str(e)) from None
    if head is None or head.record.peer_id == peer_id:
        return None
    old = head.record.peer_id
    rotations = path.with_name(ROTATIONS_FILENAME)
    try:
        chain = find_chain(read_rotation_file(rotations), head.record.swarm_id, head, old, peer_id)
    except RotationError as e:
        key = f" ({key_path})" if key_path else ""
        raise RotationError(
            f"ledger {path} is signed by key {old} (its last record is seq {head.record.seq}, round {head.record.round}), "
            f"but this node runs key {peer_id}{key}, and {rotations} holds no rotation from the one to the other "
            f"that fits that ledger: {e}. Fix: run with the old key (--key OLD_KEY_FILE), or hand over to a new key "
            f"by rotation: `swarmtune keygen --key OLD_KEY_FILE --rotate NEW_KEY_FILE --ledger {path}`, then "
            f"`swarmtune run --key NEW_KEY_FILE ...` (a key made some other way cannot take over that ledger; "
            f"to start afresh under this key, move {path} away)") from None
    retired = path.with_name(retired_ledger_name(old))
    if retired.exists():
        raise RotationError(f"cannot keep the old key's ledger as {retired}: that file exists already. "
                            f"Move one of {path} and {retired} away (both stay verifiable), then start again")
    return LedgerPlan(path, head, tuple(chain))


def retire_ledger(plan: LedgerPlan) -> Path:
    """Rename the old key's ledger to ledger-<old peer id>.jsonl (atomic, directory fsynced), under its lock
    and only if its head is still the one the plan checked. Returns the new path."""
    try:
        fd = os.open(plan.path, os.O_RDONLY)
    except OSError as e:
        raise RotationError(f"cannot open ledger {plan.path}: {e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RotationError(f"ledger {plan.path} is in use by another process (is a node with the old key "
                                f"{plan.old_peer_id} running?); stop it first") from None
        try:
            now = ledger_head(plan.path)
        except LedgerError as e:
            raise RotationError(str(e)) from None
        if now != plan.head:
            raise RotationError(f"ledger {plan.path} changed while the node started (the old key wrote to it); start again")
        if plan.retired_path.exists():
            raise RotationError(f"{plan.retired_path} exists already; move it away and start again")
        os.rename(plan.path, plan.retired_path)
        fsync_dir(plan.path.parent)
    finally:
        os.close(fd)
    logger.info("key rotation: kept the ledger of %s as %s (seq 0..%d); this key's ledger starts at seq 0",
                plan.old_peer_id, plan.retired_path.name, plan.head.record.seq)
    return plan.retired_path


# ---------------------------------------------------------------- the statements in the DHT


def rotations_key(swarm_id: str) -> str:
    return f"{swarm_id}/rotations"


def rotation_subkey(old_peer_id: str) -> str:
    return f"[ed25519-owner:{old_peer_id}]"


def rotation_entry(blob: bytes) -> tuple[str, str]:
    """(DHT key, subkey) a statement is stored under (RecordError for a statement that does not verify)."""
    rotation = verify_rotation(blob)
    return rotations_key(rotation.swarm_id), rotation_subkey(rotation.old_peer_id)


def read_dht_rotations(dht, swarm_id: str) -> list[bytes]:
    """Every valid statement of the swarm found in the DHT (`dht` is a hivemind.DHT; anything under the key
    that does not verify, or sits under another key's subkey, is dropped)."""
    found = dht.get(rotations_key(swarm_id), latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    kept = []
    for subkey, item in found.value.items():
        value = getattr(item, "value", None)
        try:
            rotation = verify_rotation(value) if isinstance(value, bytes) else None
        except RecordError:
            rotation = None
        if rotation is None or rotation.swarm_id != swarm_id or subkey != rotation_subkey(rotation.old_peer_id):
            logger.warning("dropped a DHT value under %s: not a valid rotation statement of its subkey's key",
                           rotations_key(swarm_id))
            continue
        kept.append((subkey, value))
    return [v for _, v in sorted(kept)]
