"""A shard's state carries its own optimizer step count: after a round that applied only some shards, a node
that loads the state from a peer takes the same next step as that peer, bit for bit."""

from __future__ import annotations

import torch

from tests.conftest import write_test_manifest


def _trainer(manifest, tiny_base, sync=None):
    from transformers import AutoTokenizer

    from node.model import build_lora_model
    from node.trainer import Trainer

    torch.manual_seed(0)
    model, adapter = build_lora_model(manifest, tiny_base, device="cpu")
    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    return Trainer(model, adapter, range(adapter.num_shards), manifest.optim, microbatch_size=4, device="cpu",
                   pad_id=tok.pad_token_id, sync=sync)


def test_state_loaded_after_a_partial_round_steps_like_its_donor(tmp_path, tiny_base):
    from node.manifest import load_manifest

    m = load_manifest(write_test_manifest(tmp_path / "swarm.toml", tiny_base))
    donor, joiner = _trainer(m, tiny_base), _trainer(m, tiny_base)
    assert donor.adapter.num_shards >= 2
    gen = torch.Generator().manual_seed(1)
    grads = {k: torch.randn(donor.flat_shard(k).numel(), generator=gen) * 1e-2 for k in range(2)}
    donor.apply(grads, 1e-3)
    donor.apply({0: grads[0]}, 1e-3)  # shard 1's group did not form this round: only shard 0 stepped
    assert (donor.opt_step, donor.shard_step(0), donor.shard_step(1)) == (2, 2, 1)
    for k in range(2):
        joiner.load_shard_state(k, donor.shard_state(k), donor.shard_step(k))
    for t in (donor, joiner):
        t.apply(grads, 1e-3)
    for k in range(2):
        assert torch.equal(donor.flat_shard(k), joiner.flat_shard(k)), f"shard {k} differs after the next step"


def test_a_checkpoint_after_a_partial_round_restores_each_shards_step(tmp_path, tiny_base):
    from node import checkpoint
    from node.manifest import load_manifest

    m = load_manifest(write_test_manifest(tmp_path / "swarm.toml", tiny_base))
    before, after = _trainer(m, tiny_base), _trainer(m, tiny_base)
    gen = torch.Generator().manual_seed(2)
    grads = {k: torch.randn(before.flat_shard(k).numel(), generator=gen) * 1e-2 for k in range(2)}
    before.apply(grads, 1e-3)
    before.apply({0: grads[0]}, 1e-3)  # a partial round: only shard 0 stepped
    trained = range(before.adapter.num_shards)
    path = checkpoint.save(tmp_path / "ckpt", round=2, opt_step=before.opt_step, ledger_seq=-1, swarm_id="s",
                           tensors=checkpoint.training_tensors(before, before.adapter, trained),
                           shard_steps={k: before.shard_step(k) for k in trained})
    checkpoint.restore_training(checkpoint.load_latest(tmp_path / "ckpt", "s"), after, after.adapter, trained)
    assert [after.shard_step(k) for k in range(2)] == [2, 1]
    for t in (before, after):
        t.apply(grads, 1e-3)
    for k in range(2):
        assert torch.equal(before.flat_shard(k), after.flat_shard(k)), f"shard {k} differs after the next step"


def test_a_checkpoint_keeps_the_pending_pseudo_gradient_of_an_overlapped_round(tmp_path, tiny_base):
    """diloco with overlap: a round's pseudo-gradient is summed in the next round; a restart between the two
    sums it from the checkpoint (the same bits, samples, tokens, loss and examples), and one without any
    (round 0, a last round) restores none."""
    from node import checkpoint
    from node.manifest import load_manifest
    from node.trainer import Pending

    m = load_manifest(write_test_manifest(tmp_path / "swarm.toml", tiny_base,
                                          sync={"mode": "diloco", "inner_steps": 4, "overlap": True}))
    before, after = _trainer(m, tiny_base), _trainer(m, tiny_base)
    trained = range(before.adapter.num_shards)
    gen = torch.Generator().manual_seed(3)
    before.pending = Pending(5, {k: torch.randn(before.flat_shard(k).numel(), generator=gen) for k in trained},
                             samples=96, tokens=2345, loss_sum=123.456789, indices=(3, 1, 4, 1, 5))
    for name, expect in (("ckpt", before.pending), ("none", None)):
        if expect is None:
            before.pending = None
        checkpoint.save(tmp_path / name, round=6, opt_step=6, ledger_seq=5, swarm_id="s",
                        tensors=checkpoint.training_tensors(before, before.adapter, trained))
        after.pending = None
        checkpoint.restore_training(checkpoint.load_latest(tmp_path / name, "s"), after, after.adapter, trained)
        if expect is None:
            assert after.pending is None
            continue
        got = after.pending
        assert (got.round, got.samples, got.tokens, got.loss_sum, got.indices) == (5, 96, 2345, 123.456789, (3, 1, 4, 1, 5))
        assert all(torch.equal(got.delta[k], expect.delta[k]) for k in trained)


