"""Scale simulation of the exact all-reduce: N averaging-only peers, no model.

    python scripts/sim_scale.py --peers 2 8 16 32 64 --values 65536 --rounds 3 --out sim.json

Every peer is a real hivemind DHT with its own p2pd on 127.0.0.1 and the node's own exchange
(node.swarm.swarm.Swarm: matchmaking key per round, target group size, the wire grid, the exact
reducer), all driven from this one process (peers share its memory pages, which is what lets
dozens of them fit on a small machine). Each round every peer contributes a random vector of its
own scale. Before the first round each peer waits until it sees all N heartbeats (a node does
the same with --min-peers). A round is complete when every peer got a sum from one group of all
N; it is exact when every group that formed (complete or not) gave each of its members the true
sum of its members' grid values, bit for bit.

Writes JSON: per N, rounds completed, exactness, seconds to start the peers, matchmaking and
all-reduce seconds (median over peers and rounds), resident memory; and `max_exact_group`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
import torch  # noqa: E402

from node.swarm.dht import remove_stale_sockets, start_dht, stop_children  # noqa: E402
from node.swarm.exact import GRIDS, Layout, block_exponents, group_exponents, quantize  # noqa: E402
from node.swarm.outcome import RoundClaim, Summed  # noqa: E402
from node.swarm.swarm import Swarm  # noqa: E402


def _contribution(peer: int, round_: int, values: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * round_ + peer)
    return torch.randn(values, generator=g) * (1.0 + peer % 7)


def _rss_mb() -> float:
    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    total = 0
    for p in procs:
        try:
            total += p.memory_full_info().uss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total / 2**20


def simulate(n: int, *, values: int, rounds: int, wire: str, matchmaking_time: float, timeout: float) -> dict:
    grid, layout = GRIDS[wire], Layout([values])
    t0 = time.time()
    dhts = [start_dht(host_maddrs=["/ip4/127.0.0.1/tcp/0"])]
    first = [str(a) for a in dhts[0].get_visible_maddrs()]
    for _ in range(n - 1):
        dhts.append(start_dht(initial_peers=first, host_maddrs=["/ip4/127.0.0.1/tcp/0"]))
    swarms = [Swarm(dht, swarm_id=f"sim{n}", shard_layouts=[[values]], trained_shards=[0], matchmaking_time=matchmaking_time,
                    allreduce_timeout=timeout, peer_ttl=60.0, wire=wire) for dht in dhts]
    for s in swarms:
        s.announce(round=0, shards=[0])
    started = time.time() - t0
    with ThreadPoolExecutor(n) as pool:  # every peer sees every heartbeat, as --min-peers waits for
        seen = list(pool.map(lambda s: len(s.wait_for_peers(n, timeout=60 + 2 * n)), swarms))
    visible_s = time.time() - t0 - started
    rows = []
    try:
        with ThreadPoolExecutor(n) as pool:
            for r in range(rounds):
                xs = [_contribution(i, r, values) for i in range(n)]

                def step(i):
                    claim = RoundClaim(round=r, hashes={0: "sim"}, samples=1, tokens=1, loss_sum=0.0)
                    began = time.time()
                    res = swarms[i].allreduce_sums({0: xs[i]}, claim, {0: n}, round_=r)[0]
                    return res, time.time() - began

                out = list(pool.map(step, range(n)))
                index = {s.peer_id: i for i, s in enumerate(swarms)}
                exact, truths = True, {}
                for res, _ in out:
                    if not isinstance(res, Summed):
                        continue
                    members = tuple(sorted(index[p] for p in res.claims))
                    if members not in truths:  # the group's own grid and sum, computed here from its members' vectors
                        exps = group_exponents([block_exponents(xs[i], layout, grid).numpy().tobytes() for i in members], layout)
                        truths[members] = sum(quantize(xs[i], exps, layout, grid)[0].to(torch.int64) for i in members)
                    exact = exact and torch.equal(res.total.to(torch.int64), truths[members])
                done = [res for res, _ in out if isinstance(res, Summed) and len(res.claims) == n]
                sizes = sorted((len(res.claims) for res, _ in out if isinstance(res, Summed)), reverse=True)
                rows.append({
                    "round": r, "complete": len(done) == n, "exact": exact, "group_sizes_seen": sizes,
                    "failed": sum(1 for res, _ in out if not isinstance(res, Summed)),
                    "allreduce_s": statistics.median([res.seconds for res in done]) if done else None,
                    "matchmaking_s": statistics.median([s - res.seconds for res, s in out if isinstance(res, Summed)])
                    if done else None,
                })
                print(f"N={n} round {r}: {len(done)}/{n} complete, exact={exact}, groups seen {sizes}", flush=True)
        rss = _rss_mb()
    finally:
        for s in swarms:
            s.shutdown()
        stop_children(timeout=10.0)
        remove_stale_sockets()
    complete = [row for row in rows if row["complete"]]
    return {
        "peers": n, "values": values, "wire": wire, "rounds": rounds, "rounds_complete": len(complete),
        "exact": all(row["exact"] for row in rows), "start_s": round(started, 1),
        "all_visible_s": round(visible_s, 1), "peers_seen_min": min(seen),
        "matchmaking_s": statistics.median([row["matchmaking_s"] for row in complete]) if complete else None,
        "allreduce_s": statistics.median([row["allreduce_s"] for row in complete]) if complete else None,
        "memory_mb": round(rss), "rows": rows,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", type=int, nargs="+", default=[2, 8, 16, 32, 64])
    ap.add_argument("--values", type=int, default=65536, help="values per peer's vector")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--wire", choices=sorted(GRIDS), default="int8")
    ap.add_argument("--matchmaking-per-peer", type=float, default=1 / 6,
                    help="matchmaking window per peer in the group, seconds (default: 1/6; at least 2 s)")
    ap.add_argument("--out", default=None, help="write the JSON here (default: stdout)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from node.logs import quiet_unactionable, setup_logging

    setup_logging("warning")
    quiet_unactionable()  # p2pd streams closed at shutdown, bitsandbytes' optional kernels
    results = []
    for n in args.peers:
        # matchmaking on a 2-core machine slows with N: give the leader time to hear from everyone
        results.append(simulate(n, values=args.values, rounds=args.rounds, wire=args.wire,
                                matchmaking_time=max(2.0, n * args.matchmaking_per_peer), timeout=max(30.0, n * 1.5)))
    exact_sizes = [r["peers"] for r in results if r["exact"] and r["rounds_complete"] == r["rounds"]]
    # every group that formed summed exactly; the largest complete group of N that did is the figure
    report = {"results": results, "max_exact_group": max(exact_sizes, default=0), "cpus": os.cpu_count()}
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(json.dumps({k: v for k, v in report.items() if k != "results"}))
    for r in results:
        print({k: v for k, v in r.items() if k != "rows"})
    return 0 if exact_sizes else 1


if __name__ == "__main__":
    sys.exit(main())
