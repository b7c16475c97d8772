"""DiLoCo on real node processes (127.0.0.1, real p2pd, the tiny Llama, real PEFT).

- with one inner step, outer SGD lr 1 and no momentum, a diloco node follows a per-step node's loss
  curve (the outer step just re-applies the inner one, through the wire grid);
- a 3-node diloco swarm, one node SIGKILLed in the middle of an inner phase and a late joiner: after
  every round every trainer holds the same outer state (hashes), the killed node's partial work is in
  nobody's update, the joiner starts from the swarm's exact state, and every ledger verifies; the same
  with [sync] overlap, where each round sums the round before's pseudo-gradients while its own inner
  steps run (the exchange runs alongside the compute, and a round credits the samples it summed);
- an overlapped swarm's node that comes late to the last round, after the other two summed it as a pair, takes
  their final state (nothing later would heal it): every trainer ends with the same adapter.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from node.control_client import ControlClient

from tests.conftest import verify_ledgers, write_test_manifest

pytestmark = pytest.mark.swarm


@pytest.mark.timeout(300)
def test_one_inner_step_with_plain_outer_sgd_equals_per_step(tmp_path, tiny_base, spawn_node):
    """A solo diloco node (H = 1, outer SGD lr 1, no momentum) against per-step training of the same
    global batches in this process (per-step mode equals a single process: test_swarm.py)."""
    import torch

    from node.data import assign_examples, load_examples, resolve_data
    from node.manifest import SyncSection, load_manifest
    from node.model import build_lora_model
    from node.trainer import Trainer, lr_at

    rounds, batch = 6, 16
    path = write_test_manifest(tmp_path / "diloco.toml", tiny_base, rounds={"max_rounds": rounds, "target_batch_size": batch},
                               sync={"mode": "diloco", "inner_steps": 1, "outer_lr": 1.0, "outer_momentum": 0.0,
                                     "wire": "int32"})
    node = spawn_node(path, "diloco")
    assert node.wait_exit(timeout=240) == 0, node.log.read_text()[-3000:]
    rows = node.applied()
    assert sorted(rows) == list(range(rounds))

    torch.set_num_threads(1)
    m = load_manifest(path)
    model, adapter = build_lora_model(m, tiny_base, device="cpu")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    examples = load_examples(resolve_data(m.data.source), tok, max_length=m.data.max_length, packing=m.data.packing)
    trainer = Trainer(model, adapter, range(adapter.num_shards), m.optim, microbatch_size=m.rounds.microbatch_size,
                      device="cpu", pad_id=tok.pad_token_id, sync=SyncSection())  # per-step
    me = node.info()["peer_id"]
    for r in range(rounds):
        idx = assign_examples(len(examples), swarm_id=m.order_key, round=r, total=batch, members=[me], me=me)
        local = trainer.local_gradients([examples[i] for i in idx])
        loss = local.loss_sum / local.tokens
        assert rows[r]["samples"] == local.samples == batch
        # the same examples, the same AdamW step; the outer step only puts it back through the int32 grid
        assert abs(rows[r]["loss"] - loss) <= 1e-5 * loss, (r, rows[r]["loss"], loss)
        trainer.apply({k: g / local.tokens for k, g in local.grad_sums.items()}, lr_at(r, m.optim, rounds))
    assert rows[rounds - 1]["loss"] < rows[0]["loss"]


def _three_nodes(tmp_path, tiny_base, spawn_node, *, rounds: int, steps: int, overlap: bool, c_env=None):
    """A 3-node diloco swarm on the int8 grid: (manifest, a's addresses, (a, b, c)); `c_env`: c's environment."""
    manifest = write_test_manifest(tmp_path / "swarm.toml", tiny_base, rounds={"max_rounds": rounds},
                                   sync={"mode": "diloco", "inner_steps": steps, "wire": "int8", "overlap": overlap})
    a = spawn_node(manifest, "a", "--min-peers", "3")
    peers = a.wait_info()["maddrs"]
    b = spawn_node(manifest, "b", "--min-peers", "3", "--initial-peers", *peers)
    c = spawn_node(manifest, "c", "--min-peers", "3", "--initial-peers", *peers, **({"env": c_env} if c_env else {}))
    return manifest, peers, (a, b, c)


@pytest.mark.timeout(480)
@pytest.mark.parametrize("overlap", [False, True], ids=["sequential", "overlap"])
def test_diloco_swarm_survives_a_kill_mid_inner_phase_and_a_late_joiner(tmp_path, tiny_base, spawn_node, overlap):
    rounds, steps = 8, 8
    manifest, peers, (a, b, c) = _three_nodes(tmp_path, tiny_base, spawn_node, rounds=rounds, steps=steps, overlap=overlap)
    c.wait_round(3, timeout=240)
    # c just finished round 2 and is computing round 3's inner steps (8 of them): kill it there
    time.sleep(0.3)
    os.killpg(c.popen.pid, signal.SIGKILL)
    c.popen.wait(timeout=30)
    killed_in = c.rounds()[-1]["next_round"]
    a.wait_round(killed_in + 1, timeout=240)
    # hold the survivors at a round boundary while the joiner starts (a busy 2-core machine starts slowly)
    for node in (a, b):
        with ControlClient(node.home / "node.sock") as client:
            client.pause()
    late = spawn_node(manifest, "late", "--initial-peers", *peers)
    late.wait_log("synced adapter and optimizer state from peers", timeout=240)
    for node in (a, b):
        with ControlClient(node.home / "node.sock") as client:
            client.resume()
    for node in (a, b, late):
        assert node.wait_exit(timeout=300) == 0, node.log.read_text()[-3000:]

    runs = {"a": a.applied(), "b": b.applied(), "c": c.applied(), "late": late.applied()}
    compared = 0
    for r in range(rounds):
        # a round that lost one shard's sum (the kill) applied only the other and is whole on no node; it is
        # compared through the rounds after it
        hashes = {name: rows[r]["hash"] for name, rows in runs.items() if r in rows}
        assert len(set(hashes.values())) <= 1, f"round {r}: outer states differ {hashes}"
        compared += len(hashes) >= 2
    assert compared >= rounds - 2, runs
    assert killed_in not in runs["c"], "the killed node completed no round it was killed in"
    # the survivors completed the round c died in, without it (its partial inner work is in no update)
    assert {"0": 2, "1": 2} in [runs["a"][r]["groups"] for r in (killed_in, killed_in + 1) if r in runs["a"]], runs["a"]
    # a round of diloco counts every inner step's samples: 8 steps of a third of 24; with overlap, those of the
    # round before (summed in this one): round 0 sums nothing, and the last round runs no inner steps
    if overlap:
        assert runs["a"][0]["samples"] == 0 and runs["a"][1]["samples"] == steps * 8
        assert runs["a"][rounds - 1]["compute_s"] < 0.5 * runs["a"][1]["compute_s"]
        # the exchange ran alongside the inner steps: rounds took less than compute plus averaging
        inner = [runs["a"][r] for r in range(1, rounds - 1) if r in runs["a"]]
        assert sum(x["seconds"] for x in inner) < sum(x["compute_s"] + x["averaging_s"] for x in inner), inner
    else:
        assert runs["a"][0]["samples"] == steps * 8
    first = min(runs["late"])
    assert first > killed_in
    assert runs["late"][first]["start_hash"] == runs["a"][first]["start_hash"], "the joiner starts from the swarm's state"
    assert a.rounds()[-1]["hash"] == b.rounds()[-1]["hash"] == late.rounds()[-1]["hash"]
    losses = [runs["a"][r]["loss"] for r in sorted(runs["a"]) if runs["a"][r]["loss"] is not None]
    assert losses[-1] < 0.8 * losses[0], losses
    verify_ledgers(manifest, a, b, c, late)



@pytest.mark.timeout(300)
@pytest.mark.parametrize("late", [5, 32], ids=["donors-serving", "donors-gone"])
def test_a_node_left_out_of_the_last_overlapped_round_takes_the_swarms_end_or_stops_saying_so(tmp_path, tiny_base, spawn_node, late):
    """c comes `late` seconds to the last round's exchange; a and b sum it as a pair. While they serve the final
    state c takes it; once they have left it stops with exit 2 and says why, and never sums that round alone."""
    from node import checkpoint
    from node.manifest import load_manifest

    rounds, steps = 4, 4
    manifest, _, (a, b, c) = _three_nodes(tmp_path, tiny_base, spawn_node, rounds=rounds, steps=steps, overlap=True,
                                          c_env={"SWARMTUNE_FAULT_LATE": f"{rounds - 1}:{late}"})
    for node in (a, b):
        assert node.wait_exit(timeout=240) == 0, node.log.read_text()[-3000:]
    code = c.wait_exit(timeout=120)
    last = rounds - 1
    runs = {"a": a.applied(), "b": b.applied(), "c": c.applied()}
    assert runs["a"][last]["groups"] == {"0": 2, "1": 2}, runs["a"][last]  # a and b summed the last round as a pair
    assert last not in runs["c"], runs["c"]  # c summed it neither with them nor alone
    assert a.rounds()[-1]["hash"] == b.rounds()[-1]["hash"]
    swarm_id = load_manifest(manifest).swarm_id
    final = {n: checkpoint.load_latest(node.workdir / "checkpoints", swarm_id) for n, node in (("a", a), ("b", b), ("c", c))}
    params = {n: {k: v for k, v in f.tensors.items() if k.startswith("param/")} for n, f in final.items()}
    same = all(torch.equal(params["a"][k], params["c"][k]) for k in params["a"])
    log = c.log.read_text()
    if late == 5:
        assert code == 0, log[-3000:]
        assert f"synced adapter and optimizer state from peers: round {rounds}" in log, log[-3000:]
        assert final["c"].round == rounds and same, "c ends with another adapter"
    else:
        assert code == 2, log[-3000:]
        assert "finished its last round (3) without this node" in log and "swarmtune export" in log and "Traceback" not in log, log[-3000:]
        assert final["c"].round == last and not same  # round 3's state, kept as it was
    verify_ledgers(manifest, a, b, c)
