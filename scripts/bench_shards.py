"""Adapter-shard benchmark: time and peak memory per sample, upper-half node vs all-shards node.

    python scripts/bench_shards.py --out bench_shards.json                 # CPU, a mid-size Llama from a config
    python scripts/bench_shards.py --preset gpu --out bench_shards_gpu.json  # CUDA: Qwen2.5-0.5B- and Llama-3-8B-shaped,
                                                                            # bf16 and 4-bit NF4, random weights
Each configuration runs in its own subprocess (so peak memory is its own): build the model
from a config (no downloads), attach LoRA (all-linear), cut into two halves, train the
chosen shards for a few steps with the node's Trainer, and report seconds per sample and
peak memory (CUDA: max_memory_allocated; CPU: peak RSS above the loaded model). The
memory estimate of `--shards auto` (node/shards.py) is reported beside the measurement.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, vocab: the published configs' shapes, random weights
    "cpu-mid": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, vocab_size=8192),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
}


def worker(spec: dict) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from node.manifest import OptimSection
    from node.model import Adapter, attach_lora, check_shard_plan, default_shard_plan
    from node.shards import estimate
    from node.data import Example
    from node.trainer import Trainer

    torch.manual_seed(0)
    device = spec["device"]
    cfg = LlamaConfig(**SHAPES[spec["shape"]], max_position_embeddings=4096, tie_word_embeddings=False)
    dtype = torch.bfloat16 if spec["dtype"] == "bfloat16" else torch.float32
    if spec["quant"] == "nf4":
        import tempfile

        from transformers import BitsAndBytesConfig

        # quantization happens on load, so random weights are saved first: built on the device (an 8B model's
        # random init takes minutes on a CPU), once per shape and dtype for every run of this benchmark
        d = Path(tempfile.gettempdir()) / f"swarmtune-bench-shards-{spec['shape']}-{spec['dtype']}"
        if not (d / "done").exists():
            with torch.device(device):
                LlamaForCausalLM(cfg).to(dtype).save_pretrained(d)
            (d / "done").write_text("")
            torch.manual_seed(0)
        model = LlamaForCausalLM.from_pretrained(d, dtype=dtype, device_map={"": device}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype))
    else:
        with torch.device(device):
            model = LlamaForCausalLM(cfg).to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = False
    model = attach_lora(model, rank=16, alpha=32, dropout=0.0, target_modules=("all-linear",), init_seed=0)
    plan = default_shard_plan(cfg.num_hidden_layers)
    halves = ((0, len(plan) // 2), (len(plan) // 2, len(plan)))
    plan2 = check_shard_plan(((plan[halves[0][0]][0], plan[halves[0][1] - 1][1]), (plan[halves[1][0]][0], plan[-1][1])), cfg.num_hidden_layers)
    adapter = Adapter.from_model(model, plan2)
    shards = (0, 1) if spec["shards"] == "all" else (1,)
    est = estimate(model, adapter, shards, microbatch=spec["microbatch"], seq_len=spec["seq"], dtype_bytes=2 if dtype == torch.bfloat16 else 4, device=device)
    trainer = Trainer(model, adapter, shards, OptimSection(lr=1e-4), microbatch_size=spec["microbatch"], device=device, pad_id=0)
    seq = spec["seq"]
    ex = [Example(input_ids=[(7 * i + j) % cfg.vocab_size for j in range(seq)], labels=[(7 * i + j) % cfg.vocab_size for j in range(seq)]) for i in range(spec["microbatch"])]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base_mem = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    trainer.apply({k: torch.zeros(adapter.shard_numel(k)) for k in shards}, lr=0.0)  # allocate optimizer state
    trainer.local_gradients(ex)  # warm-up
    steps = spec["steps"]
    t0 = time.perf_counter()
    for _ in range(steps):
        res = trainer.local_gradients(ex)
        trainer.apply({k: g / max(res.tokens, 1) for k, g in res.grad_sums.items()}, lr=1e-4)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    samples = steps * spec["microbatch"]
    out = dict(spec, seconds_per_sample=dt / samples, tokens_per_s=samples * seq / dt, estimate_bytes=est.total)
    if device.startswith("cuda"):
        out["peak_bytes"] = int(torch.cuda.max_memory_allocated())
        out["peak_training_bytes"] = int(torch.cuda.max_memory_allocated() - base_mem)
    else:
        out["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out["peak_training_bytes"] = out["peak_bytes"] - base_rss
    return out


def compare_swarms(rounds: int) -> dict:
    """3 nodes with shard sets all/upper/lower vs 3 nodes all training everything, same manifest and rounds."""
    import os
    import tempfile

    sys.path.insert(0, str(REPO / "scripts"))
    from bench_node import _manifest, _rows, _spawn

    work = Path(tempfile.mkdtemp(prefix="swarmtune-shards-"))
    os.environ.setdefault("SWARMTUNE_CACHE", str(work / "cache"))
    from node.tiny import build_tiny_base, default_tiny_dir

    manifest = _manifest(work, build_tiny_base(default_tiny_dir()), rounds, 48)
    out = {}
    for name, sets in (("mixed", ("all", "1", "0")), ("uniform", ("all", "all", "all"))):
        homes = [work / name / f"n{i}" for i in range(3)]
        procs = [_spawn(manifest, homes[0], "--min-peers", "3", "--shards", sets[0])]
        while not list((homes[0] / "swarms").glob("*/node.json")):
            time.sleep(0.5)
        peers = json.loads(next((homes[0] / "swarms").glob("*/node.json")).read_text())["maddrs"]
        procs += [_spawn(manifest, homes[i], "--min-peers", "3", "--shards", sets[i], "--initial-peers", *peers) for i in (1, 2)]
        for p in procs:
            p.wait(timeout=1200)
        rows = [r for r in _rows(homes[0]) if r["applied"]]
        out[name] = {"final_loss": rows[-1]["loss"], "mean_loss_last_5": sum(r["loss"] for r in rows[-5:]) / 5, "rounds": len(rows)}
    out["final_loss_mixed_over_uniform"] = out["mixed"]["final_loss"] / out["uniform"]["final_loss"]
    out["last5_loss_mixed_over_uniform"] = out["mixed"]["mean_loss_last_5"] / out["uniform"]["mean_loss_last_5"]
    return out


def run(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        return dict(spec, error=proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--out", default="bench_shards.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--device", help="override the preset's device (e.g. run the gpu preset's shapes on cpu as a smoke test)")
    ap.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), help="override the preset's model shapes")
    ap.add_argument("--quants", nargs="+", choices=["none", "nf4"], help="override the preset's quantizations")
    ap.add_argument("--seq", type=int, help="override the sequence length")
    ap.add_argument("--microbatch", type=int, help="override the microbatch size")
    ap.add_argument("--steps", type=int, help="override the number of timed steps")
    ap.add_argument("--swarms", type=int, default=0, metavar="ROUNDS",
                    help="also run a mixed-shard 3-node swarm vs an all-shards one for ROUNDS rounds and compare losses")
    args = ap.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(2)
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.preset == "cpu":
        base = dict(device="cpu", shape="cpu-mid", dtype="float32", quant="none", microbatch=4, seq=256, steps=3)
        specs = [dict(base, shards=s) for s in ("all", "upper")]
    else:
        specs = [dict(device="cuda", shape=shape, dtype="bfloat16", quant=q, microbatch=4, seq=1024, steps=5, shards=s)
                 for shape in ("qwen2.5-0.5b", "llama-3-8b") for q in ("none", "nf4") for s in ("all", "upper")]
    overrides = {k: getattr(args, k) for k in ("device", "seq", "microbatch", "steps") if getattr(args, k) is not None}
    specs = [dict(spec, **overrides) for spec in specs
             if (not args.shapes or spec["shape"] in args.shapes) and (not args.quants or spec["quant"] in args.quants)]
    results = []
    for spec in specs:  # written after each run, so a run cut short keeps what it measured
        results.append(run(spec))
        Path(args.out).write_text(json.dumps({"results": results}, indent=2))
    pairs = {}
    for r in results:
        key = (r["shape"], r["quant"])
        pairs.setdefault(key, {})[r["shards"]] = r
    ratios = []
    for (shape, quant), p in pairs.items():
        if "all" in p and "upper" in p and "error" not in p["all"] and "error" not in p["upper"]:
            ratios.append({
                "shape": shape, "quant": quant,
                "time_per_sample_upper_over_all": p["upper"]["seconds_per_sample"] / p["all"]["seconds_per_sample"],
                "peak_training_memory_upper_over_all": (p["upper"]["peak_training_bytes"] / p["all"]["peak_training_bytes"]
                                                        if p["all"]["peak_training_bytes"] > 0 else None),  # CPU RSS can show none
                "estimate_over_measured_all": p["all"]["estimate_bytes"] / p["all"]["peak_bytes"],
                "estimate_over_measured_upper": p["upper"]["estimate_bytes"] / p["upper"]["peak_bytes"],
            })
    out = {"results": results, "ratios": ratios}
    if args.swarms:
        out["mixed_vs_uniform"] = compare_swarms(args.swarms)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
