"""Soak: 3 nodes on 127.0.0.1 for N minutes, one peer restarted every few minutes.

    python scripts/soak.py --minutes 15 --restart-every 180 --out soak.json

Records every 30 s, per node: RSS of the node's whole process group, open file descriptors,
and the number of processes in it; at the end, drains all nodes and checks that every
ledger verifies, the adapters are identical, and no process or hivemind socket is left.
The JSON holds the series and the verdicts (memory growth first-to-last sample, per node).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def spawn(manifest: Path, home: Path, *extra: str) -> subprocess.Popen:
    home.mkdir(parents=True, exist_ok=True)
    log = open(home.parent / f"{home.name}.log", "a")
    cmd = [sys.executable, "-m", "node", "run", "--manifest", str(manifest), "--home", str(home), "--create-key",
           "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--threads", "1", *extra]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)


def group_stats(pid: int) -> dict:
    procs = [p for p in psutil.process_iter(["pid"]) if _pgid(p.pid) == pid]
    rss = fds = 0
    for p in procs:
        try:
            rss += p.memory_info().rss
            fds += p.num_fds()
        except psutil.Error:
            pass
    return {"rss_mb": rss / 2**20, "fds": fds, "processes": len(procs)}


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def node_json(home: Path) -> dict | None:
    for p in (home / "swarms").glob("*/node.json"):
        try:
            return json.loads(p.read_text())
        except ValueError:
            return None
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=15)
    ap.add_argument("--restart-every", type=float, default=180, help="seconds between restarts of one peer (SIGTERM, then start again)")
    ap.add_argument("--out", default="soak.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="swarmtune-soak-"))
    os.environ.setdefault("SWARMTUNE_CACHE", str(work / "cache"))
    from tests.conftest import write_test_manifest
    from node.tiny import build_tiny_base, default_tiny_dir

    base = build_tiny_base(default_tiny_dir())
    manifest = write_test_manifest(work / "swarm.toml", base, rounds={"max_rounds": 10**6})
    socks_before = set(glob.glob("/tmp/hivemind-*"))
    homes = [work / f"node-{i}" for i in range(3)]
    procs = [spawn(manifest, homes[0], "--min-peers", "3")]
    while node_json(homes[0]) is None:
        time.sleep(0.5)
    peers = node_json(homes[0])["maddrs"]
    procs += [spawn(manifest, h, "--min-peers", "3", "--initial-peers", *peers) for h in homes[1:]]
    series, restarts = [], 0
    t0 = last_restart = time.time()
    victim = 1
    try:
        while time.time() - t0 < args.minutes * 60:
            time.sleep(30)
            series.append({"t": round(time.time() - t0), **{f"node{i}": group_stats(p.pid) for i, p in enumerate(procs)}})
            print(json.dumps(series[-1]), flush=True)
            # no restart in the last minute: a node stopped while still starting up has nothing to drain
            if time.time() - last_restart > args.restart_every and time.time() - t0 < args.minutes * 60 - 60:
                p = procs[victim]
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=120)
                procs[victim] = spawn(manifest, homes[victim], "--initial-peers", *peers)
                restarts += 1
                last_restart = time.time()
                victim = 2 if victim == 1 else 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = []
        for p in procs:
            try:
                codes.append(p.wait(timeout=120))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                codes.append("killed")
    time.sleep(2)
    leftover = [pid for p in procs for pid in [p.pid] if _pgid(pid) is not None]
    groups_alive = [p.pid for p in procs if any(_pgid(q.pid) == p.pid for q in psutil.process_iter())]
    socks_left = sorted(set(glob.glob("/tmp/hivemind-*")) - socks_before)
    ledgers = [str(next((h / "swarms").glob("*/ledger.jsonl"))) for h in homes]
    verify = subprocess.run([sys.executable, "-m", "node", "ledger", "verify", "--manifest", str(manifest), "--ledger", *ledgers],
                            capture_output=True, text=True, cwd=REPO)
    finals, rows_by_node = [], []
    for h in homes:
        rows = [json.loads(line) for line in next((h / "swarms").glob("*/rounds.jsonl")).read_text().splitlines() if line]
        rows_by_node.append(rows)
        finals.append({"round": rows[-1]["next_round"], "hash": rows[-1]["hash"]})
    # nodes stopped by SIGTERM finish different rounds: compare the adapter after the last round all of them completed
    common = min(f["round"] for f in finals)
    at_common = [next((r["hash"] for r in reversed(rows) if r["applied"] and r["next_round"] == common), None)
                 for rows in rows_by_node]
    growth = {f"node{i}": series[-1][f"node{i}"]["rss_mb"] - series[0][f"node{i}"]["rss_mb"] for i in range(3)} if len(series) > 1 else {}
    # node0 is never restarted: its RSS after warm-up (the first 3 samples) is the leak signal
    steady = [row["node0"]["rss_mb"] for row in series[3:]]
    out = {
        "minutes": args.minutes, "restarts": restarts, "exit_codes": codes, "series": series,
        "rss_growth_mb_first_to_last": growth,
        "node0_rss_mb_after_warmup": {"first": steady[0], "last": steady[-1], "min": min(steady), "max": max(steady)} if steady else None,
        "fds": {f"node{i}": [series[0][f"node{i}"]["fds"], series[-1][f"node{i}"]["fds"]] for i in range(3)} if series else None,
        "processes_left": leftover + groups_alive, "hivemind_sockets_left": socks_left,
        "ledgers_verify": verify.returncode == 0, "ledger_verify_output": verify.stdout[-2000:] + verify.stderr[-2000:], "final": finals,
        "common_round": common, "hashes_at_common_round": at_common,
        "adapters_identical_at_end": None not in at_common and len(set(at_common)) == 1,
    }
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps({k: v for k, v in out.items() if k != "series"}, indent=2))


if __name__ == "__main__":
    main()
