"""QLoRA path on CPU: a 4-bit NF4 base (bitsandbytes) plus LoRA shards trains.

bitsandbytes runs 4-bit on CPU (slowly); real speed and memory are measured on a GPU by
scripts/bench_shards.py. Here: the base loads quantized and frozen, one node round of
local gradients flows only into the trained shard, and an update changes only that shard.
"""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")


def test_nf4_base_with_lora_shards_trains_on_cpu(tiny_base):
    from node.data import load_examples
    from node.data import builtin_data_path
    from node.manifest import OptimSection
    from node.model import Adapter, attach_lora, check_shard_plan, load_base
    from node.trainer import Trainer
    from transformers import AutoTokenizer

    base = load_base(tiny_base, quantization="nf4", device="cpu")
    quantized = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized, "the base must be 4-bit"
    assert all(not p.requires_grad for p in base.parameters())
    model = attach_lora(base, rank=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"), init_seed=0)
    adapter = Adapter.from_model(model, check_shard_plan((), 4))
    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    examples = load_examples(str(builtin_data_path("train")), tok, max_length=32)[:8]

    trainer = Trainer(model, adapter, (1,), OptimSection(lr=1e-2), microbatch_size=4, device="cpu", pad_id=tok.pad_token_id)
    local = trainer.local_gradients(examples)
    assert set(local.grad_sums) == {1}
    assert torch.isfinite(local.grad_sums[1]).all() and local.grad_sums[1].abs().sum() > 0
    assert local.tokens > 0 and local.loss_sum > 0

    before0, before1 = adapter.shard_hash(0), adapter.shard_hash(1)
    trainer.apply({1: local.grad_sums[1] / local.tokens}, lr=1e-2)
    assert adapter.shard_hash(0) == before0, "the untrained lower shard must not move"
    assert adapter.shard_hash(1) != before1
