"""What verified credit costs, and how fast it catches a cheater, written as JSON.

    python scripts/bench_credit.py --out bench_credit.json [--rounds 24] [--honest 3] [--batch 128] [--microbatch 4]

A swarm of `--honest` honest nodes and one node that sends zeros (SWARMTUNE_FAULT_JUNK, node/rounds.py) trains
the tiny Llama on 127.0.0.1 at the manifest's default [credit] settings (spot_check_rate 0.21 per round,
tolerance 0.5, exclude_after 3). From each honest node's rounds.jsonl:
- `spot_check_cost`: seconds spent recomputing drawn members' microbatches ÷ seconds of the node's own round
  compute (forward/backward), summed over the run (goal <= 5 %). A check recomputes one microbatch, so the
  cost is about rate × microbatch × nodes ÷ batch (`spot_check_cost_model`);
- `receipt_bytes_per_round`: bytes of the receipts and spot-check statements the node signed per round
  (each is also stored once in the DHT and in receipts.jsonl);
- `honest_error_max`: the largest relative error any honest member's check showed (tolerance 0.5), and
  `honest_exact`: the share of those checks whose recomputed microbatch matched the announced sketch bit for bit;
- `junk_caught_round` / `junk_excluded_round`: the first round a check failed the zeros sender, and the round
  after which some honest node left it out;
- `catch_rounds_at_default_rate`: rounds within which a constant cheater is caught with 99 % (1-(1-r)^n).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _spawn(manifest: Path, home: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "node", "run", "--manifest", str(manifest), "--home", str(home), "--create-key",
           "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--threads", "1", *extra]
    home.mkdir(parents=True, exist_ok=True)
    log = open(home / "log.txt", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                            env={**os.environ, **(env or {})})


def _node_file(home: Path, name: str) -> Path:
    return next((home / "swarms").glob(f"*/{name}"))


def _rows(home: Path) -> list[dict]:
    return [json.loads(line) for line in _node_file(home, "rounds.jsonl").read_text().splitlines() if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_credit.json")
    ap.add_argument("--rounds", type=int, default=24)
    ap.add_argument("--honest", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128, help="[rounds] target_batch_size")
    ap.add_argument("--microbatch", type=int, default=4, help="[rounds] microbatch_size")
    ap.add_argument("--keep", action="store_true", help="keep the nodes' folders (printed) for a look at their logs")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="swarmtune-bench-credit-"))
    os.environ.setdefault("SWARMTUNE_CACHE", str(work / "cache"))
    sys.path.insert(0, str(REPO / "tests"))
    from node.manifest import CreditSection
    from node.tiny import build_tiny_base, default_tiny_dir
    from protocol.receipt import catch_rounds
    from tests.conftest import write_test_manifest

    base = build_tiny_base(default_tiny_dir())
    manifest = write_test_manifest(work / "swarm.toml", base, rounds={"max_rounds": args.rounds, "target_batch_size": args.batch, "microbatch_size": args.microbatch})
    defaults = CreditSection()
    n = args.honest + 1
    procs: list[subprocess.Popen] = []
    homes = [work / f"honest{i}" for i in range(args.honest)]
    started = time.time()
    try:
        procs.append(_spawn(manifest, homes[0], "--min-peers", str(n)))
        deadline = time.time() + 180
        while not list((homes[0] / "swarms").glob("*/node.json")):
            if time.time() > deadline or procs[0].poll() is not None:
                raise RuntimeError(f"the first node did not start; see {homes[0] / 'log.txt'}")
            time.sleep(0.5)
        maddrs = json.loads(_node_file(homes[0], "node.json").read_text())["maddrs"]
        for home in homes[1:]:
            procs.append(_spawn(manifest, home, "--min-peers", str(n), "--initial-peers", *maddrs))
        junk = _spawn(manifest, work / "junk", "--min-peers", str(n), "--initial-peers", *maddrs,
                      env={"SWARMTUNE_FAULT_JUNK": "zeros"})
        for p in procs:
            if p.wait(timeout=1800) != 0:
                raise RuntimeError(f"an honest node failed; see {work}")
    finally:
        for p in procs + ([junk] if "junk" in locals() else []):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    wall = time.time() - started
    junk_id = json.loads(_node_file(work / "junk", "node.json").read_text())["peer_id"]
    honest_ids = [json.loads(_node_file(h, "node.json").read_text())["peer_id"] for h in homes]
    per_node, errors, exact, caught, excluded = [], [], [], [], []
    for home in homes:
        rows = [r for r in _rows(home) if r["applied"]]
        checks = [c for r in rows for c in r.get("spot_checks", [])]
        compute = sum(r["compute_s"] for r in rows)
        spent = sum(c["seconds"] for c in checks)
        errors += [c["error"] for c in checks if c["target"] in honest_ids and c["error"] is not None]
        exact += [bool(c.get("exact")) for c in checks if c["target"] in honest_ids]
        caught += [r["round"] for r in rows for c in r.get("spot_checks", []) if c["target"] == junk_id and c["failed"]]
        log = (home / "log.txt").read_text(errors="replace")
        if f"peer {junk_id} failed" in log:
            excluded.append(home.name)
        per_node.append({
            "node": home.name, "rounds": len(rows), "compute_s": round(compute, 3), "spot_check_s": round(spent, 3),
            "checks": len(checks), "spot_check_cost": spent / compute if compute else None,
            "receipt_bytes_per_round": sum(r.get("receipt_bytes", 0) for r in rows) / max(1, len(rows)),
            "receipts_file_bytes": _node_file(home, "receipts.jsonl").stat().st_size,
        })
    cost = sum(p["spot_check_s"] for p in per_node) / max(1e-9, sum(p["compute_s"] for p in per_node))
    out = {
        "nodes": {"honest": args.honest, "junk_zeros": 1}, "rounds": args.rounds, "wall_s": round(wall, 1),
        "spot_check_rate": defaults.spot_check_rate, "tolerance": defaults.spot_check_tolerance,
        "exclude_after": defaults.exclude_after,
        "catch_rounds_at_default_rate": catch_rounds(defaults.spot_check_rate),
        "batch": args.batch, "microbatch": args.microbatch,
        "spot_check_cost": cost, "spot_check_cost_goal": 0.05,
        "spot_check_cost_model": defaults.spot_check_rate * args.microbatch * n / args.batch,
        "receipt_bytes_per_round": sum(p["receipt_bytes_per_round"] for p in per_node) / len(per_node),
        "honest_error_max": max(errors) if errors else None, "honest_checks": len(errors),
        "honest_exact": sum(exact) / len(exact) if exact else None,
        "junk_caught_round": min(caught) if caught else None, "junk_failed_checks": len(caught),
        "junk_excluded_by": excluded, "per_node": per_node,
        "note": "cost = recompute seconds / own compute seconds; a check recomputes one microbatch of the drawn "
                "member's share (node/spotcheck.py), so the cost is about rate x microbatch x nodes / batch",
    }
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    if args.keep:
        print(f"nodes' folders kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
