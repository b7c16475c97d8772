"""Exact sums on integer wires: the group's shared grid and the sum's wire format (pure torch/numpy).

Each peer contributes a float32 vector x: its gradient (or DiLoCo pseudo-gradient) plus what it could not
send last time (error feedback, kept by node.rounds). The vector is cut into blocks (a LoRA tensor, or
`BLOCK` values of a larger one). Per block, each peer says which power of two its values need
(`block_exponents`, sent with the round metadata); the group takes the largest (`group_exponents`), so
every member puts the block on the same grid and nothing is clipped:

    q = round(x / 2**e),  |q| <= grid.q_max        (quantize)
    S = sum of every member's q                     (integers: exact in any order, on every reducer)
    update = S * 2**e                               (dequantize: the same float on every peer)

The grid (`[sync] wire`) sets the bytes: `int8` sends one byte per value and gets the sum back in
`sum_bits(N)` = 9..16 bits; `int32` sends and gets four bytes (q < 2**23, so the sum of up to MAX_GROUP
peers fits 32 bits). What a peer could not send, x - q * 2**e, stays with it and joins its next
contribution, so nothing is lost over time. `encode_sum`/`decode_sum` are the reducer's reply format:
a header (status, group size, count) and the bits the sum needs.

The reducer's sum is robust (`robust_sum`): a part far above the median norm is scaled down first
(`[sync] clip`), and with `[sync] robust = "trimmed"` each value of the sum drops the senders' most extreme
values at both ends (a trimmed mean, scaled back to a sum of n), all in integers. `ReducerView` is what a
member keeps of a completed sum besides the sum (the group, the sum's hash, the parts it must spot-check).

Every function here gives the same bits on the CPU and on a GPU (powers of two, round, clamp, integer adds):
the node runs the codec where its contribution lives (node/swarm/averager.py: ShardAverager.put_parts).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
import torch

BLOCK = 4096  # values per grid block (a tensor smaller than this is one block)
MAX_GROUP = 256  # peers whose sum the wire formats below hold exactly
EXP_SLACK = 3  # a block's grid is at most 2**3 = 8x coarser than its median member needs
E_MIN, E_MAX = -100, 100  # block exponents; 2**-100 and 2**100 are normal float32 numbers


@dataclass(frozen=True)
class Grid:
    name: str
    q_max: int  # |q| <= q_max
    dtype: torch.dtype  # what a peer sends
    wire_dtype: str  # hivemind's name for it on the wire


GRIDS = {
    "int8": Grid("int8", 127, torch.int8, "int8"),
    "int32": Grid("int32", (1 << 31) // MAX_GROUP - 1, torch.int32, "int32"),
}


class WireError(ValueError):
    """Bytes from a peer that are not a valid part or sum."""


class Layout:
    """How a shard's flat vector is cut into blocks: each tensor on its own, in runs of `block` values."""

    def __init__(self, sizes, block: int = BLOCK):
        self.sizes = tuple(int(s) for s in sizes)
        self.numel = sum(self.sizes)
        runs, offset = [], 0  # (offset, number of blocks, block length)
        for size in self.sizes:
            full, rest = divmod(size, block)
            if full:
                runs.append((offset, full, block))
            if rest:
                runs.append((offset + full * block, 1, rest))
            offset += size
        self.runs = tuple(runs)
        self.num_blocks = sum(count for _, count, _ in runs)

    def blocks(self, vec: torch.Tensor):
        """(first block index, a (count, length) view of those blocks of `vec`) per run of equal blocks."""
        b = 0
        for offset, count, length in self.runs:
            yield b, vec[offset : offset + count * length].view(count, length)
            b += count