def test_the_space_checked_at_start_covers_what_a_diloco_overlap_checkpoint_holds_later(tmp_path, tiny_base):
    """At start a diloco node has no inner moments and no pending pseudo-gradient yet; the space it checks for
    counts both (`later_bytes`): a checkpoint after a real inner step and with a whole round pending fits."""
    from transformers import AutoTokenizer

    from node import checkpoint
    from node.data import load_examples, resolve_data
    from node.manifest import load_manifest
    from node.model import build_lora_model
    from node.trainer import Pending, Trainer

    m = load_manifest(write_test_manifest(tmp_path / "swarm.toml", tiny_base, rounds={"target_batch_size": 8},
                                          sync={"mode": "diloco", "inner_steps": 3, "overlap": True}))
    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    model, adapter = build_lora_model(m, tiny_base, device="cpu")
    trained = range(adapter.num_shards)
    t = Trainer(model, adapter, trained, m.optim, microbatch_size=4, device="cpu", pad_id=tok.pad_token_id, sync=m.sync)
    at_start = checkpoint.training_tensors(t, adapter, trained)
    later = checkpoint.later_bytes(m, adapter, trained, at_start)
    examples = load_examples(resolve_data("builtin:task"), tok, max_length=48)[:8]
    t.inner_step(t.local_gradients(examples), 1e-3)
    t.pending = Pending(1, {k: torch.ones(t.flat_shard(k).numel()) for k in trained}, samples=24, tokens=999,
                        loss_sum=1.0, indices=tuple(range(24)))
    checkpoint.save(tmp_path / "ckpt", round=2, opt_step=1, ledger_seq=1, swarm_id="s",
                    tensors=checkpoint.training_tensors(t, adapter, trained))
    (written,) = (tmp_path / "ckpt").glob("round-*.safetensors")
    assert checkpoint.size_of(at_start) + later >= written.stat().st_size > checkpoint.size_of(at_start) + later * 0.9
    assert checkpoint.space_needed(tmp_path / "none", at_start, later=later) == (checkpoint.KEEP + 1) * (
        checkpoint.size_of(at_start) + later)


def test_overlap_guesses_the_outer_step_the_outer_optimizer_takes(tmp_path, tiny_base):
    """An overlapped round starts its inner steps where the outer step of this node's own last pseudo-gradient
    would land: `outer_step_of` is the step `outer_apply` then takes, from the momentum as it is (none yet,
    then some), with Nesterov momentum and without."""
    from node.manifest import load_manifest

    for momentum in (0.5, 0.0):
        m = load_manifest(write_test_manifest(tmp_path / f"m{momentum}.toml", tiny_base, sync={
            "mode": "diloco", "inner_steps": 2, "overlap": True, "outer_lr": 0.7, "outer_momentum": momentum}))
        t = _trainer(m, tiny_base, sync=m.sync)
        gen = torch.Generator().manual_seed(4)
        for _ in range(3):  # the first step (no momentum yet), then with what the earlier ones left
            g = {k: torch.randn(t.flat_shard(k).numel(), generator=gen) * 1e-2 for k in range(t.adapter.num_shards)}
            start = {k: t.flat_shard(k) for k in g}
            guess = {k: t.outer_step_of(k, g[k]) for k in g}
            t.outer_apply(start, g)
            for k in g:
                taken = start[k] - t.flat_shard(k)
                assert torch.allclose(guess[k], taken, rtol=1e-4, atol=1e-7), (momentum, k)
                assert guess[k].norm() > 0.7 * g[k].norm() * 0.99
