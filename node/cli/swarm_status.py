"""`swarmtune swarm status --manifest swarm.toml --initial-peers ADDR...`: the whole swarm from the DHT,
with no local node (node.swarmview): peers and their rounds, shard coverage, verified credit."""

from __future__ import annotations

import json

from node.cli.errors import UserError


def add_parser(sw) -> None:
    p = sw.add_parser("status", help="show the whole swarm from the DHT (no local node needed)",
                      description="Show a running swarm as its DHT tells it, without running a node: the peers and the "
                                  "round each is at, how many peers train each shard, and credit from the signed "
                                  "records in the DHT (verified here; only verified work counts).")
    p.add_argument("--manifest", required=True, metavar="FILE", help="the swarm's manifest (required)")
    p.add_argument("--initial-peers", required=True, nargs="+", metavar="ADDR",
                   help="multiaddrs of any running peers, as their logs print them (required)")
    p.add_argument("--wait", type=float, default=10.0, metavar="S",
                   help="seconds to wait for the first heartbeats (default 10)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=cmd_swarm_status)


def cmd_swarm_status(args) -> int:
    from node.manifest import ManifestError, load_manifest
    from node.swarm.dht import SwarmError
    from node.swarmview import read_swarm

    try:
        m = load_manifest(args.manifest)
    except ManifestError as e:
        raise UserError(str(e)) from None
    try:
        view = read_swarm(m, initial_peers=args.initial_peers, wait_s=args.wait)
    except SwarmError as e:
        raise UserError(str(e)) from None
    if args.json:
        print(json.dumps(view, indent=2, sort_keys=True))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    peers = view["peers"]
    console.print(f"swarm [bold]{view['name']}[/] ({view['swarm_id'][:16]}…): {len(peers)} peer(s), "
                  f"round {view['round'] if peers else '-'}"
                  + (f" (lowest {view['lowest_round']})" if peers and view["lowest_round"] != view["round"] else ""))
    if not peers:
        console.print(f"no heartbeat seen in {args.wait:g} s: is the swarm running, and are these its peers?")
    else:
        table = Table(title="peers")
        for col in ("peer id", "round", "shards", "samples/s", "last seen"):
            table.add_column(col, overflow="fold")
        for p in peers:
            table.add_row(p["peer_id"], str(p["round"]) + (" (syncing)" if p["syncing"] else ""),
                          ",".join(map(str, p["shards"])) or "-", f"{p['samples_per_s']:.1f}", f"{p['last_seen_s']:.0f} s ago")
        console.print(table)
    shards = Table(title="shard coverage")
    for col in ("shard", "layers", "trainers"):
        shards.add_column(col)
    for s in view["shards"]:
        shards.add_row(str(s["index"]), f"{s['layer_start']}-{s['layer_end'] - 1}" if s["layer_end"] > 0 else "?",
                       str(s["trainers"]) if s["trainers"] else "[red]0 (nobody trains it)[/red]")
    console.print(shards)
    rec = view["records"]
    credit = Table(title=f"verified credit ({rec['verified']} of {rec['found']} records in the DHT credited"
                         + (f", {rec['uncredited']} without receipts or failed a spot-check" if rec.get("uncredited") else "")
                         + (f", {rec['rejected']} rejected" if rec["rejected"] else "") + ")")
    for col in ("peer id", "claimed rounds", "credited rounds", "checks passed/failed", "samples", "share"):
        credit.add_column(col, overflow="fold")
    for c in view["credit"]:
        credit.add_row(c["peer_id"], str(c["claimed_rounds"]), str(c["verified_rounds"]),
                       f"{c['spot_checks_passed']}/{c['spot_checks_failed']}", str(c["samples"]), f"{c['share'] * 100:.1f}%")
    console.print(credit)
    return 0
