"""`swarmtune keygen`: create the node's Ed25519 identity key, or show its peer id.

    swarmtune keygen                    # new key at $SWARMTUNE_HOME/identity.key (default ~/.swarmtune)
    swarmtune keygen --key PATH         # new key at PATH (never overwrites)
    swarmtune keygen --show [--key P]   # print the peer id of an existing key
    swarmtune keygen --rotate NEW_KEY --ledger L [--key OLD] [--out FILE]
                                        # new key + a statement signed by both keys that cuts
                                        # the old key's chain in L's swarm at its current head
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
    p.add_argument("--ledger", metavar="PATH", help="with --rotate: the old key's ledger (its head is where the old key stops)")
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


def _rotate(args: argparse.Namespace, old) -> int:
    import os
    import time
    from pathlib import Path

    from node.cli.errors import UserError
    from node.identity import rotate_identity
    from node.ledger import LedgerError, read_log
    from protocol.record import RecordError, record_hash, verify_signed

    if not args.ledger:
        raise UserError("--rotate needs --ledger PATH: the rotation cuts the old key's chain at that ledger's head")
    try:
        blobs = read_log(args.ledger).blobs
        records = [verify_signed(b) for b in blobs]
    except (LedgerError, RecordError) as e:
        raise UserError(f"cannot use ledger {args.ledger}: {e}") from None
    if not records:
        raise UserError(f"ledger {args.ledger} is empty: nothing to rotate away from (just start with a new key)")
    if records[-1].peer_id != old.peer_id:
        raise UserError(f"ledger {args.ledger} belongs to {records[-1].peer_id}, not to the key {old.path} ({old.peer_id})")
    new, statement = rotate_identity(
        old, args.rotate, swarm_id=records[-1].swarm_id, old_next_seq=records[-1].seq + 1,
        old_head_hash=record_hash(blobs[-1]), time_ms=int(time.time() * 1000),
    )
    out = Path(args.out) if args.out else Path(args.ledger).parent / "rotations.jsonl"
    with open(out, "ab") as f:
        f.write(statement + b"\n")
        f.flush()
        os.fsync(f.fileno())
    print(f"created {new.path}: peer id {new.peer_id}")
    print(f"rotation statement appended to {out}; records of {old.peer_id} after seq {records[-1].seq} are now invalid.")
    print(f"Publish the statement with your records, pass it to `swarmtune ledger verify --rotations {out}`,")
    print("and start the node with the new key and a new ledger.")
    return 0
