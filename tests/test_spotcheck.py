"""Spot-check evidence on the tiny Llama (real PEFT model, CPU): a microbatch recomputed alone gives the
bit-identical sketch its trainer announced; an honest part on the group's grid passes, zeros, noise and
faked sketches fail; the checker's span of a part is judged on the blocks inside it."""

from __future__ import annotations

import pytest
import torch

from node import spotcheck
from node.manifest import OptimSection
from node.swarm.exact import GRIDS, Layout, block_exponents, quantize
from node.swarm.outcome import RoundClaim, Summed
from protocol.receipt import check_unit
from tests.conftest import write_test_manifest


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_base):
    from transformers import AutoTokenizer

    from node.data import load_examples, resolve_data
    from node.manifest import load_manifest
    from node.model import build_lora_model
    from node.trainer import Trainer

    torch.set_num_threads(1)
    path = write_test_manifest(tmp_path_factory.mktemp("sc") / "swarm.toml", tiny_base)
    m = load_manifest(path)
    model, adapter = build_lora_model(m, tiny_base, device="cpu")
    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    examples = load_examples(resolve_data(m.data.source), tok, max_length=m.data.max_length, packing=m.data.packing)
    trainer = Trainer(model, adapter, range(adapter.num_shards), OptimSection(lr=1e-2), microbatch_size=4, device="cpu",
                      pad_id=tok.pad_token_id)
    sketch = spotcheck.Sketch(m.swarm_id, {k: adapter.shard_numel(k) for k in trainer.trained})
    return trainer, examples[:12], sketch, adapter


def _summed(x: torch.Tensor, grid: str = "int32"):
    """x on a one-member group's grid: (its integer part, a Summed to read it back with)."""
    layout = Layout([x.numel()])
    exps = block_exponents(x, layout, GRIDS[grid])
    q, sent = quantize(x, exps, layout, GRIDS[grid])
    return q, Summed(total=q.to(torch.int32), exps=exps, sent=sent, part=q, claims={}, layout=layout)


def test_a_microbatch_recomputed_alone_has_the_announced_sketch_bit_for_bit(setup):
    trainer, examples, sketch, _ = setup
    local = trainer.local_gradients(examples, sketch)
    assert all(s.shape == (3, spotcheck.BLOCKS) for s in local.sketches.values())
    for unit in range(3):
        alone = trainer.local_gradients(examples[unit * 4 : (unit + 1) * 4], sketch)
        for k in trainer.trained:
            assert torch.equal(alone.sketches[k][0], local.sketches[k][unit])
    # the microbatches' sketches add up to the sketch of the whole gradient (a projection is linear)
    k = trainer.trained[0]
    whole = sketch.project(k, local.grad_sums[k])
    assert torch.allclose(local.sketches[k].sum(0), whole, rtol=1e-4, atol=1e-6 * float(whole.abs().max()))


def test_honest_parts_pass_and_junk_or_faked_sketches_fail(setup):
    trainer, examples, sketch, adapter = setup
    total, k = 24, trainer.trained[0]
    local = trainer.local_gradients(examples, sketch)
    contribution = local.grad_sums[k] / total
    announced = local.sketches[k].reshape(-1)  # as a claim carries them
    unit = check_unit("ab" * 32, "target", 3)
    recomputed = trainer.local_gradients(examples[unit * 4 : (unit + 1) * 4], sketch).sketches[k][0]
    n = contribution.numel()

    def judge(x, offset=0, length=None, claimed=announced, grid="int32"):
        q, summed = _summed(x, grid)
        length = n - offset if length is None else length
        return spotcheck.verdict(q[offset : offset + length], offset, summed, recomputed, claimed, unit, sketch,
                                 shard=k, target="target", total=total)

    honest = judge(contribution + 0.01 * torch.randn(n) * float(contribution.std()))  # with a residual
    assert not honest.failed and honest.exact and honest.unit_error == 0.0 and honest.part_error < 0.05, honest
    assert judge(contribution, grid="int8").part_error < 0.05
    for offset, length in ((0, n // 2), (n // 3, n // 3), (n // 2, n - n // 2)):  # a reducer's span
        assert not judge(contribution, offset, length).failed
    zeros = judge(torch.zeros(n))
    assert zeros.failed and abs(zeros.part_error - 1.0) < 1e-6, zeros
    noise = torch.randn(n)
    noise = judge(noise * (float(contribution.norm()) / float(noise.norm())))
    assert noise.failed and noise.part_error > 1.0, noise
    # a member that skipped the work and announced sketches consistent with zeros: the drawn microbatch fails
    faked = judge(torch.zeros(n), claimed=torch.zeros_like(announced))
    assert faked.failed and faked.unit_error == 1.0 and faked.part_error == 0.0, faked
    # or kept its real sketches for all but the drawn one
    other = announced.clone().view(3, -1)
    other[unit] = other[(unit + 1) % 3]
    assert judge(contribution, claimed=other.reshape(-1)).failed
    # no sketches at all
    assert judge(contribution, claimed=torch.zeros(0)).error == float("inf")


def test_sketches_cross_the_wire_in_the_claim(setup):
    trainer, examples, sketch, _ = setup
    local = trainer.local_gradients(examples[:8], sketch)
    claim = RoundClaim(round=3, hashes={0: "h"}, samples=8, tokens=local.tokens, loss_sum=local.loss_sum,
                       indices=tuple(range(8)), sketches=local.sketches)
    back = RoundClaim.from_wire(claim.to_wire())
    assert back == claim and all(torch.equal(back.sketches[k], local.sketches[k].reshape(-1)) for k in local.sketches)
    wire = claim.to_wire()
    wire["k"] = {"0": b"abc"}
    with pytest.raises(ValueError):
        RoundClaim.from_wire(wire)