def block_exponents(x: torch.Tensor, layout: Layout, grid: Grid) -> torch.Tensor:
    """Per block, the least e with max|x| <= q_max * 2**e (int8 tensor, E_MIN for an all-zero block)."""
    if x.numel() != layout.numel:
        raise ValueError(f"vector of {x.numel()} values for a layout of {layout.numel}")
    peaks = torch.empty(layout.num_blocks, dtype=torch.float64, device=x.device)
    for b, blocks in layout.blocks(x):
        peaks[b : b + blocks.shape[0]] = blocks.abs().amax(dim=1).double()
    if not torch.isfinite(peaks).all():
        raise FloatingPointError("non-finite value in a contribution; lower [optim] lr")
    mantissa, exp = torch.frexp(peaks / grid.q_max)  # peak/q_max = mantissa * 2**exp, mantissa in [0.5, 1)
    e = exp.to(torch.int64) - (mantissa == 0.5).to(torch.int64)  # ceil(log2) of that quotient
    # the quotient was rounded; settle it exactly: peak <= q_max * 2**e (both sides exact in float64)
    e += (peaks > grid.q_max * _pow2(e, torch.float64)).to(torch.int64)
    e = torch.where(peaks == 0, torch.full_like(e, E_MIN), e)
    if int(e.max()) > E_MAX:
        raise FloatingPointError("a contribution too large for the wire grid; lower [optim] lr")
    return e.clamp_(E_MIN, E_MAX).to(torch.int8).cpu()  # sent with the round metadata: bytes, on the CPU


