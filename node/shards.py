"""Choosing which adapter shards this node trains (`--shards auto`) from a memory estimate.

A node that trains only upper shards stops backward at its lowest trained layer: it keeps
activations only for the layers above it, and grads/optimizer state only for its shards.
That is what lets an 8-12 GB card help a swarm of a larger model. The estimate:

    base weights (all layers, as loaded: fp32/bf16 or 4-bit)
  + per trained shard: LoRA params, grads, AdamW moments (4 x fp32 per value)
  + activations kept for backward: for each layer from the lowest trained one to the top,
    microbatch x seq x (ACT_HIDDEN x hidden + ACT_MLP x intermediate) values, plus attention
    scores (microbatch x heads x seq^2) where the kernel materialises them
  + logits and their gradient (microbatch x seq x vocab, fp32, x3)
  + a fixed runtime overhead.

`scripts/bench_shards.py` checks this estimate against measured peak memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# hidden-sized tensors kept per layer (norm in/out, q/k/v/o in/out, residuals, LoRA inputs). 10 under-estimated a
# Llama-3-8B-shaped model by 4-9 % on an H200 (bf16 and NF4, scripts/bench_shards.py --preset gpu: 57.4 GiB measured
# against 53.7 estimated, all shards, 4 x 1024 tokens), and an under-estimate is an out-of-memory crash for
# `--shards auto`; 15 puts it 1-2 % over there and 7-9 % over for Qwen2.5-0.5B's shape
ACT_HIDDEN = 15
ACT_MLP = 4  # intermediate-sized tensors kept per layer (gate, up, act, product)
# runtime not in the tensors above: CUDA context + allocator slack on a GPU; on a CPU the process's
# torch/transformers libraries (RSS). Calibrated against scripts/bench_shards.py measurements.
OVERHEAD_BYTES = {"cuda": 300 * 2**20, "cpu": 600 * 2**20}


class ShardChoiceError(ValueError):
    pass


@dataclass(frozen=True)
class Estimate:
    shards: tuple[int, ...]
    weights: int
    adapter_state: int
    activations: int
    logits: int

    device: str = "cpu"

    @property
    def total(self) -> int:
        return self.weights + self.adapter_state + self.activations + self.logits + OVERHEAD_BYTES["cuda" if self.device.startswith("cuda") else "cpu"]


def parse_bytes(text: str) -> int:
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    t = text.strip().lower().replace(" ", "")
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    if unit not in units or not num:
        raise ShardChoiceError(f"--max-memory {text!r}: expected a size like 6GiB, 8000MB or 12gb")
    return int(float(num) * units[unit])


def estimate(model, adapter, shards, *, microbatch: int, seq_len: int, dtype_bytes: int, device: str = "cpu") -> Estimate:
    cfg = model.config
    hidden, inter = cfg.hidden_size, getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)
    heads, vocab = cfg.num_attention_heads, cfg.vocab_size
    shards = tuple(sorted(shards))
    # float32 per trained value: weights, gradient and three more (per-step: AdamW's two moments and the
    # error-feedback residual, kept on the model's device; diloco: the inner moments and the outer momentum)
    lora = sum(adapter.shard_numel(k) for k in shards) * 4 * 5
    lowest = min(adapter.plan[k][0] for k in shards)
    n_layers = adapter.plan[-1][1] - lowest
    tokens = microbatch * seq_len
    per_layer = tokens * (ACT_HIDDEN * hidden + ACT_MLP * inter) * dtype_bytes + microbatch * heads * seq_len * seq_len * dtype_bytes
    lora_params = sum(p.numel() * p.element_size() for p in adapter.params)
    return Estimate(
        shards=shards,
        weights=sum(p.numel() * p.element_size() for p in model.parameters()) - lora_params,
        adapter_state=lora + (lora_params - sum(adapter.shard_numel(k) for k in shards) * 4),
        activations=n_layers * per_layer,
        logits=3 * tokens * vocab * 4,
        device=device,
    )


def memory_budget(max_memory: str, device: str) -> int:
    if max_memory:
        return parse_bytes(max_memory)
    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free * 0.9)
    import psutil

    return int(psutil.virtual_memory().available * 0.8)


def choose_shards_auto(model, adapter, manifest, cfg, device: str) -> tuple[int, ...]:
    """The most shards that fit the budget, always a contiguous set ending at the top shard."""
    budget = memory_budget(cfg.max_memory, device)
    dtype_bytes = 2 if manifest.base.dtype == "bfloat16" else 4
    k_top = adapter.num_shards - 1
    best = None
    for lowest in range(k_top, -1, -1):
        shards = tuple(range(lowest, adapter.num_shards))
        est = estimate(model, adapter, shards, microbatch=manifest.rounds.microbatch_size, seq_len=manifest.data.max_length, dtype_bytes=dtype_bytes, device=device)
        if est.total > budget:
            break
        best = est
    if best is None:
        top = estimate(model, adapter, (k_top,), microbatch=manifest.rounds.microbatch_size, seq_len=manifest.data.max_length, dtype_bytes=dtype_bytes, device=device)
        raise ShardChoiceError(
            f"even the top shard alone needs about {top.total / 2**30:.2f} GiB (weights {top.weights / 2**30:.2f}, "
            f"activations {top.activations / 2**30:.2f}), over the budget of {budget / 2**30:.2f} GiB; use a 4-bit base "
            "(quantization = 'nf4'), a smaller [rounds] microbatch_size, --gradient-checkpointing, or a larger --max-memory"
        )
    return best.shards


def describe(est: Estimate) -> str:
    return (f"shards {list(est.shards)}: ~{est.total / 2**30:.2f} GiB (weights {est.weights / 2**30:.2f}, adapter state "
            f"{est.adapter_state / 2**20:.1f} MiB, activations {est.activations / 2**30:.2f}, logits {est.logits / 2**30:.2f})")



def parse_shards(spec: str, num_shards: int) -> tuple[int, ...]:
    """`--shards all` or a comma list like `2,3` -> sorted shard indices (ShardChoiceError when bad)."""
    if spec in ("", "all"):
        return tuple(range(num_shards))
    try:
        shards = tuple(sorted({int(s) for s in spec.split(",") if s.strip()}))
    except ValueError:
        raise ShardChoiceError(f"--shards {spec!r}: expected 'all', 'auto' or a comma list of shard indices like 2,3") from None
    bad = [s for s in shards if not 0 <= s < num_shards]
    if bad or not shards:
        raise ShardChoiceError(f"--shards {spec!r}: the manifest's shard plan has shards 0..{num_shards - 1}; {bad or 'none given'} not among them")
    return shards
