"""The `swarmtune` command line.

Each submodule owns a group of subcommands and exposes `register(subparsers)`;
heavy imports (torch, hivemind) happen inside the handlers so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from node import __version__
from node.cli.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from node.cli import control, doctor, keys, ledger, serve, service, train

    parser = argparse.ArgumentParser(
        prog="swarmtune",
        description="Fine-tune LoRA adapters together with peers over a hivemind DHT.",
    )
    parser.add_argument("--version", action="version", version=f"swarmtune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (train, keys, ledger, control, doctor, serve, service):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from node.logs import quiet_unactionable

    quiet_unactionable()  # before anything imports bitsandbytes
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"swarmtune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
