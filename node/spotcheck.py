"""Spot-checks: a groupmate drawn by the round's result recomputes one microbatch of a drawn member's work.

Who checks whom is drawn from the hash of the group's exact sum (protocol.receipt.spot_checks), so
it is known only once the sum is and nobody can choose or dodge it. The checker is a reducer: it
holds the target's part of the sum exactly as the target sent it (the part its receipt commits to).

Recomputing a member's whole contribution would cost the checker what the member spent; instead every
member sends, with its round metadata, a *sketch* of each microbatch's gradient per trained shard: the
signed sums, over BLOCKS contiguous blocks of the flat shard, of the gradient times a ±1 vector seeded by
the swarm and the shard (`Sketch`). The sum's hash also draws one microbatch (protocol.receipt.check_unit),
and the checker, before applying the round, from the round's start state (the same bits on every member):

1. recomputes that microbatch's gradient from the examples the target named and compares its sketch with
   the announced one: each microbatch's gradient is computed from zero (node.trainer), so on the same
   kernels the two are bit-identical (`exact`); otherwise their relative L2 error;
2. projects the part it holds the same way (the blocks inside its span) and compares it with the sum of
   the announced sketches over the same blocks, divided by the round's batch:

    error = max(||unit sketch - recomputed|| / ||recomputed||, ||P sent - sum_j s_j / T|| / ||sum_j s_j / T||)

A member that skips work must fake the sketches of the microbatches it skipped (caught when one of those is
drawn) or send a part inconsistent with them (caught by 2 whichever is drawn). What a member sends is its
gradient plus its private error-feedback residual, rounded to the group's grid, so 2 is not exact: honest
errors are the grid's rounding plus last round's (measured: under 5 %), while zeros give exactly 1.0 and
noise of the gradient's norm about 1.4. The tolerance, 0.5, sits between the two with a wide margin on both
sides. A check costs one microbatch of compute instead of the member's whole share.

Per-step mode only: in DiLoCo mode a contribution is `inner_steps` AdamW steps whose moments are the
member's private state, so it cannot be recomputed; LoRA dropout > 0 makes gradients random, so
checks are off there too.

    sketch = Sketch(swarm_id, {shard: numel})        # trainer.local_gradients(examples, sketch)
    outcome = verdict(part, offset, summed, recomputed_unit_sketch, sketches, sketch, shard=k, target=..., total=T)
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import torch

from node.swarm.exact import dequantize

logger = logging.getLogger(__name__)

TOLERANCE = 0.5  # relative L2 error above which a part is a mismatch (see the module docstring)
BLOCKS = 128  # sketch values per microbatch per shard (512 bytes in float32)


@dataclass(frozen=True)
class Outcome:
    shard: int
    target: str
    error: float  # relative L2 error of the part
    failed: bool
    evidence_hash: str  # sha256 of the recomputed microbatch's sketch (float32, little-endian)
    commitment: str  # sha256 of the target's part as this node reduced it
    seconds: float
    exact: bool = False  # the recomputed microbatch's sketch equals the announced one bit for bit
    unit_error: float = 0.0  # the recomputed microbatch's sketch vs the announced one
    part_error: float = 0.0  # the part held vs the announced sketches' sum


def applies(manifest) -> bool:
    """Whether this swarm's contributions can be spot-checked: per-step mode with LoRA dropout 0 (see the
    module docstring)."""
    return manifest.sync.mode == "per-step" and manifest.lora.dropout == 0


def group_rate(rate: float, num_shards: int) -> float:
    """The chance to draw each member of one shard's group, such that a member of all `num_shards` groups is
    drawn with probability `rate` per round (a drawn member's gradient is recomputed once, whatever the
    number of its groups that drew it)."""
    if rate <= 0:
        return 0.0
    return 1.0 - (1.0 - rate) ** (1.0 / max(1, num_shards))


def relative_error(sent: torch.Tensor, recomputed: torch.Tensor) -> float:
    """||sent - recomputed|| / ||recomputed||, in float64; 0 when both are zero, inf when only the
    recomputation is."""
    sent, recomputed = sent.double(), recomputed.double()
    norm = float(recomputed.norm())
    diff = float((sent - recomputed).norm())
    if norm == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / norm


def sent_values(part: torch.Tensor, offset: int, summed) -> torch.Tensor:
    """What the target's integer part is worth on the group's grid (float32), values offset.. of the shard."""
    full = torch.zeros(summed.layout.numel, dtype=torch.int32)
    full[offset : offset + part.numel()] = part.to(torch.int32)
    return dequantize(full, summed.exps, summed.layout)[offset : offset + part.numel()]


class Sketch:
    """Seeded ±1 projections of flat shard gradients onto BLOCKS contiguous blocks; the same on every member
    (seeded by swarm id and shard). `project(k, flat)` on the flat's device; `project_span` for part of a shard."""

    def __init__(self, swarm_id: str, sizes: dict[int, int]):
        self.swarm_id = swarm_id
        self.sizes = dict(sizes)
        self._signs: dict[tuple[int, str], torch.Tensor] = {}

    def block_size(self, k: int) -> int:
        return max(1, -(-self.sizes[k] // BLOCKS))

    def signs(self, k: int, device="cpu") -> torch.Tensor:
        key = (k, str(device))
        if key not in self._signs:
            seed = int.from_bytes(hashlib.sha256(f"{self.swarm_id}|sketch|{k}".encode()).digest()[:8], "big") >> 1
            bits = torch.randint(0, 2, (self.sizes[k],), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
            self._signs[key] = (bits * 2 - 1).to(device)
        return self._signs[key]

    def project(self, k: int, flat: torch.Tensor) -> torch.Tensor:
        """(BLOCKS,) float32: block b holds sum(sign * flat) over values b*size .. (b+1)*size of shard k."""
        return self.project_span(k, flat, 0)

    def project_span(self, k: int, values: torch.Tensor, offset: int) -> torch.Tensor:
        """(BLOCKS,) float32 over values offset .. of shard k: blocks wholly inside hold their sum, others 0
        (`blocks_inside` says which)."""
        size, n = self.block_size(k), values.numel()
        x = values.float() * self.signs(k, values.device)[offset : offset + n]
        out = torch.zeros(BLOCKS, dtype=torch.float32, device=values.device)
        first, last = self.blocks_inside(k, offset, n)
        if last > first:
            lo = first * size - offset
            whole = min(last, self.sizes[k] // size)  # blocks of full size
            if whole > first:
                out[first:whole] = x[lo : lo + (whole - first) * size].view(whole - first, size).sum(1)
            if last > whole:  # the shard's shorter last block
                out[whole] = x[whole * size - offset :].sum()
        return out

    def blocks_inside(self, k: int, offset: int, n: int) -> tuple[int, int]:
        """Blocks first .. last-1 lie wholly within values offset .. offset+n of shard k."""
        size, total = self.block_size(k), self.sizes[k]
        first = -(-offset // size)
        last = -(-total // size) if offset + n >= total else (offset + n) // size
        return first, max(first, last)


def verdict(part: torch.Tensor, offset: int, summed, recomputed: torch.Tensor, announced: torch.Tensor,
            unit: int, sketch: Sketch, *, shard: int, target: str, total: int, tolerance: float = TOLERANCE,
            seconds: float = 0.0) -> Outcome:
    """The verdict on one member's part: `recomputed` is the checker's sketch of microbatch `unit`,
    `announced` the member's sketches from its round metadata (microbatches x BLOCKS values)."""
    announced = announced.reshape(-1, BLOCKS) if announced.numel() % BLOCKS == 0 else announced.reshape(1, -1)
    backed = announced.shape[1] == BLOCKS and 0 <= unit < announced.shape[0]
    if not backed:  # no sketch for the drawn microbatch: nothing backs the part
        unit_error = part_error = float("inf")
    else:
        unit_error = relative_error(announced[unit], recomputed)
        first, last = sketch.blocks_inside(shard, offset, part.numel())
        sent = sketch.project_span(shard, sent_values(part, offset, summed), offset)[first:last]
        expected = announced.double().sum(0)[first:last] / total
        part_error = relative_error(sent, expected) if last > first else 0.0
    error = max(unit_error, part_error)
    return Outcome(
        shard=shard, target=target, error=error, failed=not error <= tolerance,
        evidence_hash=hashlib.sha256(recomputed.float().contiguous().numpy().tobytes()).hexdigest(),
        commitment=hashlib.sha256(part.contiguous().numpy().tobytes()).hexdigest(), seconds=seconds,
        exact=backed and torch.equal(announced[unit], recomputed.float()),
        unit_error=unit_error, part_error=part_error,
    )
