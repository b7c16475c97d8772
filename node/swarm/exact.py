"""Exact sums on float32 wires: the fixed-point grid and the limb codec (no hivemind here).

hivemind's reducer sums parts in a float32 accumulator and hands every peer
`local + (average - local)`, which is not bit-identical across peers for arbitrary floats.
Peers therefore contribute fixed-point integers (a gradient scaled by 2**bits, `to_fixed_point`),
split into four 10-bit limbs; each limb travels as the float32 `limb * 64 + 1`. Sums of up to
`MAX_GROUP` peers stay below 2**21, where float32 is exact in any order, and the rounding of
`average` stays far below 1/group_size, so `round(average * group_size)` recovers the exact
integer sum on every peer: same inputs, same bits out, whatever the reduction order. The `+ 1`
counts contributors: its sum's low 6 bits must equal the group size.
"""

from __future__ import annotations

import torch

LIMB_BITS = 10
NUM_LIMBS = 4
COUNT_BITS = 6  # low bits of each transmitted limb count the peers that contributed
# a peer's integers must satisfy |x| < MAX_PEER_INT (offset binary in four 10-bit limbs)
MAX_PEER_INT = 2 ** (LIMB_BITS * NUM_LIMBS - 1)
MAX_GROUP = 32  # keeps limb sums < 2**21 and the recovery error < 0.5
BYTES_PER_VALUE = 4 * NUM_LIMBS  # on the wire: NUM_LIMBS float32 per gradient value


def to_fixed_point(grad_sum: torch.Tensor, *, bits: int, norm: int, limit: int = MAX_PEER_INT) -> tuple[torch.Tensor, int]:
    """round(grad_sum / norm * 2**bits) as int64, clipped to |x| < limit; returns (ints, n_clipped)."""
    scaled = torch.round(grad_sum.double() / norm * (2.0**bits))
    clipped = int((scaled.abs() >= limit).sum())
    return scaled.clamp_(-(limit - 1), limit - 1).to(torch.int64), clipped


def from_fixed_point(total: torch.Tensor, *, bits: int, norm: int, tokens: int) -> torch.Tensor:
    """The averaged gradient (per trained token) from the group's exact integer sum."""
    return (total.double() * (norm / (2.0**bits)) / max(tokens, 1)).float()


def encode_limbs(x: torch.Tensor) -> torch.Tensor:
    """int64 vector (|x| < MAX_PEER_INT) -> float32 vector of NUM_LIMBS * len(x) exact small integers."""
    if x.numel() and int(x.abs().max()) >= MAX_PEER_INT:
        raise ValueError("fixed-point value out of range; lower [averaging] fixed_point_bits")
    u = x.to(torch.int64) + MAX_PEER_INT
    mask = (1 << LIMB_BITS) - 1
    limbs = [(((u >> (LIMB_BITS * j)) & mask) << COUNT_BITS) + 1 for j in range(NUM_LIMBS)]
    return torch.cat(limbs).to(torch.float32)


def decode_limb_average(avg: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """The group's average of encoded vectors -> (exact int64 sum of the integers, #values short of contributors)."""
    sums = torch.round(avg.to(torch.float64) * group_size).to(torch.int64)
    short = int(((sums & ((1 << COUNT_BITS) - 1)) != group_size).sum())
    parts = (sums >> COUNT_BITS).view(NUM_LIMBS, -1)
    total = sum(parts[j] << (LIMB_BITS * j) for j in range(NUM_LIMBS))
    return total - group_size * MAX_PEER_INT, short