def group_exponents(per_peer: list, layout: Layout) -> torch.Tensor:
    """The group's grid, per block (the same on every member): the largest exponent any member needs, but
    at most EXP_SLACK above the median of the members that have anything in the block. One member cannot
    coarsen the grid until everyone else's values round to zero: its own values beyond the grid are clipped
    to it (an honest node keeps that remainder as error feedback). Raises WireError for malformed exponents."""
    if not per_peer:
        raise WireError("no block exponents")
    rows = []
    for raw in per_peer:
        if not isinstance(raw, (bytes, bytearray)) or len(raw) != layout.num_blocks:
            size = len(raw) if isinstance(raw, (bytes, bytearray)) else type(raw).__name__
            raise WireError(f"block exponents of {size} bytes for {layout.num_blocks} blocks")
        e = torch.frombuffer(bytearray(raw), dtype=torch.int8)
        if layout.num_blocks and (int(e.min()) < E_MIN or int(e.max()) > E_MAX):
            raise WireError("block exponent out of range")
        rows.append(e.to(torch.int16))
    stacked = torch.stack(rows)  # (members, blocks)
    top = stacked.max(dim=0).values
    if len(rows) < 2:
        return top.to(torch.int8)
    # the lower median over members with a non-zero block: E_MIN (all zeros) sorts first and is skipped
    present = (stacked > E_MIN).sum(dim=0)
    ordered = stacked.sort(dim=0).values
    idx = (len(rows) - present + (present - 1).clamp(min=0) // 2).clamp(max=len(rows) - 1)
    median = ordered.gather(0, idx.view(1, -1)).view(-1)
    capped = torch.where(present > 0, torch.minimum(top, median + EXP_SLACK), top)
    return capped.clamp(E_MIN, E_MAX).to(torch.int8)


def trim_count(trim: float, n: int) -> int:
    """Senders dropped at each end of each coordinate by a trimmed sum of `n` senders: floor(trim * n), but at
    least 1 once n >= 3 (else a 10% trim would drop nobody below 10 senders; 3 senders keep the median), and
    never so many that nobody is kept. 0 when trim is 0 or n < 3: two values have no middle."""
    if trim <= 0 or n < 3:
        return 0
    return min(max(1, math.floor(trim * n)), (n - 1) // 2)


def _clip_bound(parts: list[torch.Tensor], clip: float) -> tuple[list[float], float, float]:
    """Each part's L2 norm, the lower median of the non-zero ones, and the norm a part is clipped to: none below
    3 senders. Of two, neither is the odd one out: the lower median is the smaller, so an honest pair's halves
    were clipped whenever one had 4x the other's norm (in 10 and 11 of 60 rounds on the two reducers of a 2-node
    per-step swarm on the built-in task, ratios 4.6-9.6). Counted by senders, not by non-zero parts, so a
    sender of zeros cannot switch clipping off for a poisoner beside one honest peer."""
    norms = [float(p.to(torch.float64).norm()) for p in parts]
    nonzero = sorted(n for n in norms if n > 0)
    median = nonzero[(len(nonzero) - 1) // 2] if nonzero else 0.0
    return norms, median, clip * median if clip > 0 and len(parts) >= 3 and nonzero else float("inf")


def _row_sum(rows: torch.Tensor) -> torch.Tensor:
    """The int32 sum of a (senders x values) int32 tensor's rows, added one row at a time (summing along
    dim 0 in one call is ~8x slower on CPU). Exact: at most MAX_GROUP values within q_max each fit int32."""
    total = rows[0].clone()
    for row in rows[1:]:
        total += row
    return total


def trimmed_sum(stacked: torch.Tensor, t: int) -> torch.Tensor:
    """Per value (column) of `stacked` (senders x values, int32 within the grid, at most MAX_GROUP senders;
    rows reordered in place): the `t` lowest and `t` highest senders' values dropped, the rest summed exactly
    and scaled back to all n senders, round(kept_sum * n / kept), halves to even, as int64. The result is the
    trimmed mean times n, so whoever divides the sum by the group's samples is unchanged, and it stays in
    the sum's wire range (|result| <= n * q_max). It depends only on each column's multiset of values: the
    senders' order does not change a bit.

    Vectorised over the values, never sorted (torch.sort along a short sender dim costs ~10x the plain
    sum): t = 1 drops each column's max and min; a larger t settles the t largest in the last rows and the
    t smallest in the first with t passes up and t down of compare-exchanges between adjacent rows
    (elementwise min/max)."""
    n = stacked.shape[0]
    if t <= 0:
        return _row_sum(stacked).to(torch.int64)
    if t == 1:
        total = _row_sum(stacked).sub_(stacked.amax(dim=0)).sub_(stacked.amin(dim=0))
    else:
        low = torch.empty_like(stacked[0])
        for p in range(t):
            for i in range(p, n - 1 - p):  # the largest left moves down to row n-1-p
                a, b = stacked[i], stacked[i + 1]
                torch.minimum(a, b, out=low), torch.maximum(a, b, out=b), a.copy_(low)
            for i in range(n - 2 - p, p, -1):  # the smallest left moves up to row p
                a, b = stacked[i - 1], stacked[i]
                torch.minimum(a, b, out=low), torch.maximum(a, b, out=b), a.copy_(low)
        total = _row_sum(stacked[t : n - t])
    # kept_sum * n < 2**39 is exact in float64 and the division is correctly rounded; the true quotient is a
    # half-integer exactly (then represented exactly) or at least 1/(2 * kept) from one, far above float64's
    # rounding error at |quotient| <= 2**31: round() sees the exact quotient's side of every half
    return torch.round(total.to(torch.float64).mul_(n).div_(n - 2 * t)).to(torch.int64)


def robust_sum(parts: list[torch.Tensor], clip: float, trim: float = 0.0) -> tuple[torch.Tensor, dict[int, float]]:
    """The exact int64 sum of the senders' integer parts, each first scaled down (rounded to the grid) to at
    most `clip` times the median L2 norm of the non-zero parts when there are 3 or more senders (clip 0: none); with `trim` > 0 and at
    least 3 senders, per value a trimmed sum (`trimmed_sum`, trim_count(trim, n) senders off each end)
    instead of the plain one. Returns the sum and {sender position: its norm / the median} for every part
    that was clipped. One reducer computes it and sends every member the same sum, so members stay
    bit-identical whatever rounding happens here; after the clip everything is integer arithmetic."""
    if not parts:
        return torch.zeros(0, dtype=torch.int64), {}
    norms, median, bound = _clip_bound(parts, clip)
    t = trim_count(trim, len(parts))
    out = torch.empty((len(parts), parts[0].numel()), dtype=torch.int32) if t else None
    total = None if t else torch.zeros(parts[0].numel(), dtype=torch.int64)
    clipped: dict[int, float] = {}
    for i, (part, norm) in enumerate(zip(parts, norms)):
        if norm > bound:
            clipped[i] = norm / median
            part = torch.round(part.to(torch.float64) * (bound / norm))  # |q| only shrinks
        if t:
            out[i].copy_(part)  # |q| <= q_max < 2**23: exact in int32
        else:
            total += part.to(torch.int64)
    return (trimmed_sum(out, t) if t else total), clipped


def _pow2(e: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """2**e exactly, as float32 or float64 (e: integers within the dtype's normal exponents), built from its
    bits: the same on every device, where ldexp computes x * pow(2, e) with the device's own pow."""
    if dtype == torch.float64:
        return ((e.to(torch.int64) + 1023) << 52).view(torch.float64)
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32)


def _scales(exps: torch.Tensor, b: int, count: int, sign: int) -> torch.Tensor:
    """2**(sign * e) for blocks b .. b+count, as a (count, 1) float32 column on exps' device (int32 exps)."""
    return _pow2(sign * exps[b : b + count].view(count, 1), torch.float32)


def quantize(x: torch.Tensor, exps: torch.Tensor, layout: Layout, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """(q on the group's grid, q * 2**e as float32): what a peer sends, and what that is worth (its
    residual is x minus the second)."""
    q = torch.empty(layout.numel, dtype=grid.dtype, device=x.device)
    sent = torch.empty(layout.numel, dtype=torch.float32, device=x.device)
    exps = exps.to(device=x.device, dtype=torch.int32)  # the grid works where x lives (CPU or GPU, the same bits)
    for (b, blocks), (_, q_blocks), (_, sent_blocks) in zip(layout.blocks(x), layout.blocks(q), layout.blocks(sent)):
        count = blocks.shape[0]
        torch.mul(blocks, _scales(exps, b, count, -1), out=sent_blocks)  # exact: a power of two
        sent_blocks.round_().clamp_(-grid.q_max, grid.q_max)
        q_blocks.copy_(sent_blocks)
        sent_blocks.mul_(_scales(exps, b, count, 1))
    return q, sent


def dequantize(total: torch.Tensor, exps: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The group's sum as float32: S * 2**e per block (the same bits on every peer)."""
    out = total.to(torch.float32)
    exps = exps.to(device=out.device, dtype=torch.int32)
    for b, blocks in layout.blocks(out):
        blocks.mul_(_scales(exps, b, blocks.shape[0], 1))
    return out


def check_part(part: torch.Tensor, grid: Grid, numel: int) -> None:
    """A part a sender sent: the grid's dtype, the expected size, every value within q_max."""
    if part.dtype != grid.dtype or part.numel() != numel:
        raise WireError(f"part of {part.numel()} {part.dtype} values, expected {numel} {grid.dtype}")
    if numel and int(part.abs().max()) > grid.q_max:  # |int8 -128| is 128 (int8 abs wraps; see below)
        raise WireError("part value outside the grid")
    if grid.dtype == torch.int8 and numel and bool((part == -128).any()):
        raise WireError("part value outside the grid")


class ReducerView:
    """What one member learnt from a completed all-reduce, beyond the sum: the group (sorted peer ids), the
    sha256 of the exact integer sum, the members that reduced a part (`reducers`: the possible checkers), and,
    when this node reduced a part, each sender's part hash (`commitments`) and the parts of the members it
    must spot-check (`check_parts`, values from `offset` of the flat shard on)."""

    def __init__(self, members, result_hash, commitments, offset, check_parts, reducers):
        self.members, self.result_hash, self.commitments = list(members), str(result_hash), dict(commitments)
        self.offset, self.check_parts, self.reducers = int(offset), dict(check_parts), list(reducers)

    def to_wire(self):
        return (self.members, self.result_hash, self.commitments, self.offset, self.check_parts, self.reducers)

    @classmethod
    def from_wire(cls, value) -> "ReducerView":
        return cls(*value)


# ---------------------------------------------------------------- the reducer's reply: a part's sum

_HEADER = struct.Struct("<BBHI")  # version, status, group size, values
_VERSION = 1
OK, INCOMPLETE = 0, 1  # INCOMPLETE: the reducer did not get this part from every sender (never applied)


def sum_bits(grid: Grid, group: int) -> int:
    """Bits one value of a group's sum takes on the wire: 8 low bits plus the high bits padded to 0, 1, 2,
    4 or 8 (so they pack whole values per byte), or 32 for the int32 grid."""
    if grid.name == "int32":
        return 32
    need = max(0, math.ceil(math.log2(2 * grid.q_max * group + 1)) - 8)
    return 8 + next(w for w in (0, 1, 2, 4, 8) if w >= need)


def encode_sum(total: torch.Tensor | None, grid: Grid, group: int, numel: int) -> bytes:
    """A part's sum as the reducer sends it back; `total` None: the part is INCOMPLETE (no payload)."""
    if total is None:
        return _HEADER.pack(_VERSION, INCOMPLETE, group, numel)
    head = _HEADER.pack(_VERSION, OK, group, numel)
    if grid.name == "int32":
        return head + total.to(torch.int32).numpy().astype("<i4", copy=False).tobytes()
    u = total.to(torch.int32).numpy() + grid.q_max * group  # offset binary: 0 <= u < 2**sum_bits
    width = sum_bits(grid, group) - 8
    out = head + u.astype(np.uint8).tobytes()
    if width:
        per_byte = 8 // width
        high = np.zeros(-(-numel // per_byte) * per_byte, dtype=np.uint8)
        high[:numel] = u >> 8
        high = high.reshape(-1, per_byte)
        packed = high[:, 0].copy()
        for j in range(1, per_byte):
            packed |= high[:, j] << (width * j)
        out += packed.tobytes()
    return out


def decode_sum(data: bytes, grid: Grid, group: int, numel: int) -> torch.Tensor | None:
    """The int32 sum in a reducer's reply, or None for an INCOMPLETE part. Raises WireError on bad bytes."""
    if len(data) < _HEADER.size:
        raise WireError("truncated sum")
    version, status, their_group, n = _HEADER.unpack_from(data)
    if version != _VERSION or their_group != group or n != numel or status not in (OK, INCOMPLETE):
        raise WireError(f"sum header (v{version}, status {status}, group {their_group}, {n} values) does not match "
                        f"this part (group {group}, {numel} values)")
    if status == INCOMPLETE:
        return None
    body = memoryview(data)[_HEADER.size :]
    if grid.name == "int32":
        if len(body) != 4 * n:
            raise WireError("sum payload size")
        return torch.from_numpy(np.frombuffer(body, dtype="<i4").astype(np.int32))
    width = sum_bits(grid, group) - 8
    per_byte = 8 // width if width else 0
    if len(body) != n + (-(-n // per_byte) if width else 0):
        raise WireError("sum payload size")
    u = np.frombuffer(body[:n], dtype=np.uint8).astype(np.int32)
    if width:
        packed = np.frombuffer(body[n:], dtype=np.uint8)
        high = np.empty((len(packed), per_byte), dtype=np.uint8)
        mask = (1 << width) - 1
        for j in range(per_byte):
            np.bitwise_and(packed >> (width * j), mask, out=high[:, j])
        u |= high.reshape(-1)[:n].astype(np.int32) << 8
    u -= grid.q_max * group
    total = torch.from_numpy(u)
    if n and int(total.abs().max()) > grid.q_max * group:
        raise WireError("sum value outside what the group can add up to")
    return total


def wire_bytes_per_value(grid: Grid, group: int) -> float:
    """Bytes one peer moves per value of a shard in one all-reduce, both legs together, for a group of
    `group`: (n-1)/n of its part out, (n-1)/n of the sums back."""
    n = max(1, group)
    return (n - 1) / n * (grid.dtype.itemsize + sum_bits(grid, n) / 8)
