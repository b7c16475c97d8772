"""Benchmarks B1 and B6 of the training node, written as JSON.

    python scripts/bench_node.py --out bench_node.json [--rounds 30] [--hidden 128 --layers 4]

B1 local overhead: tokens/s of the node's full round (local fwd/bwd, fixed-point encode,
   AdamW step, adapter hashing, signed ledger record with fsync, DHT publication, state
   snapshot) in a solo swarm, divided by tokens/s of a plain PEFT + AdamW loop on the same
   model and the same batches. Both run in this process, interleaved block by block, so
   machine load hits both alike.
B6 swarm vs single process: a 2-node swarm and a single node run the same manifest for
   the same rounds (same global batches); the ratio of their final losses.
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


def _manifest(work: Path, base: Path, rounds: int, batch: int):
    sys.path.insert(0, str(REPO / "tests"))
    from tests.conftest import write_test_manifest

    return write_test_manifest(work / "swarm.toml", base, rounds={"max_rounds": rounds, "target_batch_size": batch, "microbatch_size": 8})


def bench_b1(base: Path, work: Path, rounds: int, batch: int) -> dict:
    import torch

    from node.config import NodeConfig
    from node.daemon import Node
    from node.data import collate, round_batch_indices
    from node.trainer import token_loss_sum

    torch.set_num_threads(1)
    manifest = _manifest(work, base, rounds * 10, batch)
    node = Node(NodeConfig(manifest=str(manifest), home=str(work / "b1-home"), create_key=True, host_maddrs=("/ip4/127.0.0.1/tcp/0",), threads=1))
    node.prepare()
    node.start()
    try:
        # the plain loop: a second PEFT model on the same base, AdamW, mean token loss, same microbatches
        from node.model import attach_lora, load_base

        m = node.manifest
        plain = attach_lora(load_base(node.stack.model_dir), rank=m.lora.rank, alpha=m.lora.alpha, dropout=m.lora.dropout,
                            target_modules=m.lora.target_modules, init_seed=m.lora.init_seed)
        params = [p for p in plain.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=m.optim.lr)
        pad = node.stack.tokenizer.pad_token_id

        def plain_round(r: int) -> int:
            idx = round_batch_indices(len(node.stack.examples), m.order_key, r, batch)
            exs = [node.stack.examples[i] for i in idx]
            tokens = 0
            for i in range(0, len(exs), m.rounds.microbatch_size):
                loss, n = token_loss_sum(plain, collate(exs[i:i + m.rounds.microbatch_size], pad))
                (loss / max(n, 1)).backward()
                tokens += n
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return tokens

        t_node = t_plain = 0.0
        tok_node = tok_plain = 0
        def node_round():
            res = node.rounds.run(node.round, node.swarm.view())
            node.round += bool(res.applied)
            node.statesync.publish(node.round)
            return res

        plain_round(0)  # warm-up both paths once
        node_round()
        for r in range(1, rounds + 1):
            t0 = time.perf_counter()
            tok_plain += plain_round(r)
            t1 = time.perf_counter()
            res = node_round()
            t2 = time.perf_counter()
            tok_node += res.tokens
            t_plain += t1 - t0
            t_node += t2 - t1
        return {
            "rounds": rounds, "batch": batch, "node_tokens_per_s": tok_node / t_node, "plain_tokens_per_s": tok_plain / t_plain,
            "ratio": (tok_node / t_node) / (tok_plain / t_plain),
            "note": "node round = local fwd/bwd + fixed-point + AdamW + hashing + signed fsynced record + DHT publish + state snapshot",
        }
    finally:
        node.shutdown()


def _spawn(manifest: Path, home: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "node", "run", "--manifest", str(manifest), "--home", str(home), "--create-key",
           "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--threads", "1", *extra]
    home.mkdir(parents=True, exist_ok=True)
    log = open(home / "log.txt", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)


def _rows(home: Path) -> list[dict]:
    f = next((home / "swarms").glob("*/rounds.jsonl"))
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def bench_b6(base: Path, work: Path, rounds: int) -> dict:
    manifest = _manifest(work, base, rounds, 32)
    procs = []
    try:
        procs.append(_spawn(manifest, work / "solo"))
        procs.append(_spawn(manifest, work / "a", "--min-peers", "2"))
        deadline = time.time() + 180
        while not list((work / "a" / "swarms").glob("*/node.json")):
            if time.time() > deadline:
                raise RuntimeError("node a did not start")
            time.sleep(0.5)
        info = json.loads(next((work / "a" / "swarms").glob("*/node.json")).read_text())
        procs.append(_spawn(manifest, work / "b", "--min-peers", "2", "--initial-peers", *info["maddrs"]))
        for p in procs:
            if p.wait(timeout=900) != 0:
                raise RuntimeError(f"a node failed; see {work}")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    # rounds by number, applied only: a round whose all-reduce failed is retried, and must not shift the rest
    solo, swarm = ({r["round"]: r for r in _rows(work / n) if r["applied"]} for n in ("solo", "a"))
    common = sorted(set(solo) & set(swarm))
    per_round = [abs(swarm[r]["loss"] - solo[r]["loss"]) / solo[r]["loss"] for r in common]
    last = common[-1]
    return {
        "rounds": rounds, "rounds_compared": len(common), "final_loss_single": solo[last]["loss"],
        "final_loss_swarm": swarm[last]["loss"], "ratio": swarm[last]["loss"] / solo[last]["loss"],
        "max_rel_diff_any_round": max(per_round),
        "failed_swarm_rounds": sum(1 for r in _rows(work / "a") if not r["applied"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_node.json")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--skip-b6", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="swarmtune-bench-"))
    os.environ.setdefault("SWARMTUNE_CACHE", str(work / "cache"))
    from node.tiny import build_tiny_base

    overrides = {"hidden_size": args.hidden, "intermediate_size": 2 * args.hidden, "num_hidden_layers": args.layers}
    base = build_tiny_base(work / "base", config_overrides=overrides)
    out = {"model": overrides, "B1_local_overhead": bench_b1(base, work / "b1", args.rounds, args.batch)}
    if not args.skip_b6:
        out["B6_swarm_vs_single"] = bench_b6(base, work / "b6", args.rounds)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
