"""The wire grid: exact sums whatever the order, the bits a sum needs, strict parts, error feedback.

Pure functions of node/swarm/exact.py and the reducer of node/swarm/averager.py, on real tensors.
"""

from __future__ import annotations

import asyncio
import random
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from node.swarm.averager import _ExactPartReducer
from node.swarm.exact import (
    BLOCK, E_MIN, GRIDS, MAX_GROUP, Layout, WireError, block_exponents, check_part, decode_sum, dequantize,
    EXP_SLACK, encode_sum, group_exponents, quantize, robust_sum, sum_bits, trim_count, trimmed_sum, wire_bytes_per_value,
)

SIZES = [512, 512, 3 * BLOCK + 17, 3, 1]


def _peers(n: int, seed: int, numel: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # magnitudes differ by peer and by tensor: the grid must follow the largest, per block
    return [torch.randn(numel, generator=g) * 10.0 ** float(torch.randint(-8, 4, (1,), generator=g)) for _ in range(n)]


def _exps(xs, layout, grid):
    return group_exponents([block_exponents(x, layout, grid).numpy().tobytes() for x in xs], layout)


def test_layout_blocks_follow_tensors():
    layout = Layout(SIZES)
    assert layout.numel == sum(SIZES)
    # a tensor never shares a block with another; big ones are cut every BLOCK values
    assert layout.num_blocks == 1 + 1 + 4 + 1 + 1
    covered = torch.zeros(layout.numel, dtype=torch.int64)
    for _, view in layout.blocks(covered):
        view += 1
    assert torch.equal(covered, torch.ones_like(covered))


@pytest.mark.parametrize("grid", GRIDS.values(), ids=list(GRIDS))
def test_exponents_are_the_least_that_fit(grid):
    layout = Layout(SIZES)
    x = _peers(1, 3, layout.numel)[0]
    x[:512] = 0  # an all-zero block
    e = block_exponents(x, layout, grid)
    assert int(e[0]) == E_MIN
    for b, blocks in layout.blocks(x):
        for i, row in enumerate(blocks):
            peak = float(row.abs().max().double())
            if peak == 0:
                continue
            exp = int(e[b + i])
            assert peak <= grid.q_max * 2.0**exp  # nothing is clipped ...
            assert peak > grid.q_max * 2.0 ** (exp - 1)  # ... and no grid is coarser than needed


@pytest.mark.parametrize("grid", GRIDS.values(), ids=list(GRIDS))
@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 12), seed=st.integers(0, 2**31))
def test_the_sum_is_exact_in_any_order_and_on_every_member(grid, n, seed):
    layout = Layout(SIZES)
    xs = _peers(n, seed, layout.numel)
    exps = _exps(xs, layout, grid)
    qs = [quantize(x, exps, layout, grid)[0] for x in xs]
    order = list(range(n))
    sums = []
    for _ in range(3):  # reducers add parts in whatever order they arrive
        random.Random(seed).shuffle(order)
        acc = torch.zeros(layout.numel, dtype=torch.int64)
        for i in order:
            acc += qs[i]
        sums.append(acc)
    assert all(torch.equal(s, sums[0]) for s in sums)
    # through the reducer's wire format, every member decodes the same integers, then the same floats
    wire = encode_sum(sums[0], grid, n, layout.numel)
    decoded = decode_sum(wire, grid, n, layout.numel)
    assert torch.equal(decoded.to(torch.int64), sums[0])
    a, b = dequantize(decoded, exps, layout), dequantize(decoded.clone(), exps.clone(), layout)
    assert a.numpy().tobytes() == b.numpy().tobytes()
    # and that float is the sum of what members' values were worth on the grid up to half a grid step per
    # member (a member far above the median is clipped to the grid: test_one_member_cannot_coarsen_the_grid)
    exact = sum(x.double().clamp(-grid.q_max * 2.0**_per_value(exps, layout), grid.q_max * 2.0**_per_value(exps, layout)) for x in xs)
    for bi, blocks in layout.blocks(a.double() - exact):
        half_steps = n * 0.5 * torch.ldexp(torch.ones(blocks.shape[0], 1, dtype=torch.float64),
                                           exps[bi : bi + blocks.shape[0]].view(-1, 1).long())
        # (dequantize rounds to float32 once more: a relative 2**-24 on top)
        assert bool((blocks.abs() <= half_steps + a.double().abs().max() * 2**-23).all())


def _per_value(exps, layout):
    out = torch.empty(layout.numel, dtype=torch.float64)
    for b, blocks in layout.blocks(out):
        blocks.copy_(exps[b : b + blocks.shape[0]].view(-1, 1).double().expand_as(blocks))
    return out


