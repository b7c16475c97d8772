"""What crosses the wire, per sync mode (issue 14), written as JSON.

    python scripts/bench_comm.py --quick --out bench_comm.json   # under 10 minutes on 2 cores
    python scripts/bench_comm.py --out bench_comm.json           # the full run (longer)

Every figure comes from real nodes (`python -m node run`, real p2pd, real PEFT) or, for the
codec, from node.swarm.exact itself:

codec   encode + decode microseconds per value on one CPU core, per grid: block exponents,
        quantize, sum encode, sum decode, dequantize (what one peer does per round).
B4      per mode, a 2-node swarm on 127.0.0.1: bytes each node sent per round, read from its
        p2pd sockets' counters (`ss`, the round records' sent_bytes), ÷ the fp32 ring bound
        2·(N−1)/N·4 bytes per value; and bytes per trained sample ÷ the removed 16-byte limbs'
        (which sent four 32-bit words per value where the int32 grid sends one, on the same
        transport: 4 × the int32 grid's measured bytes per sample).
B5      the same runs' held-out loss at equal samples (exported adapter, stock PEFT, the task's
        eval split) against per-step on the exact 32-bit grid; on the built-in task, and (full
        run) on a second task, two-digit addition, generated here. Paired: within a seed every
        mode has the same LoRA init and the same batches in the same order ([data] shuffle_seed);
        over --seeds seeds, with the reference's own spread over seeds as the noise floor.
B2      compute ÷ wall of each node for 2 (and, full, 3) nodes in network namespaces whose links
        are shaped with tc tbf (50 and, full, 20 Mbit/s), with an adapter of >= 8 M values.
scale   scripts/sim_scale.py: exact sums in one group of N averaging-only peers.
paper   Llama-3-8B all-linear r=16 (41.9 M values) at 3,083 tok/s, 64 × 512-token rounds, a
        50 Mbit/s uplink, from each mode's measured bytes per value: compute ÷ (compute + upload).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODES = {  # name -> [sync] section
    "per-step int32": {"mode": "per-step", "wire": "int32"},
    "per-step int8": {"mode": "per-step", "wire": "int8"},
    "diloco int8": {"mode": "diloco", "wire": "int8"},
    "diloco int8 overlap": {"mode": "diloco", "wire": "int8", "overlap": True},
}
REFERENCE = "per-step int32"
# B5 is paired: within one seed every mode starts from the same LoRA init ([lora] init_seed) and trains on the same
# batches in the same order ([data] shuffle_seed), so what differs is what the sync mode does. Across seeds the
# reference's own spread is the noise floor of a comparison on a task this small. The learning rate decays to 0
# (cosine): at a constant rate the end of a run on this task is a random point of a noisy curve, and the same
# seed's int8 run landed 19 % from int32's; decayed, 1.2, -0.1 and 0.1 % (3 seeds, per-step)


# ---------------------------------------------------------------------------------------------- codec

def bench_codec(values: int, repeats: int = 5, device: str = "cpu") -> dict:
    """Each stage timed on its own, best of `repeats` (the machine's other work only ever adds time).

    On a CUDA device the grid stages (block exponents, quantize, dequantize) run on the GPU where the adapter
    lives; what crosses the wire is bytes, so the part comes to the CPU (`to_host`, the grid's own dtype), the
    reducer's reply format is packed and unpacked there, and the sum goes back (`to_device`). `same_bits_as_cpu`:
    every stage's output equals the CPU's bit for bit (a GPU node and a CPU node in one group stay identical)."""
    import torch

    from node.swarm.exact import GRIDS, Layout, block_exponents, decode_sum, dequantize, encode_sum, quantize

    torch.set_num_threads(1)
    cuda = device.startswith("cuda")
    offload = device != "cpu"  # the grid runs on another device than the wire's bytes
    gen = torch.Generator().manual_seed(0)
    # blocks of every size from 2**-80 to 2**80 (x 1e-3), some all zero, and signed zeros: the grid's exponents
    # span their range, so `same_bits_as_cpu` checks the powers of two the codec builds, not one or two of them
    block = torch.arange(values) // 4096
    x_cpu = torch.randn(values, generator=gen) * 1e-3 * torch.pow(2.0, (block % 161 - 80).float())
    x_cpu[(block % 97) == 5] = 0.0
    x_cpu[::1001] = -0.0
    x = x_cpu.to(device)
    layout = Layout([values])

    def best(fn, *args):
        times = []
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(*args)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return out, min(times)

    out = {}
    for name, grid in GRIDS.items():
        exps, t_exp = best(block_exponents, x, layout, grid)
        (q, sent), t_q = best(quantize, x, exps, layout, grid)
        stages = {"block_exponents": t_exp, "quantize": t_q}
        if offload:
            q_host, stages["to_host"] = best(lambda t: t.cpu(), q)
        else:
            q_host = q
        total = q_host.to(torch.int32) * 2  # a 2-peer sum, as a reducer sends it back
        data, stages["encode_sum"] = best(encode_sum, total, grid, 2, values)
        got, stages["decode_sum"] = best(decode_sum, data, grid, 2, values)
        if offload:
            got, stages["to_device"] = best(lambda t: t.to(device), got)
        update, stages["dequantize"] = best(dequantize, got, exps, layout)
        row = {"us_per_value": round(sum(stages.values()) / values * 1e6, 4),
               "stages_us_per_value": {k: round(v / values * 1e6, 5) for k, v in stages.items()}}
        if offload:
            exps_c = block_exponents(x_cpu, layout, grid)
            q_c, sent_c = quantize(x_cpu, exps_c, layout, grid)
            def same(a, b):  # byte for byte (torch.equal calls -0.0 and 0.0 equal)
                a, b = a.cpu().contiguous(), b.cpu().contiguous()
                return a.dtype == b.dtype and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes()

            row["same_bits_as_cpu"] = bool(same(exps_c, exps) and same(q_c, q) and same(sent_c, sent)
                                           and same(dequantize(q_c.to(torch.int32) * 2, exps_c, layout), update))
        out[name] = row
    res = {"values": values, "device": torch.cuda.get_device_name() if cuda else device, "grids": out}
    if offload:  # what a GPU node did before the codec ran on the device: its gradient came to the CPU as float32
        _, t = best(lambda t: t.cpu(), x)
        res["fp32_to_host_us_per_value"] = round(t / values * 1e6, 5)
    return res


# ---------------------------------------------------------------------------------------------- nodes

def _node_cmd(manifest: Path, home: Path, host: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "node", "run", "--manifest", str(manifest), "--home", str(home), "--create-key",
            "--host-maddrs", f"/ip4/{host}/tcp/0", "--threads", "1", *extra]


def _records(home: Path) -> list[dict]:
    files = list((home / "swarms").glob("*/rounds.jsonl"))
    if not files:
        return []
    return [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]


def _info(home: Path, timeout: float = 180) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        files = list((home / "swarms").glob("*/node.json")) if (home / "swarms").exists() else []
        if files:
            try:
                return json.loads(files[0].read_text())
            except ValueError:
                pass
        time.sleep(0.5)
    raise RuntimeError(f"node in {home} did not start; see {home}/log.txt")


def run_swarm(manifest: Path, work: Path, nodes: int, *, prefixes=None, hosts=None, export: bool = False,
              timeout: float = 1500, behind: list | None = None) -> list[Path]:
    """Start `nodes` nodes on one manifest (the first is everyone's initial peer); wait for all to exit 0. With
    `behind` (a list), a node that stopped behind the swarm's end (exit 2: the others summed the last rounds
    without it and left) is appended to it instead of failing the run."""
    prefixes = prefixes or [()] * nodes
    hosts = hosts or ["127.0.0.1"] * nodes
    procs, homes = [], []
    try:
        for i in range(nodes):
            home = work / f"n{i}"
            home.mkdir(parents=True, exist_ok=True)
            extra = ["--min-peers", str(nodes)]
            if i:
                extra += ["--initial-peers", *_info(homes[0])["maddrs"]]
            if export:
                extra += ["--export", str(work / f"export{i}")]
            log = open(home / "log.txt", "w")
            procs.append(subprocess.Popen([*prefixes[i], *_node_cmd(manifest, home, hosts[i], *extra)], stdout=log,
                                          stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                          env=dict(os.environ, PYTHONUNBUFFERED="1")))
            homes.append(home)
        deadline = time.time() + timeout
        for p, home in zip(procs, homes):
            rc = p.wait(timeout=max(1.0, deadline - time.time()))
            if rc == 2 and behind is not None and "without this node" in (home / "log.txt").read_text():
                behind.append(home)
            elif rc != 0:
                raise RuntimeError(f"node in {home} exited {rc}; see {home}/log.txt")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return homes


def adapter_values(base: Path, rank: int) -> int:
    from node.model import attach_lora, load_base

    model = attach_lora(load_base(base), rank=rank, alpha=2 * rank, dropout=0.0, target_modules=("all-linear",), init_seed=0)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _manifest(path: Path, base: Path, *, data: str, sync: dict, rounds: int, rank: int, batch: int,
              matchmaking: float = 1.0, seed: int = 0) -> Path:
    from tests.conftest import write_test_manifest

    return write_test_manifest(path, base, data=data, data_fields={"shuffle_seed": 1 + seed}, rounds={"max_rounds": rounds, "target_batch_size": batch, "microbatch_size": 8},
                               lora={"rank": rank, "alpha": 2 * rank, "init_seed": seed}, sync=sync, optim={"lr": 3e-3, "schedule": "cosine"},
                               averaging={"matchmaking_time": matchmaking, "timeout": 30.0, "peer_ttl": 10.0})


def _sent_per_round(homes: list[Path]) -> tuple[list[int], list[int]]:
    """Bytes each node sent in each applied round (round 0 carries the link probe and is left out), and the
    samples it trained in each."""
    sent, samples = [], []
    for home in homes:
        for r in _records(home):
            if r["applied"] and r["round"] > 0:
                sent.append(r["sent_bytes"])
                samples.append(r["samples"])
    return sent, samples


def held_out_loss(base: Path, adapter: Path, records: list) -> float:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from node.tiny import evaluate

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(base))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter))
    res = evaluate(model, tok, records, max_new_tokens=4)
    return res["loss"]


def addition_task(folder: Path) -> tuple[str, Path]:
    """A second task: 'What is a + b?' -> 'c', a, b < 50; eval pairs disjoint from train pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(20261202)
    pairs = [(a, b) for a in range(50) for b in range(50)]
    rng.shuffle(pairs)
    forms = ("What is {a} + {b}?", "{a} plus {b} =", "Add {a} and {b}.", "Sum of {a} and {b}:")

    def write(name, chosen):
        lines = [json.dumps({"prompt": rng.choice(forms).format(a=a, b=b), "completion": f" {a + b}"}) for a, b in chosen]
        (folder / name).write_text("\n".join(lines) + "\n")

    write("train.jsonl", pairs[:2000])
    write("eval.jsonl", pairs[2000:2300])
    return str(folder / "train.jsonl"), folder / "eval.jsonl"


def bench_modes(base: Path, work: Path, *, tasks: dict, rank: int, batch: int, per_step_rounds: int, inner_steps: int,
                seeds: int) -> dict:
    """B4 and B5: each mode's 2-node swarm on loopback, for each task and seed, one swarm after another (their
    nodes would otherwise share two cores and time each other out). B4 from the first task's seeds, pooled."""
    from node.data import load_records

    values = adapter_values(base, rank)
    bound = 2 * (2 - 1) / 2 * 4 * values  # fp32 ring bound, bytes per node per round, N = 2
    rows, losses = {}, {}
    for task, (data, eval_path) in tasks.items():
        records = load_records(eval_path)
        for seed in range(seeds):
            for name, sync in MODES.items():
                sync = dict(sync)
                rounds = per_step_rounds
                if sync["mode"] == "diloco":
                    sync.update(inner_steps=inner_steps)  # the manifest's outer lr and momentum (swarm init's)
                    # with overlap round 0 only trains and the last round only sums: one round more for equal samples
                    rounds = max(1, per_step_rounds // inner_steps) + int(sync.get("overlap", False))
                folder = work / task / f"seed{seed}" / name.replace(" ", "-")
                folder.mkdir(parents=True)
                manifest = _manifest(folder / "swarm.toml", base, data=data, sync=sync, rounds=rounds, rank=rank,
                                     batch=batch, seed=seed)
                t0 = time.time()
                homes = run_swarm(manifest, folder, 2, export=True)
                hashes = {_records(h)[-1]["hash"] for h in homes}
                losses.setdefault(task, {}).setdefault(name, []).append(held_out_loss(base, folder / "export0", records))
                if task == next(iter(tasks)):  # B4: every node's every applied round over the first task's seeds
                    sent, samples = _sent_per_round(homes)
                    row = rows.setdefault(name, {"sent": [], "samples": [], "identical_adapters": True, "seconds": []})
                    row["sent"] += sent
                    row["samples"] += samples
                    row["seconds"].append(round(time.time() - t0, 1))
                if len(hashes) != 1:
                    rows[name]["identical_adapters"] = False
    for name, row in rows.items():
        # medians over the pooled rounds: a diloco run has only 3 or 4 rounds of 1.5 s, and what is sent on a
        # timer (heartbeats, DHT reads) lands in some of them and not in others (one seed's overlap rounds
        # sent 597-812 KB, the next two seeds' 587-621 KB)
        pooled_sent, pooled_samples = row.pop("sent"), row.pop("samples")
        sent, samples = statistics.median(pooled_sent), statistics.median(pooled_samples)
        rows[name] = {"sent_bytes_per_round": sent, "samples_per_round": samples, "node_rounds_pooled": len(pooled_sent),
                      "bytes_over_fp32_bound": round(sent / bound, 4), "bytes_per_sample": round(sent / samples, 1),
                      **row}
    limbs_per_sample = 4 * rows[REFERENCE]["bytes_per_sample"]
    modes = []
    for name, row in rows.items():
        modes.append({"name": name, **row, "bytes_per_sample_vs_limbs": round(row["bytes_per_sample"] / limbs_per_sample, 5),
                      "samples_per_limb_byte_gain": round(limbs_per_sample / row["bytes_per_sample"], 1)})
    loss_rows = {}
    for task, by_mode in losses.items():
        ref = by_mode[REFERENCE]
        # (max - min) / mean of the reference over seeds: how far one mode lands from itself (needs 2 seeds)
        loss_rows[task] = {"reference_spread_over_seeds":
                           round((max(ref) - min(ref)) / statistics.mean(ref), 5) if len(ref) > 1 else None}
        for name, per_seed in by_mode.items():
            paired = [v / r - 1 for v, r in zip(per_seed, ref)]
            loss_rows[task][name] = {"held_out_loss": round(statistics.mean(per_seed), 5),
                                     "per_seed": [round(v, 5) for v in per_seed],
                                     "vs_reference": round(statistics.mean(per_seed) / statistics.mean(ref) - 1, 5),
                                     "vs_reference_paired": [round(d, 5) for d in paired]}
    return {"adapter_values": values, "nodes": 2, "fp32_ring_bound_bytes": bound, "per_step_rounds": per_step_rounds,
            "inner_steps": inner_steps, "target_batch_size": batch, "seeds": seeds, "modes": modes,
            "loss_at_equal_samples": loss_rows,
            "limbs_reference": "4 x the int32 grid's measured bytes per sample (the limbs sent four 32-bit words per value)"}


def bench_utilisation(work: Path, *, rates: list[int], node_counts: list[int], rounds: int, inner_steps: int,
                      hidden: int, layers: int, rank: int, modes: list[str]) -> dict:
    """B2: compute ÷ wall per node on shaped links, adapter >= 8 M values, over the steady rounds: from the end
    of round 0 (start-up, link probe, first matchmaking) to the end of the round before the last (with overlap
    the last round only sums the one before; a long run has one such round at its end)."""
    from node.tiny import build_tiny_base
    from tests.conftest import NetnsLan

    base = build_tiny_base(work / "base-b2", config_overrides={"hidden_size": hidden, "intermediate_size": 2 * hidden,
                                                               "num_hidden_layers": layers})
    values = adapter_values(base, rank)
    out = []
    for nodes in node_counts:
        for rate in rates:
            sequential = None  # the sequential diloco run's inner-phase time: compute on a quiet CPU
            for name in modes:
                sync = dict(MODES[name])
                if sync["mode"] == "diloco":
                    sync.update(inner_steps=inner_steps)
                folder = work / f"b2-{nodes}-{rate}-{name.replace(' ', '-')}"
                folder.mkdir(parents=True)
                manifest = _manifest(folder / "swarm.toml", base, data="builtin:task", sync=sync, rounds=rounds, rank=rank,
                                     batch=8 * nodes, matchmaking=1.0)
                lan = NetnsLan(nodes)
                behind = []  # nodes left out of rounds near the end that stopped (per-step on these links)
                try:
                    for i in range(nodes):
                        lan.limit(i, f"{rate}mbit")
                    homes = run_swarm(manifest, folder, nodes, prefixes=[lan.prefix(i) for i in range(nodes)],
                                      hosts=[lan.ip(i) for i in range(nodes)], behind=behind)
                finally:
                    lan.close()
                homes = [h for h in homes if h not in behind]
                per_node, quiet = [], []
                for home in homes:
                    recs = [r for r in _records(home)][: rounds - 1]
                    wall = recs[-1]["time"] - recs[0]["time"]
                    compute = sum(r["compute_s"] for r in recs[1:])
                    per_node.append(compute / wall if wall > 0 else 0.0)
                    if sequential is not None:  # compute as fast as with a quiet CPU (overlap shares the 2 cores)
                        quiet.append(min(compute, sequential * (len(recs) - 1)) / wall if wall > 0 else 0.0)
                recs = _records(homes[0])
                steady = recs[1 : rounds - 1]
                row = {"mode": name, "nodes": nodes, "link_mbit": rate, "compute_over_wall": round(min(per_node), 3),
                       "per_node": [round(v, 3) for v in per_node], "stopped_behind": len(behind),
                       "rounds_applied": sum(bool(r["applied"]) for r in recs),
                       "identical_adapters": len({_records(h)[-1]["hash"] for h in homes}) == 1,
                       "median_compute_s": statistics.median(r["compute_s"] for r in steady),
                       "median_averaging_s": statistics.median(r["averaging_s"] for r in steady),
                       "median_round_s": statistics.median(r["seconds"] for r in steady),
                       "median_between_rounds_s": statistics.median(b["time"] - a["time"] for a, b in zip(recs, recs[1: rounds - 1])),
                       "sent_bytes_per_round": statistics.median(r["sent_bytes"] for r in steady)}
                if name == "diloco int8":
                    sequential = row["median_compute_s"]
                if quiet:
                    row["compute_over_wall_at_quiet_speed"] = round(min(quiet), 3)
                out.append(row)
    return {"adapter_values": values, "model": {"hidden": hidden, "layers": layers, "rank": rank}, "runs": out}


def bench_scale(work: Path, peers: list[int]) -> dict:
    out = work / "scale.json"
    subprocess.run([sys.executable, str(REPO / "scripts" / "sim_scale.py"), "--peers", *map(str, peers), "--values", "16384",
                    "--rounds", "2", "--matchmaking-per-peer", "0.25", "--out", str(out)], check=True, cwd=REPO,
                   start_new_session=True, timeout=3600)
    report = json.loads(out.read_text())
    table = [{k: r[k] for k in ("peers", "rounds", "rounds_complete", "exact", "start_s", "matchmaking_s", "allreduce_s", "memory_mb")}
             for r in report["results"]]
    return {"max_exact_group": report["max_exact_group"], "table": table}


def paper_row(modes: list[dict], inner_steps: int) -> list[dict]:
    """Llama-3-8B all-linear r=16 on a 4090 at home: compute ÷ (compute + upload), or ÷ max(compute, upload) with
    overlap (per-round work besides the two left out)."""
    values, tok_s, tokens, uplink = 41.9e6, 3083, 64 * 512, 50e6
    compute = tokens / tok_s
    rows = []
    for m in modes:
        per_value = m["bytes_over_fp32_bound"] * 4  # N = 2: the fp32 ring bound is 4 bytes per value
        upload = per_value * values * 8 / uplink
        steps = inner_steps if m["name"].startswith("diloco") else 1
        # with overlap the upload of round r runs alongside round r + 1's compute
        busy = max(steps * compute, upload) if "overlap" in m["name"] else steps * compute + upload
        rows.append({"mode": m["name"], "bytes_per_value": round(per_value, 3), "upload_s": round(upload, 1),
                     "compute_s": round(steps * compute, 1), "utilisation": round(steps * compute / busy, 3)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rounds and configurations (under 10 minutes on 2 cores)")
    ap.add_argument("--out", default="bench_comm.json")
    ap.add_argument("--skip", nargs="*", default=[], choices=["codec", "modes", "utilisation", "scale"])
    ap.add_argument("--codec-device", default="cpu", help="also time the codec on this device (e.g. cuda)")
    ap.add_argument("--codec-values", type=int, help="values the codec is timed on (default 2 M quick, 8 M full)")
    ap.add_argument("--seeds", type=int, default=0, help="B5: runs per mode and task, paired by seed (default 1 quick, 3 full)")
    ap.add_argument("--tasks", nargs="+", choices=["builtin", "addition"], help="B4/B5's tasks (default builtin quick, both full)")
    ap.add_argument("--b2-nodes", type=int, nargs="+", help="B2's swarm sizes (default 2 quick, 2 3 full)")
    ap.add_argument("--b2-rates", type=int, nargs="+", help="B2's link rates in Mbit/s (default 50 quick, 50 20 full)")
    ap.add_argument("--b2-modes", nargs="+", choices=list(MODES), default=["per-step int8", "diloco int8", "diloco int8 overlap"],
                    help="B2's modes (the sequential diloco run, when in, gives overlap its compute at quiet speed)")
    ap.add_argument("--inner-steps", type=int, help="diloco's inner steps H (default 20; B4/B5 10 with --quick)")
    ap.add_argument("--b2-rounds", type=int, help="B2's rounds per run (default 4 quick, 5 full; more with a small H)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (node logs, rounds.jsonl) and print its path")
    args = ap.parse_args()
    if os.geteuid() != 0 and "utilisation" not in args.skip:
        ap.error("the utilisation runs build network namespaces: run as root, or pass --skip utilisation")
    work = Path(tempfile.mkdtemp(prefix="swarmtune-bench-comm-"))
    os.environ.setdefault("SWARMTUNE_CACHE", str(work / "cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from node.data import builtin_data_path
    from node.tiny import build_tiny_base, default_tiny_dir

    inner = args.inner_steps or 20  # B2 and the paper row
    inner_b5 = args.inner_steps or (10 if args.quick else 20)  # quick B4/B5 has 20 per-step rounds: 2 outer rounds
    report: dict = {"quick": args.quick, "cpus": os.cpu_count(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    t0 = time.time()
    try:
        if "codec" not in args.skip:
            values = args.codec_values or (2_000_000 if args.quick else 8_000_000)
            report["codec"] = bench_codec(values)
            if args.codec_device != "cpu":
                report["codec_" + args.codec_device.split(":")[0]] = bench_codec(values, device=args.codec_device)
        if "modes" not in args.skip:
            base = build_tiny_base(default_tiny_dir())
            tasks = {}
            for task in args.tasks or (["builtin"] if args.quick else ["builtin", "addition"]):
                tasks[task] = ("builtin:task", builtin_data_path("eval")) if task == "builtin" else addition_task(work / "addition")
            report["B4_B5"] = bench_modes(base, work / "modes", tasks=tasks, rank=64, batch=24,
                                          per_step_rounds=20 if args.quick else 60, inner_steps=inner_b5,
                                          seeds=args.seeds or (1 if args.quick else 3))
            report["modes"] = [{k: m[k] for k in ("name", "bytes_over_fp32_bound", "bytes_per_sample_vs_limbs")}
                               | {"codec_us_per_value": report.get("codec", {}).get("grids", {}).get(MODES[m["name"]]["wire"], {}).get("us_per_value")}
                               for m in report["B4_B5"]["modes"]]
            report["paper_llama3_8b_50mbit"] = paper_row(report["B4_B5"]["modes"], inner_steps=inner)
        if "utilisation" not in args.skip:
            b2 = bench_utilisation(work, rates=args.b2_rates or ([50] if args.quick else [50, 20]),
                                   node_counts=args.b2_nodes or ([2] if args.quick else [2, 3]),
                                   rounds=args.b2_rounds or (4 if args.quick else 5), inner_steps=inner, hidden=512, layers=8, rank=128,
                                   modes=args.b2_modes)
            report["B2"] = b2
            report["utilisation"] = [{k: r[k] for k in ("mode", "nodes", "link_mbit", "compute_over_wall")} for r in b2["runs"]]
        if "scale" not in args.skip:
            report["scale"] = bench_scale(work, [2, 8] if args.quick else [2, 8, 16, 32, 40])
            report["max_exact_group"] = report["scale"]["max_exact_group"]
    finally:
        report["seconds"] = round(time.time() - t0, 1)
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(json.dumps(report, indent=1))
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
