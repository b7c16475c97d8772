"""`swarmtune keygen`: create the node's Ed25519 identity key, or show its peer id.

    swarmtune keygen                    # new key at $SWARMTUNE_HOME/identity.key (default ~/.swarmtune)
    swarmtune keygen --key PATH         # new key at PATH (never overwrites)
    swarmtune keygen --show [--key P]   # print the peer id of an existing key
    swarmtune keygen --rotate NEW_KEY [--ledger L] [--key OLD] [--out FILE]
                                        # new key + a statement signed by both keys that cuts
                                        # the old key's chain in L's swarm at its current head
                                        # (L defaults to the ledger of the one swarm under the home);
                                        # `swarmtune run --key NEW_KEY` then continues with a new ledger
"""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "keygen",
        help="create this node's identity key (Ed25519; also its libp2p peer id)",
        description="Create the node's Ed25519 identity key (mode 0600), or print the peer id of an existing one. "
        "Back the key up: it is the node's identity and the owner of its credit.",
    )
    p.add_argument("--key", metavar="PATH", help="key file (default: $SWARMTUNE_HOME/identity.key or ~/.swarmtune/identity.key)")
    p.add_argument("--show", action="store_true", help="print the peer id of the existing key instead of creating one")
    p.add_argument("--rotate", metavar="NEW_KEY", help="create a new key at NEW_KEY and sign a rotation statement with both keys")
    p.add_argument("--ledger", metavar="PATH", help="with --rotate: the old key's ledger (its head is where the old key stops; default: the ledger of the "
                        "one swarm under $SWARMTUNE_HOME/swarms)")
    p.add_argument("--out", metavar="FILE", help="with --rotate: append the statement here (default: rotations.jsonl next to the ledger)")
    p.set_defaults(func=_keygen)


def _keygen(args: argparse.Namespace) -> int:
    from node.cli.errors import UserError
    from node.identity import IdentityError, default_identity_path, generate_identity, load_identity

    path = args.key or default_identity_path()
    try:
        if args.show:
            print(load_identity(path).peer_id)
            return 0
        if args.rotate:
            return _rotate(args, load_identity(path))
        identity = generate_identity(path)
    except IdentityError as e:
        raise UserError(str(e)) from None
    print(f"created {identity.path} (mode 0600)")
    print(f"peer id: {identity.peer_id}")
    print("Back this file up now (see `swarmtune keygen --help`): losing it loses this identity and its credit.")
    return 0


def _default_ledger() -> str:
    """The ledger of the one swarm under the home, for `keygen --rotate` without --ledger."""
    from node.cli.errors import UserError
    from node.config import default_home

    found = sorted((default_home() / "swarms").glob("*/ledger.jsonl"))
    if len(found) == 1:
        return str(found[0])
    where = f"{len(found)} swarm ledgers under {default_home() / 'swarms'}" + (
        ": " + ", ".join(map(str, found)) if found else "")
    raise UserError(f"--rotate needs --ledger PATH: the rotation cuts the old key's chain at that ledger's head "
                    f"({where}; pass the one of the swarm to rotate in)")


def _rotate(args: argparse.Namespace, old) -> int:
    import os
    import time
    from pathlib import Path

    from node.cli.errors import UserError
    from node.identity import rotate_identity
    from node.ledger import LedgerError, read_log
    from node.rotation import ROTATIONS_FILENAME, Head, RotationError, find_chain, read_rotation_file
    from protocol.record import ZERO_HASH, RecordError, record_hash, verify_signed

    ledger = args.ledger or _default_ledger()
    out = Path(args.out) if args.out else Path(ledger).parent / ROTATIONS_FILENAME
    try:
        blobs = read_log(ledger).blobs
        records = [verify_signed(b) for b in blobs]
    except (LedgerError, RecordError) as e:
        raise UserError(f"cannot use ledger {ledger}: {e}") from None
    if not records:
        raise UserError(f"ledger {ledger} is empty: nothing to rotate away from (just start with a new key)")
    head = records[-1]
    next_seq, head_hash = head.seq + 1, record_hash(blobs[-1])
    if head.peer_id != old.peer_id:
        # the ledger's key was rotated to this one, which has not written here yet (A->B, now B->C):
        # this key's chain in that swarm is empty, so it is cut at seq 0
        try:
            find_chain(read_rotation_file(out), head.swarm_id, Head(head, head_hash), head.peer_id, old.peer_id)
        except RotationError as e:
            raise UserError(f"ledger {ledger} belongs to {head.peer_id}, not to the key {old.path} ({old.peer_id}), "
                            f"and no rotation in {out} leads from it to that key ({e}). Pass --key with the ledger's key") from None
        next_seq, head_hash = 0, ZERO_HASH
    new, statement = rotate_identity(
        old, args.rotate, swarm_id=head.swarm_id, old_next_seq=next_seq,
        old_head_hash=head_hash, time_ms=int(time.time() * 1000),
    )
    with open(out, "ab") as f:
        f.write(statement + b"\n")
        f.flush()
        os.fsync(f.fileno())
    print(f"created {new.path}: peer id {new.peer_id}")
    print(f"rotation statement appended to {out}; records of {old.peer_id} from seq {next_seq} on are now invalid.")
    print(f"Start the node with the new key (`swarmtune run --key {new.path} ...`): it keeps the old ledger as")
    print(f"ledger-{old.peer_id}.jsonl, starts a new one at seq 0 and publishes the statement in the DHT.")
    print(f"Verify both with `swarmtune ledger verify --ledger OLD NEW --rotations {out}`.")
    return 0