@pytest.mark.parametrize("grid", GRIDS.values(), ids=list(GRIDS))
def test_one_member_cannot_coarsen_the_grid(grid):
    """A member 10^6 times larger than the others: the grid stays within 8x of the median member's, so the
    honest members' values still count (they are not rounded away), and the large one is clipped to it."""
    layout = Layout(SIZES)
    g = torch.Generator().manual_seed(5)
    honest = [torch.randn(layout.numel, generator=g) for _ in range(3)]
    poison = torch.randn(layout.numel, generator=g) * 1e6
    fair = _exps(honest, layout, grid)
    exps = _exps([*honest, poison], layout, grid)
    assert int((exps.to(torch.int16) - fair.to(torch.int16)).max()) <= EXP_SLACK
    for x in honest:
        sent = quantize(x, exps, layout, grid)[1]
        assert float((sent - x).abs().max()) <= 0.5 * 2.0 ** int(exps.max())
        assert bool((sent != 0).any())
    q, sent = quantize(poison, exps, layout, grid)
    assert int(q.abs().max()) == grid.q_max and float(sent.abs().max()) < 1e6 / 100


def test_robust_sum_clips_a_part_far_above_the_median():
    parts = [torch.tensor([3, -4, 0], dtype=torch.int8), torch.tensor([6, 8, 0], dtype=torch.int8),
             torch.tensor([0, 0, 0], dtype=torch.int8), torch.tensor([120, -127, 127], dtype=torch.int8)]
    total, clipped = robust_sum(parts, clip=4.0)
    # norms 5, 10, 0 (left out of the median), 216.0: the lower median of the non-zero ones is 10, the bound 40
    assert list(clipped) == [3] and clipped[3] == pytest.approx(21.6, rel=1e-3)
    big = torch.round(parts[3].double() * (40 / parts[3].double().norm())).long()
    assert torch.equal(total, parts[0].long() + parts[1].long() + big)
    # clip 0: the plain exact sum
    total, clipped = robust_sum(parts, clip=0)
    assert not clipped and torch.equal(total, sum(p.long() for p in parts))
    # two senders: neither is the odd one out, whatever their norms (the plain exact sum)
    pair = [parts[0], parts[3]]
    total, clipped = robust_sum(pair, clip=4.0)
    assert not clipped and torch.equal(total, sum(p.long() for p in pair))
    # a sender of zeros beside them makes three: the big part is clipped to 4 x the lower median of 5 and 216
    total, clipped = robust_sum([parts[0], parts[2], parts[3]], clip=4.0)
    assert list(clipped) == [2] and clipped[2] == pytest.approx(216.0 / 5, rel=1e-3)


def test_trim_count_drops_at_least_one_of_three_and_always_keeps_one():
    assert [trim_count(0.1, n) for n in (1, 2, 3, 4, 9, 10, 19, 20, 256)] == [0, 0, 1, 1, 1, 1, 1, 2, 25]
    assert [trim_count(0.49, n) for n in (3, 4, 5, 6, 100)] == [1, 1, 2, 2, 49]
    assert trim_count(0.0, 10) == 0


def _trimmed_by_hand(parts, t):
    """The trimmed sum one value at a time, in exact fractions: the reference for the vectorised one."""
    n, kept = len(parts), len(parts) - 2 * t
    return [round(Fraction(sum(sorted(column)[t : n - t]) * n, kept)) for column in zip(*(p.tolist() for p in parts))]


@pytest.mark.parametrize("grid", GRIDS.values(), ids=list(GRIDS))
@pytest.mark.parametrize("n,trim", [(3, 0.1), (4, 0.25), (7, 0.3), (10, 0.1), (16, 0.3), (12, 0.45), (20, 0.45)])
def test_trimmed_sum_is_exact_and_does_not_depend_on_the_senders_order(grid, n, trim):
    g = torch.Generator().manual_seed(n)
    numel = 3001
    bound = min(grid.q_max, 1000)
    parts = [torch.randint(-bound, bound + 1, (numel,), generator=g).to(grid.dtype) for _ in range(n)]
    parts[0][:50] = grid.q_max  # ties and extremes: a whole column at the grid's edge, equal values
    parts[1][:50] = grid.q_max
    parts[-1][:50] = -grid.q_max
    t = trim_count(trim, n)  # 1, 1, 2, 1, 4, 5, 9: max and min dropped (t 1), or compare-exchange passes
    total, clipped = robust_sum(parts, clip=0, trim=trim)
    assert total.dtype == torch.int64 and not clipped
    assert total.tolist() == _trimmed_by_hand(parts, t)
    assert int(total.abs().max()) <= grid.q_max * n  # what the sum's wire holds for a group of n
    rng = random.Random(n)
    for _ in range(3):
        order = list(range(n))
        rng.shuffle(order)
        again, _ = robust_sum([parts[i] for i in order], clip=0, trim=trim)
        assert torch.equal(again, total)
    # the reducer sends it: encoded and decoded bit for bit
    assert torch.equal(decode_sum(encode_sum(total, grid, n, numel), grid, n, numel).long(), total)


