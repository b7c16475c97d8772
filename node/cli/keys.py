"""`swarmtune keygen`: create the node's Ed25519 identity key, or show its peer id.

    swarmtune keygen                    # new key at $SWARMTUNE_HOME/identity.key (default ~/.swarmtune)
    swarmtune keygen --key PATH         # new key at PATH (never overwrites)
    swarmtune keygen --show [--key P]   # print the peer id of an existing key
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
    p.set_defaults(func=_keygen)


def _keygen(args: argparse.Namespace) -> int:
    from node.cli import UserError
    from node.identity import IdentityError, default_identity_path, generate_identity, load_identity

    path = args.key or default_identity_path()
    try:
        if args.show:
            print(load_identity(path).peer_id)
            return 0
        identity = generate_identity(path)
    except IdentityError as e:
        raise UserError(str(e)) from None
    print(f"created {identity.path} (mode 0600)")
    print(f"peer id: {identity.peer_id}")
    print("Back this file up now (see `swarmtune keygen --help`): losing it loses this identity and its credit.")
    return 0
