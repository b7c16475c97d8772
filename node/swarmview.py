"""The swarm as an outsider sees it, with no local node: peers, their rounds, shard coverage and verified
credit, read from the DHT (heartbeats and signed contribution records). `swarmtune swarm status` prints it.

    view = read_swarm(manifest, initial_peers=["/ip4/203.0.113.5/tcp/31337/p2p/12D3KooW..."])

A short-lived client-mode DHT node (node.swarm.follow.SwarmFollower: it publishes nothing, so the
trainers never count it as a peer) reads the heartbeats every node stores under `<swarm_id>/peers`
and the records under the swarm's records key; the records are verified here exactly as
`swarmtune ledger verify` does (signature, chain, swarm, per-round cap), and only verified work is
credited.
"""

from __future__ import annotations

import time
from typing import Sequence


def shard_plan(manifest) -> list[tuple[int, int]] | None:
    """The manifest's shard plan; an empty one (the default) is derived from the base's layer count when
    the base is a local folder, as every node derives it; else None (a hub base is not downloaded for this)."""
    import json
    from pathlib import Path

    from node.model import default_shard_plan

    if manifest.shards.plan:
        return [tuple(r) for r in manifest.shards.plan]
    config = Path(manifest.base.model).expanduser() / "config.json"
    try:
        return list(default_shard_plan(int(json.loads(config.read_text())["num_hidden_layers"])))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_swarm(manifest, *, initial_peers: Sequence[str], wait_s: float = 10.0) -> dict:
    """One snapshot of the swarm; waits up to `wait_s` for the first heartbeats to arrive."""
    from node.credit import compute_credit, verify_logs
    from node.status import credit_row
    from node.swarm import quorum
    from node.swarm.dht import dht_time
    from node.swarm.follow import SwarmFollower
    from node.swarm.validator import collect_all

    plan = shard_plan(manifest)
    follower = SwarmFollower(manifest, initial_peers=list(initial_peers), num_shards=len(plan or ()))
    try:
        deadline = time.monotonic() + wait_s
        while True:
            view = quorum.others(follower.members.view(), follower.members.peer_id)
            if view or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        found = collect_all(follower.dht, manifest.swarm_id)  # records, and receipts and checks of their rounds
        blobs = found["records"]
        now = dht_time()
    finally:
        follower.shutdown()
    ttl = manifest.averaging.peer_ttl
    peers = [{"peer_id": p, "round": i.round, "shards": list(i.shards), "samples_per_s": i.samples_per_s,
              "syncing": i.syncing, "last_seen_s": max(0.0, ttl - (i.expires_at - now))} for p, i in sorted(view.items())]
    if plan is None:  # layers unknown here: as many shards as the heartbeats name, layer ranges unknown (-1)
        plan = [(-1, -1)] * (1 + max((k for i in view.values() for k in i.shards), default=-1))
    coverage = quorum.coverage(view, follower.members.peer_id, (), len(plan))
    report = verify_logs({"dht": [b for kind in ("records", "receipts", "checks", "rotations") for b in found[kind]]},
                         manifest.swarm_id, manifest.credit_cap, max_tokens_per_sample=manifest.token_cap,
                         exclude_after=manifest.credit.exclude_after)
    credit = sorted(compute_credit(report).values(), key=lambda c: -c.credited_samples)
    rounds = [p["round"] for p in peers]
    return {
        "swarm_id": manifest.swarm_id, "name": manifest.name, "peers": peers,
        "round": max(rounds) if rounds else None, "lowest_round": min(rounds) if rounds else None,
        "shards": [{"index": k, "layer_start": a, "layer_end": b, "trainers": coverage.get(k, 0)} for k, (a, b) in enumerate(plan)],
        "records": {"found": len(blobs), "verified": len(report.credited()),
                    "uncredited": sum(1 for v in report.records if v.status == "uncredited"),
                    "rejected": sum(1 for v in report.records if v.status == "fail")},
        "credit": [credit_row(c) for c in credit],
    }
