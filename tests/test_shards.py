"""Adapter shards: nodes with different shard sets train one adapter together.

3 nodes on 127.0.0.1: all shards / upper half / lower half. After each round every
shard's weights are bit-identical among its trainers; the full adapter's loss falls; the
exported adapter (assembled from peers for the shards a node does not train) loads with
stock PEFT. Plus unit checks of the plan, the memory estimate and `--shards auto`.
"""

from __future__ import annotations

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
@pytest.mark.timeout(360)
def test_mixed_shard_sets_train_one_adapter(tmp_path, tiny_base, spawn_node):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from node.model import Adapter

    rounds = 10
    manifest = write_test_manifest(tmp_path / "swarm.toml", tiny_base, rounds={"max_rounds": rounds})
    export = tmp_path / "adapter"
    full = spawn_node(manifest, "full", "--min-peers", "3", "--shards", "all")
    peers = full.wait_info()["maddrs"]
    upper = spawn_node(manifest, "upper", "--min-peers", "3", "--shards", "1", "--initial-peers", *peers, "--export", str(export))
    lower = spawn_node(manifest, "lower", "--min-peers", "3", "--shards", "0", "--initial-peers", *peers)
    for node in (full, upper, lower):
        assert node.wait_exit(timeout=300) == 0, node.log.read_text()[-3000:]
    rf, ru, rl = ({r["round"]: r for r in n.rounds() if r["applied"]} for n in (full, upper, lower))
    # a node may discard a round whose all-reduce lost a part (then resyncs); never diverge
    assert all(len(set(range(rounds)) - set(rows)) <= 2 for rows in (rf, ru, rl))
    for r in range(rounds):
        if r in rf and r in rl:
            assert rf[r]["shard_hashes"]["0"] == rl[r]["shard_hashes"]["0"], f"round {r}: shard 0 differs among its trainers"
            assert rf[r]["groups"]["0"] == 2 and rl[r]["groups"] == {"0": 2}
        if r in rf and r in ru:
            assert rf[r]["shard_hashes"]["1"] == ru[r]["shard_hashes"]["1"], f"round {r}: shard 1 differs among its trainers"
            assert rf[r]["groups"]["1"] == 2 and ru[r]["groups"] == {"1": 2}
    assert any(row["coverage"] == {"0": 2, "1": 2} for row in rf.values())
    rf_first, rf_last = rf[min(rf)], rf[max(rf)]
    assert rf_last["loss"] < 0.8 * rf_first["loss"]
    # the upper-half node exported the whole adapter: shard 0 pulled from its trainers
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_base)), str(export))
    adapter = Adapter.from_model(model, check_shard_plan((), 4))
    with torch.no_grad():
        assert adapter.shard_hash(1) == upper.rounds()[-1]["shard_hashes"]["1"] == full.rounds()[-1]["shard_hashes"]["1"]
        assert adapter.shard_hash(0) in {r["shard_hashes"]["0"] for r in rf.values()}, "shard 0 must come from its trainers"
        assert adapter.shard_hash(0) != full.rounds()[0]["shard_hashes"]["0"] or len(rf) == 1
