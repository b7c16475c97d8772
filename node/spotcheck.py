"""Spot-checks: a groupmate drawn by the round's result recomputes a drawn member's contribution.

Who checks whom is drawn from the hash of the group's exact sum (protocol.receipt.spot_checks), so
it is known only once the sum is and nobody can choose or dodge it. The checker is a reducer: it
holds the target's part of the sum exactly as the target sent it (the part its receipt commits
to). Before applying the round it recomputes, from the round's start state (the same bits on every
member) and the examples the target named in its round metadata, the target's contribution, and
compares the part it holds with the same slice of the recomputation:

    error = ||sent - recomputed|| / ||recomputed||         (relative L2 on the checker's part)

The recomputation itself is deterministic on CPU (the same kernels as the target's, same order), but
what a member sends is its gradient plus its private error-feedback residual, rounded to the group's
grid: an honest member's error is the grid's rounding plus last round's rounding (measured: under
1 % on the int32 grid, a few % on int8), while zeros give exactly 1.0, noise of the gradient's norm
about 1.4, a sign flip 2.0, and a gradient computed on other examples about 1.0. The default
tolerance, 0.5, sits between the two with a wide margin on both sides.

Per-step mode only: in DiLoCo mode a contribution is `inner_steps` AdamW steps whose moments are the
member's private state, so it cannot be recomputed; LoRA dropout > 0 makes gradients random, so
checks are off there too.

    outcome = check(trainer, examples, part=..., offset=..., summed=..., claim=..., shard=k, total=T)
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import torch

from node.swarm.exact import dequantize

logger = logging.getLogger(__name__)

TOLERANCE = 0.5  # relative L2 error above which a part is a mismatch (see the module docstring)


@dataclass(frozen=True)
class Outcome:
    shard: int
    target: str
    error: float  # relative L2 error of the part
    failed: bool
    evidence_hash: str  # sha256 of the recomputed part (float32, little-endian)
    commitment: str  # sha256 of the target's part as this node reduced it
    seconds: float


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


def compare(part: torch.Tensor, offset: int, summed, recomputed: torch.Tensor, *, shard: int, target: str,
            tolerance: float = TOLERANCE, seconds: float = 0.0) -> Outcome:
    """The verdict on one part, given the recomputed contribution of the whole shard."""
    mine = recomputed[offset : offset + part.numel()].float().contiguous()
    error = relative_error(sent_values(part, offset, summed), mine)
    return Outcome(
        shard=shard, target=target, error=error, failed=error > tolerance,
        evidence_hash=hashlib.sha256(mine.numpy().tobytes()).hexdigest(),
        commitment=hashlib.sha256(part.contiguous().numpy().tobytes()).hexdigest(), seconds=seconds,
    )