def test_trimmed_sum_scales_the_kept_values_to_n_senders_and_rounds_halves_to_even():
    def trimmed(columns, t=1):
        return trimmed_sum(torch.tensor(columns, dtype=torch.int32).t().contiguous(), t).tolist()

    # n 4, kept 2: the middle two times 4/2, exact (the 100 and -100 are each column's extremes)
    assert trimmed([[1, 2, 3, 4], [-1, -2, -3, -4], [0, 100, -100, 0]]) == [10, -10, 0]
    # n 5, kept 3: the middle three sum to 2 (the 5 and -5 trimmed); 2 * 5 / 3 = 3.33 -> 3
    assert trimmed([[1, 1, 0, 5, -5], [-1, -1, 0, -5, 5]]) == [3, -3]
    # n 6, kept 4: 1 * 6 / 4 = 1.5 -> 2; n 10, kept 8: 2 * 10 / 8 = 2.5 -> 2 (halves to even, either sign)
    assert trimmed([[1, 0, 0, 9, -9, 0], [-1, 0, 0, 9, -9, 0]]) == [2, -2]
    assert trimmed([[2] + [0] * 7 + [9, -9], [-2] + [0] * 7 + [9, -9]]) == [2, -2]
    # t 2 of n 7 (compare-exchange passes): the middle three 0 + 1 + 2 = 3, times 7/3
    assert trimmed([[-50, 40, 2, 0, 1, 60, -70]], t=2) == [7]


@pytest.mark.parametrize("grid", GRIDS.values(), ids=list(GRIDS))
def test_a_huge_outlier_changes_the_trimmed_sum_only_through_the_values_it_displaces(grid):
    """A poisoner 10^6 times the honest values (already at the grid's edge after quantisation): per value it
    is the largest or smallest, so it is trimmed; the result is what the honest senders' values alone give
    once the poisoner's slot takes the honest extreme it pushed in. No result moves by more than the spread
    of the honest values, whatever the poisoner's size; with the plain sum it moves by q_max."""
    g = torch.Generator().manual_seed(11)
    numel, n_honest = 20000, 7
    honest = [torch.randint(-20, 21, (numel,), generator=g).to(grid.dtype) for _ in range(n_honest)]
    poison = (torch.randint(0, 2, (numel,), generator=g) * 2 - 1).to(grid.dtype) * grid.q_max
    parts = [*honest, poison]
    t = trim_count(0.1, len(parts))
    assert t == 1
    total, _ = robust_sum(parts, clip=0, trim=0.1)
    # the trimmed result of n senders lies within n times the honest range at every value
    stacked = torch.stack([h.long() for h in honest])
    lo, hi = stacked.min(dim=0).values * len(parts), stacked.max(dim=0).values * len(parts)
    assert bool(((total >= lo) & (total <= hi)).all())
    # exactly: the poisoner, always beyond every honest value, drops out; one honest value at the other end does
    high = poison.long() > 0
    by_hand = torch.where(high, stacked.sum(0) - stacked.min(0).values, stacked.sum(0) - stacked.max(0).values)
    kept = len(parts) - 2 * t
    assert total.tolist() == [round(Fraction(s * len(parts), kept)) for s in by_hand.tolist()]
    # the plain (clip-only, clip off) sum carries the poisoner's q_max at every value
    plain, _ = robust_sum(parts, clip=0)
    assert int((plain - stacked.sum(0)).abs().min()) == grid.q_max


