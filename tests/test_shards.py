"""Adapter shards: nodes with different shard sets train one adapter together.

3 nodes on 127.0.0.1: all shards / upper half / lower half. After each round every
shard's weights are bit-identical among its trainers; the full adapter's loss falls; the
exported adapter (assembled from peers for the shards a node does not train) loads with
stock PEFT. Plus unit checks of the plan, the memory estimate and `--shards auto`.
"""

from __future__ import annotations

import os

import pytest

from node.model import check_shard_plan, default_shard_plan
from tests.conftest import write_test_manifest


def test_default_plan_covers_any_depth():
    for n in (1, 2, 4, 8, 9, 24, 32, 80):
        plan = default_shard_plan(n)
        assert plan[0][0] == 0 and plan[-1][1] == n
        assert all(a < b for a, b in plan) and all(plan[i][1] == plan[i + 1][0] for i in range(len(plan) - 1))
    assert len(default_shard_plan(32)) == 8


def test_estimate_prefers_upper_shards_and_respects_budget(tiny_base):
    from node.config import NodeConfig
    from node.manifest import load_manifest
    from node.model import Adapter, attach_lora, load_base
    from node.shards import ShardChoiceError, choose_shards_auto, estimate

    import tempfile
    from pathlib import Path

    model = attach_lora(load_base(tiny_base), rank=8, alpha=16, dropout=0.0, target_modules=("all-linear",), init_seed=0)
    adapter = Adapter.from_model(model, check_shard_plan((), 4))
    with tempfile.TemporaryDirectory() as d:
        m = load_manifest(write_test_manifest(Path(d) / "s.toml", tiny_base))
        shape = dict(microbatch=m.rounds.microbatch_size, seq_len=m.data.max_length, dtype_bytes=4)
        upper = estimate(model, adapter, (1,), **shape)
        full = estimate(model, adapter, (0, 1), **shape)
        assert upper.activations * 2 == full.activations and upper.adapter_state < full.adapter_state
        between = (upper.total + full.total) // 2
        assert choose_shards_auto(model, adapter, m, NodeConfig(max_memory=str(between)), "cpu") == (1,)
        assert choose_shards_auto(model, adapter, m, NodeConfig(max_memory="64GiB"), "cpu") == (0, 1)
        with pytest.raises(ShardChoiceError, match="top shard alone"):
            choose_shards_auto(model, adapter, m, NodeConfig(max_memory="1MiB"), "cpu")


@pytest.mark.swarm
@pytest.mark.timeout(420)
def test_mixed_shard_sets_train_one_adapter(tmp_path, tiny_base, spawn_node):
    """4 one-layer shards; one node trains all, one the upper half, one the lower half. After every
    round every node holds the whole adapter bit-identically: the shards it trains through the exact
    sum, the others pulled from their trainers at that same round before its next forward pass."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from node.model import Adapter

    rounds = int(os.environ.get("SWARMTUNE_TEST_SHARD_ROUNDS", "24"))
    plan = ((0, 1), (1, 2), (2, 3), (3, 4))
    manifest = write_test_manifest(tmp_path / "swarm.toml", tiny_base, rounds={"max_rounds": rounds},
                                   shards={"plan": plan})
    export = tmp_path / "adapter"
    full = spawn_node(manifest, "full", "--min-peers", "3", "--shards", "all")
    peers = full.wait_info()["maddrs"]
    upper = spawn_node(manifest, "upper", "--min-peers", "3", "--shards", "2,3", "--initial-peers", *peers, "--export", str(export))
    lower = spawn_node(manifest, "lower", "--min-peers", "3", "--shards", "0,1", "--initial-peers", *peers)
    for node in (full, upper, lower):
        assert node.wait_exit(timeout=360) == 0, node.log.read_text()[-3000:]
    rows = {n: n.applied() for n in (full, upper, lower)}
    rf, ru, rl = rows[full], rows[upper], rows[lower]
    # a node may discard a round whose all-reduce lost a part (it takes the others' state): at most 2
    missing = {n.home.name: sorted(set(range(rounds)) - set(r)) for n, r in rows.items()}
    assert all(len(m) <= 2 for m in missing.values()), missing
    together = [r for r in range(rounds) if all(r in row for row in rows.values())]
    assert len(together) >= rounds - 4
    for r in together:
        hashes = {n.home.name: rows[n][r]["hash"] for n in rows}
        assert len(set(hashes.values())) == 1, f"round {r}: whole adapters differ {hashes}"
        assert rf[r]["groups"] == {str(k): 2 for k in range(4)}
        assert ru[r]["groups"] == {"2": 2, "3": 2} and rl[r]["groups"] == {"0": 2, "1": 2}
    assert all(rf[r]["coverage"] == {str(k): 2 for k in range(4)} for r in together)
    assert rf[max(rf)]["loss"] < 0.8 * rf[min(rf)]["loss"]
    for n in rows:  # nobody distrusted, and a normal stop logs no traceback
        assert "not asked again" not in n.log.read_text(), n.log.read_text()[-3000:]
        assert "Traceback" not in n.log.read_text(), n.log.read_text()
    # the upper-half node exported the whole adapter, equal to every node's last state
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_base)), str(export))
    adapter = Adapter.from_model(model, check_shard_plan(plan, 4))
    with torch.no_grad():
        assert adapter.state_hash() == full.rounds()[-1]["hash"] == upper.rounds()[-1]["hash"] == lower.rounds()[-1]["hash"]
