"""NAT benchmark: bytes and time per round of a node behind a NAT router against a public node, on the same links.

    sudo python scripts/bench_nat.py --out bench_nat.json [--rounds 12] [--rate 50mbit] [--rank 32]

Builds the hosts of tests/test_nat.py (tests/conftest.py: NatNet): two public hosts and one home host
behind a MASQUERADE router that drops unsolicited inbound connections, every host's link shaped to
`--rate` both ways with tc tbf. Three `swarmtune run` processes train the tiny model for `--rounds`
rounds; the JSON gives, per node, its reachability and the medians over the applied rounds after the
first (which carries the newcomers' state download): round and all-reduce seconds, bytes sent and
received on its p2p sockets. Needs root, iproute2 and iptables. Every process is stopped by process group.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_nat.json")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--rate", default="50mbit")
    ap.add_argument("--rank", type=int, default=32)
    args = ap.parse_args()

    from tests.conftest import NatNet, write_test_manifest

    work = Path(tempfile.mkdtemp(prefix="bench-nat-"))
    os.environ.setdefault("SWARMTUNE_CACHE", str(work / "cache"))
    from node.tiny import build_tiny_base, default_tiny_dir

    base = build_tiny_base(default_tiny_dir())
    manifest = write_test_manifest(work / "swarm.toml", base, rounds={"max_rounds": args.rounds},
                                   lora={"rank": args.rank, "alpha": 2 * args.rank}, sync={"wire": "int32"})
    net = NatNet(2, 1)
    procs: list[subprocess.Popen] = []
    try:
        for i in range(3):
            net.limit(i, args.rate)

        def spawn(i: int, name: str, *extra: str) -> Path:
            home = work / name
            home.mkdir()
            with open(work / f"{name}.log", "wb") as log:
                procs.append(subprocess.Popen(
                    [*net.prefix(i), sys.executable, "-m", "node", "run", "--manifest", str(manifest), "--home", str(home),
                     "--create-key", "--host-maddrs", f"/ip4/{net.ip(i)}/tcp/0", "--threads", "1", "--min-peers", "3", *extra],
                    stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                    env=dict(os.environ, PYTHONUNBUFFERED="1")))
            return home

        def info(home: Path) -> dict:
            deadline = time.time() + 180
            while time.time() < deadline:
                found = list((home / "swarms").glob("*/node.json"))
                if found:
                    try:
                        return json.loads(found[0].read_text())
                    except ValueError:
                        pass
                time.sleep(0.3)
            raise SystemExit(f"{home.name} did not start; see {work}/{home.name}.log")

        homes = {"public-0": spawn(0, "public-0")}
        first = info(homes["public-0"])["maddrs"]
        homes["public-1"] = spawn(1, "public-1", "--initial-peers", *first)
        homes["behind-nat"] = spawn(2, "behind-nat", "--initial-peers", *first)
        for p in procs:
            p.wait(timeout=600)
        out = {"rate": args.rate, "rounds": args.rounds, "lora_rank": args.rank, "wire": "int32", "nodes": {}}
        for name, home in homes.items():
            rows = [json.loads(line) for line in next((home / "swarms").glob("*/rounds.jsonl")).read_text().splitlines()]
            steady = [r for r in rows if r["applied"] and r["round"] > 0]
            med = lambda key: statistics.median(r[key] for r in steady) if steady else None  # noqa: E731
            out["nodes"][name] = {
                "reachability": info(home)["reachability"], "applied_rounds": sum(1 for r in rows if r["applied"]),
                "groups_of_3": sum(1 for r in rows if r["applied"] and set(r["groups"].values()) == {3}),
                "round_s": med("seconds"), "averaging_s": med("averaging_s"),
                "sent_bytes_per_round": med("sent_bytes"), "received_bytes_per_round": med("received_bytes"),
                "final_hash": rows[-1]["hash"] if rows else None,
            }
        out["same_adapter"] = len({n["final_hash"] for n in out["nodes"].values()}) == 1
        Path(args.out).write_text(json.dumps(out, indent=2))
        print(json.dumps(out, indent=2))
        return 0
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        net.close()
        from node.swarm.dht import remove_stale_sockets

        remove_stale_sockets()  # the hivemind sockets the killed nodes left in /tmp


if __name__ == "__main__":
    sys.exit(main())
