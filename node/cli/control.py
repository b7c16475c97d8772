"""Subcommands that talk to a running daemon over its control socket.

    swarmtune status [--json]        one snapshot; exits 2 when no daemon answers
    swarmtune status --healthcheck   one line; exits 1 when the node is stalled, 2 when no daemon answers (Docker)
    swarmtune peers  [--json]        peers the node sees
    swarmtune shards [--json]        adapter shards and how many peers train each
    swarmtune pause | resume         stop / restart starting new rounds
    swarmtune stop [--timeout S]     drain (as SIGTERM) and wait until the daemon exits

Every command takes `--socket PATH` (default `$SWARMTUNE_HOME/node.sock`,
SWARMTUNE_HOME defaulting to `~/.swarmtune`) and `--json` for scripts.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from node.cli.errors import UserError


def register(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--socket",
        type=Path,
        default=None,
        metavar="PATH",
        help="the daemon's control socket (default: $SWARMTUNE_HOME/node.sock, SWARMTUNE_HOME=~/.swarmtune)",
    )
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")

    def add(name: str, func, help: str, description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=description)
        p.set_defaults(func=func)
        return p

    status = add("status", _status, "show what the running node is doing",
                 "Show what the running node is doing. Exits 2 when no daemon answers.")
    status.add_argument("--healthcheck", action="store_true",
                        help="print one line and exit 1 when the node is stalled (no round for too long; the line says "
                             "why), 0 when it is healthy: the Docker healthcheck")
    add("peers", _peers, "list the peers the running node sees", "List the peers the running node sees in its swarm.")
    add("shards", _shards, "list adapter shards and their trainers",
        "List the swarm's adapter shards and how many peers train each; a shard nobody trains is flagged.")
    add("pause", _pause, "stop starting new rounds",
        "Let the current round finish, then start no new one until `swarmtune resume`.")
    add("resume", _resume, "start rounds again after pause", "Start training rounds again after `swarmtune pause`.")
    stop = add("stop", _stop, "drain the daemon and wait for it to exit",
               "Drain the daemon as SIGTERM does (leave or finish the round, checkpoint, flush the ledger) "
               "and wait until it exits.")
    stop.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="seconds to wait for the daemon to exit (default 300; 0 returns right after asking)",
    )


def _client(args):
    from node.control_client import ControlClient

    return ControlClient(args.socket)


def _ask(args, method: str, *call_args):
    """Call one client method, turning control errors into user errors (no traceback)."""
    from node.control import ControlError

    with _client(args) as client:
        try:
            return getattr(client, method)(*call_args)
        except ControlError as e:
            raise UserError(str(e)) from None


def _print_json(value) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def _console():
    from rich.console import Console

    return Console()


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _duration(s: float) -> str:
    s = int(s)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


def _ints(values: list[int]) -> str:
    return ", ".join(str(v) for v in values) or "-"


def _status(args) -> int:
    st = _ask(args, "status")
    if args.healthcheck:
        if args.json:
            _print_json({"healthy": not st["stalled"], "state": st["state"], "round": st["round"],
                         "stall_reason": st["stall_reason"]})
        elif st["stalled"]:
            print(f"unhealthy: stalled at round {st['round']}: {st['stall_reason']}")
        else:
            print(f"healthy: {st['state']} at round {st['round']}")
        return 1 if st["stalled"] else 0
    if args.json:
        _print_json(st)
        return 0
    from rich.markup import escape
    from rich.table import Table

    last = "-"
    if st["last_round_s"] is not None:
        last = f"{st['last_round_s']:.2f} s"
        if st["last_round_at"] is not None:
            last += f", {_duration(max(0.0, time.time() - st['last_round_at']))} ago"
    rows = [
        ("state", st["state"] + (f" [bold red]STALLED: {escape(st['stall_reason'])}[/]" if st["stalled"] else "")),
        ("round", str(st["round"])),
        ("loss", "-" if st["loss"] is None else f"{st['loss']:.4f}"),
        ("throughput", f"{st['samples_per_s']:.2f} samples/s, {st['tokens_per_s']:.0f} tokens/s"),
        ("trained", f"{st['samples_total']} samples, {st['tokens_total']} tokens"),
        ("last round", last),
        ("peers", str(st["peers"])),
        ("shards trained", _ints(st["shards"])),
        ("memory", f"{_bytes(st['rss_bytes'])} RSS (peak {_bytes(st['peak_rss_bytes'])}), "
                   f"{_bytes(st['gpu_memory_bytes'])} GPU"),
        ("uptime", _duration(st["uptime_s"])),
        ("swarm id", st["swarm_id"]),
        ("peer id", st["peer_id"]),
        ("adapter hash", st["adapter_hash"]),
        ("listening on", "\n".join(st["listen_maddrs"]) or "-"),
        ("reachability", f"{st['reachability']}: {st['reachability_fix']}" if st["reachability_fix"] else st["reachability"]),
        ("version", st["version"]),
    ]
    table = Table(title=f"swarmtune node ({args.socket or 'default socket'})", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for name, value in rows:
        table.add_row(name, value)
    _console().print(table)
    return 0


def _peers(args) -> int:
    peers = _ask(args, "peers")
    if args.json:
        _print_json(peers)
        return 0
    if not peers:
        print("no peers seen yet")
        return 0
    from rich.table import Table

    table = Table(title=f"{len(peers)} peer(s)")
    for col in ("peer id", "round", "shards", "last seen", "addresses"):
        table.add_column(col, overflow="fold")
    for p in peers:
        table.add_row(p["peer_id"], str(p["round"]), _ints(p["shards"]), f"{p['last_seen_s']:.0f} s ago",
                      _peer_addresses(p))
    _console().print(table)
    return 0


def _peer_addresses(p: dict) -> str:
    """The addresses column: a peer nobody can dial has none, and says why."""
    if p["reachability"] == "outbound-only":
        return "none (outbound-only)"
    return "\n".join(p["multiaddrs"]) or "-"


def _shards(args) -> int:
    shards = _ask(args, "shards")
    if args.json:
        _print_json(shards)
        return 0
    from rich.table import Table

    table = Table(title="adapter shards")
    for col in ("shard", "layers", "trainers", "here"):
        table.add_column(col)
    for s in shards:
        trainers = str(s["trainers"]) if s["trainers"] else "[red]0 (nobody trains it)[/red]"
        table.add_row(str(s["index"]), f"{s['layer_start']}-{s['layer_end'] - 1}", trainers,
                      "yes" if s["local"] else "")
    _console().print(table)
    return 0


def _command(args, method: str, done: str) -> int:
    state = _ask(args, method)
    if args.json:
        _print_json({"state": state})
    else:
        print(f"{done} (state: {state})")
    return 0


def _pause(args) -> int:
    return _command(args, "pause", "paused: the current round finishes, no new one starts")


def _resume(args) -> int:
    return _command(args, "resume", "resumed")


def _stop(args) -> int:
    state = _ask(args, "drain")
    exited = False
    if args.timeout > 0:
        exited = _ask(args, "wait_until_gone", args.timeout)
        if not exited:
            raise UserError(
                f"the daemon is still running {args.timeout:g} s after it was asked to drain; "
                "wait longer with --timeout, or see its log"
            )
    if args.json:
        _print_json({"state": state, "exited": exited})
    else:
        print("daemon drained and exited" if exited else f"drain requested (state: {state})")
    return 0
