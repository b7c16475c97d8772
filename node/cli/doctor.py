"""`swarmtune doctor`: check everything a node needs before it joins a swarm.

    swarmtune doctor [--manifest swarm.toml] [--key PATH] [--home DIR] [--host-maddrs ...]
                     [--announce-maddrs ...] [--initial-peers ...] [--base-model PATH] [--data PATH] [--json]

Prints a pass/warn/fail table with a fix for every failure (the checks: `node/doctor.py`).
Exit status: 1 when any check fails, 0 otherwise (warnings do not fail), 2 for bad input.
Flags, `SWARMTUNE_*` variables and `--config` resolve exactly as for `swarmtune run`.
"""

from __future__ import annotations

import json

from node.cli.errors import UserError

_FLAGS = ("manifest", "key", "home", "host_maddrs", "announce_maddrs", "initial_peers", "base_model", "data")


def register(sub) -> None:
    from node.config import FIELDS

    p = sub.add_parser(
        "doctor",
        help="check p2p, reachability, bandwidth, hardware, key, model and data before joining",
        description="Check everything a node needs before it joins: the p2p daemon starts, its address is "
                    "reachable from a peer, bandwidth to a peer, GPU/RAM/disk, the identity key, and (with "
                    "--manifest) the base model fingerprint and data digest. Exits 1 when a check fails.",
    )
    p.add_argument("--config", help="node TOML file (as for `swarmtune run`)")
    for name in _FLAGS:
        flag = "--" + name.replace("_", "-")
        if isinstance(FIELDS[name].default, tuple):
            p.add_argument(flag, dest=name, nargs="*", default=None, metavar="ADDR", help=_doc(name))
        else:
            p.add_argument(flag, dest=name, default=None, metavar=name.split("_")[-1].upper(), help=_doc(name))
    p.add_argument("--no-network", dest="network", action="store_false",
                   help="skip the p2p, reachability and bandwidth checks")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_doctor)


def _doc(name: str) -> str:
    from node.cli.flags import field_help
    from node.config import NodeConfig

    return field_help(NodeConfig, name)


_STYLE = {"pass": ("[green]PASS[/green]"), "warn": "[yellow]WARN[/yellow]", "fail": "[bold red]FAIL[/bold red]",
          "skip": "[dim]skip[/dim]"}


def cmd_doctor(args) -> int:
    from node.config import ConfigError, load_node_config
    from node.doctor import any_failed, reachability_of, run_checks

    overrides = {name: getattr(args, name) for name in _FLAGS if getattr(args, name, None) is not None}
    try:
        cfg = load_node_config(args.config, overrides=overrides)
    except ConfigError as e:
        raise UserError(str(e)) from None
    checks = run_checks(cfg, network=args.network)
    failed = any_failed(checks)
    if args.json:
        print(json.dumps({"ok": not failed, "reachability": reachability_of(checks), "checks": [c.to_dict() for c in checks]},
                         indent=2))
        return 1 if failed else 0

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="swarmtune doctor", show_lines=True)
    table.add_column("", no_wrap=True)
    table.add_column("check", style="bold", no_wrap=True)
    table.add_column("result", overflow="fold")
    table.add_column("fix", overflow="fold")
    for c in checks:
        table.add_row(_STYLE.get(c.status, c.status), c.name, escape(c.detail),
                      escape(c.fix) if c.status in ("fail", "warn") else "")
    console = Console()
    console.print(table)
    n_fail = sum(c.status == "fail" for c in checks)
    n_warn = sum(c.status == "warn" for c in checks)
    if failed:
        console.print(f"[bold red]{n_fail} check(s) failed[/bold red]; fix them before `swarmtune run`.")
    else:
        console.print(f"[green]ready to join[/green]" + (f" ({n_warn} warning(s))" if n_warn else ""))
    return 1 if failed else 0