def test_trimmed_sum_with_clipping_first_and_a_pair_falls_back_to_the_plain_sum():
    parts = [torch.tensor([3, -4, 0], dtype=torch.int8), torch.tensor([120, -127, 127], dtype=torch.int8)]
    plain, _ = robust_sum(parts, clip=0)
    total, _ = robust_sum(parts, clip=0, trim=0.4)  # two senders have no middle: the plain sum
    assert torch.equal(total, plain)
    # three senders: clipping first (the big part scaled to 4 x the median norm), then the trim
    parts = [torch.tensor([3, -4, 0], dtype=torch.int8), torch.tensor([6, 8, 0], dtype=torch.int8),
             torch.tensor([120, -127, 127], dtype=torch.int8)]
    total, clipped = robust_sum(parts, clip=4.0, trim=0.1)
    assert list(clipped) == [2]
    big = torch.round(parts[2].double() * (4 * 10 / parts[2].double().norm())).long()  # median norm 10
    stacked = torch.stack([parts[0].long(), parts[1].long(), big])
    assert torch.equal(total, stacked.median(dim=0).values * 3)  # 3 senders, 1 off each end: 3 x the median


def test_the_reducer_takes_the_trim():
    a = torch.tensor([1, -1, 5, 0], dtype=torch.int8)
    b = torch.tensor([2, -2, -6, 1], dtype=torch.int8)
    c = torch.tensor([127, -127, 127, -127], dtype=torch.int8)

    async def main():
        reducer = _ExactPartReducer([torch.Size([4])], num_senders=3, clip=0.0, trim=0.1)
        tasks = [asyncio.create_task(reducer.accumulate_part(i, 0, t)) for i, t in enumerate((a, b, c))]
        return (await asyncio.gather(*tasks))[0]

    assert asyncio.run(main()).tolist() == [6, -6, 15, 0]  # 3 x the median of each value


@pytest.mark.parametrize("grid", GRIDS.values(), ids=list(GRIDS))
def test_the_sum_wire_holds_every_group_size_up_to_the_cap(grid):
    numel = 1000
    for group in list(range(1, 40)) + [63, 64, 65, 127, 128, 129, 255, MAX_GROUP]:
        extreme = torch.tensor([grid.q_max * group, -grid.q_max * group, 0, 1, -1] * (numel // 5), dtype=torch.int64)
        extreme = extreme[torch.randperm(numel, generator=torch.Generator().manual_seed(group))]
        back = decode_sum(encode_sum(extreme, grid, group, numel), grid, group, numel)
        assert torch.equal(back.to(torch.int64), extreme), group
    # int8: the sum of a pair needs 9 bits, of 3-4 peers 10, up to 16 for MAX_GROUP; int32 always 32
    if grid.name == "int8":
        assert [sum_bits(grid, n) for n in (1, 2, 3, 4, 8, 16, 64, 256)] == [8, 9, 10, 10, 12, 12, 16, 16]
        assert wire_bytes_per_value(grid, 2) == pytest.approx(0.5 * (1 + 9 / 8))
    else:
        assert sum_bits(grid, MAX_GROUP) == 32


def test_a_sum_for_another_part_or_corrupted_bytes_is_refused():
    grid = GRIDS["int8"]
    total = torch.arange(-20, 20, dtype=torch.int64)
    wire = encode_sum(total, grid, 3, 40)
    with pytest.raises(WireError):
        decode_sum(wire, grid, 4, 40)  # another group size
    with pytest.raises(WireError):
        decode_sum(wire, grid, 3, 41)  # another part
    with pytest.raises(WireError):
        decode_sum(wire[:-1], grid, 3, 40)  # truncated
    with pytest.raises(WireError):
        decode_sum(b"\x01", grid, 3, 40)
    # a value no group of 3 can add up to (127 * 3 = 381 is the most)
    bad = bytearray(wire)
    bad[8] = 255  # low byte of the first value
    bad[8 + 40] = 0xFF  # its high bits: offset value 1023
    with pytest.raises(WireError):
        decode_sum(bytes(bad), grid, 3, 40)
    assert decode_sum(encode_sum(None, grid, 3, 40), grid, 3, 40) is None  # INCOMPLETE


def test_a_part_off_the_grid_is_refused():
    grid = GRIDS["int8"]
    check_part(torch.tensor([127, -127, 0], dtype=torch.int8), grid, 3)
    for bad, numel in [(torch.tensor([-128, 0, 0], dtype=torch.int8), 3), (torch.zeros(3, dtype=torch.int32), 3),
                       (torch.zeros(4, dtype=torch.int8), 3)]:
        with pytest.raises(WireError):
            check_part(bad, grid, numel)
    g32 = GRIDS["int32"]
    with pytest.raises(WireError):
        check_part(torch.tensor([g32.q_max + 1], dtype=torch.int32), g32, 1)


def test_malformed_exponents_are_refused():
    layout = Layout([100, 100])
    with pytest.raises(WireError):
        group_exponents([b"\x00"], layout)
    with pytest.raises(WireError):
        group_exponents(["xx"], layout)
    with pytest.raises(WireError):
        group_exponents([bytes([0, 120])], layout)  # out of range
    with pytest.raises(WireError):
        group_exponents([], layout)


def test_error_feedback_loses_nothing_over_rounds():
    """The residual carries what the int8 grid dropped: the sum of everything applied tracks the sum of
    everything meant within one grid step, however many rounds pass."""
    grid, layout = GRIDS["int8"], Layout([4096, 300])
    g = torch.Generator().manual_seed(7)
    residual = torch.zeros(layout.numel)
    meant = torch.zeros(layout.numel, dtype=torch.float64)
    applied = torch.zeros(layout.numel, dtype=torch.float64)
    for _ in range(200):
        grad = torch.randn(layout.numel, generator=g) * torch.rand(layout.numel, generator=g) ** 4  # heavy-tailed
        x = grad + residual
        exps = _exps([x], layout, grid)
        q, sent = quantize(x, exps, layout, grid)
        residual = x - sent
        meant += grad.double()
        applied += dequantize(q.to(torch.int32), exps, layout).double()
    assert torch.allclose(meant - applied, residual.double(), atol=1e-5)
    assert float(residual.abs().max()) <= 0.5 * 2.0 ** int(exps.max()) + 1e-6
    # without feedback, small values below half a grid step would be lost every round
    assert float((meant - applied).abs().max()) < 0.05 * float(meant.abs().max())


def _reduce(parts, failed=()):
    async def main():
        reducer = _ExactPartReducer([torch.Size([len(parts[0])])], num_senders=len(parts))
        for i in failed:
            reducer.on_sender_failed(i)
        tasks = [asyncio.create_task(reducer.accumulate_part(i, 0, t)) for i, t in enumerate(parts) if i not in failed]
        return (await asyncio.gather(*tasks))[0]

    return asyncio.run(main())


def test_the_reducer_sums_exactly():
    a = torch.tensor([127, -127, 5, 0], dtype=torch.int8)
    b = torch.tensor([127, -127, -6, 1], dtype=torch.int8)
    assert torch.equal(_reduce([a, b, a]), a.long() * 2 + b.long())


def test_a_part_missing_a_sender_comes_back_incomplete_not_summed():
    a = torch.tensor([1, 2, 3], dtype=torch.int8)
    # hivemind's reducer would return the mean of what arrived (with two peers: one peer's own part);
    # this one returns nothing to apply, to every sender alike
    assert _reduce([a, a, a], failed=(1,)) is None


def test_powers_of_two_are_built_exactly_across_the_grids_range():
    """The codec's 2**e comes from its bits (the same on a GPU, whose pow may differ from the CPU's): equal to
    ldexp on the CPU over every exponent a grid uses, and block exponents stay exact for blocks from subnormal
    to huge values."""
    from node.swarm.exact import E_MAX, E_MIN, _pow2

    e = torch.arange(2 * E_MIN, 2 * E_MAX + 1)
    assert torch.equal(_pow2(e.clamp(-126, 127), torch.float32), torch.ldexp(torch.ones(len(e)), e.clamp(-126, 127)))
    assert torch.equal(_pow2(e, torch.float64), torch.ldexp(torch.ones(len(e), dtype=torch.float64), e.double()))
    x = torch.cat([torch.full((16,), v) for v in (1e-44, 3e-39, 1e-20, 1.0, 1e20, 1e30)])
    for grid in GRIDS.values():
        exps = block_exponents(x, Layout([96], block=16), grid).long()
        peaks = x.view(6, 16).abs().amax(dim=1).double()
        bound = grid.q_max * torch.pow(torch.tensor(2.0, dtype=torch.float64), exps.double())
        ok = (peaks <= bound) & (peaks > bound / 2)
        assert bool(ok[(exps > E_MIN) & (exps < E_MAX)].all()) and int((exps > E_MIN).sum()) >= 4, (grid.name, exps)


def test_the_grad_commitment_fixes_the_grid_and_the_parts():
    from node.trainer import grad_commitment

    exps, part = torch.tensor([3, -2], dtype=torch.int8), torch.tensor([1, -5, 0, 7], dtype=torch.int8)
    base = grad_commitment({0: (exps, part)})
    assert base == grad_commitment({0: (exps.clone(), part.clone())})
    assert base != grad_commitment({0: (exps + 1, part)})  # the same integers on another grid: other values sent
    assert base != grad_commitment({0: (exps, part.to(torch.int32))})  # another wire grid
    assert base != grad_commitment({1: (exps, part)})
    assert base != grad_commitment({0: (exps, part), 1: (exps, part)})
