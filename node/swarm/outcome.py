"""What one shard's all-reduce gives a node: every member's claim about its part (`RoundClaim`, sent as the
part's metadata), and the outcome, an exact sum (`Summed`) or a failure the round loop acts on (`Failed`).

    outcome = read_outcome(shard, gathered, averager, layout, served, exact_group=None)

`read_outcome` reads what hivemind's step returned: the members' metadata (claims and block exponents) plus
the keys the exact-sum runner adds (node/swarm/averager.py): values never sent back (only this peer may miss
them), values summed without every sender (the whole group saw it), clip ratios and the reducer's view.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from node.swarm.averager import (
    CLIPPED_KEY, ELAPSED_KEY, EXPONENTS_KEY, FAILED_KEY, INCOMPLETE_KEY, RECEIPT_KEY,
)
from node.swarm.exact import Layout, ReducerView, WireError, dequantize, group_exponents

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundClaim:
    """What a group member says about its part: the round, the hash of each shard it started from,
    and its samples, tokens and summed token loss (the group's loss is computed from these)."""

    round: int
    hashes: dict  # {shard: hash}
    samples: int
    tokens: int
    loss_sum: float
    indices: tuple = ()  # the examples it trained on (per-step mode), for a spot-check's recomputation
    # {shard: float32 (microbatches x node.spotcheck.BLOCKS)}: each microbatch's gradient sketch, for spot-checks
    sketches: dict = field(default_factory=dict, compare=False)

    def to_wire(self) -> dict:
        wire = {"r": self.round, "h": {str(k): h for k, h in self.hashes.items()}, "s": self.samples, "t": self.tokens,
                "l": self.loss_sum, "i": list(self.indices)}
        if self.sketches:
            wire["k"] = {str(k): v.float().contiguous().numpy().tobytes() for k, v in self.sketches.items()}
        return wire

    @classmethod
    def from_wire(cls, value) -> "RoundClaim":
        """Raises TypeError/KeyError/ValueError/AttributeError on a malformed claim."""
        return cls(round=int(value["r"]), hashes={int(k): str(h) for k, h in dict(value["h"]).items()},
                   samples=int(value["s"]), tokens=int(value["t"]), loss_sum=float(value["l"]),
                   indices=tuple(int(i) for i in value.get("i", ())),
                   sketches={int(k): _sketch(v) for k, v in dict(value.get("k", {})).items()})


def _sketch(raw) -> torch.Tensor:
    """A claim's microbatch sketches of one shard from the wire, flat float32 (node.spotcheck reads their
    shape); ValueError when malformed."""
    if not isinstance(raw, bytes) or not raw or len(raw) % 4:
        raise ValueError("a sketch is float32 values")
    return torch.frombuffer(bytearray(raw), dtype=torch.float32)


@dataclass(frozen=True)
class Summed:
    """A shard's exact sum over its group: the integers, the grid they are on, what this node's own
    contribution was worth on that grid (its error-feedback residual is what it meant minus this), and
    every member's claim."""

    total: torch.Tensor  # int32: the sum of every member's q
    exps: torch.Tensor  # int8 per block: the group's grid
    sent: torch.Tensor  # float32: q * 2**e of this node's contribution (where the contribution lives)
    part: torch.Tensor  # q itself, on the host (the grid's dtype): what this node sent
    claims: dict  # {peer_id: RoundClaim}
    layout: Layout
    seconds: float = 0.0  # the all-reduce itself (matchmaking excluded)
    clipped: dict = field(default_factory=dict)  # {peer id: norm / median} of parts this node's reducer clipped
    view: ReducerView | None = None  # the group, the sum's hash, what this node's reducer saw (receipts, spot-checks)

    def value(self) -> torch.Tensor:
        """The sum as float32, the same bits on every member."""
        return dequantize(self.total, self.exps, self.layout)


@dataclass(frozen=True)
class Failed:
    """A shard's all-reduce that gave no sum. `retry`: a part was lost (a reducer summed it without one of
    its senders and told every sender so, or this node's stream to a reducer broke); nobody applied the
    round, and the group retries it together: the retry assembles only when all `group` members are back,
    so no subset ever applies a sum the others did not. When the retry cannot gather them (they completed
    the round without this node), or without `retry` (no group formed), the node takes the state of the
    peers that completed the round."""

    reason: str
    retry: bool
    group: int = 0  # the group that lost the part: a retry must gather exactly these many peers


def read_outcome(shard: int, gathered, averager, layout: Layout, served: tuple | None,
                 exact_group: int | None = None) -> Summed | Failed:
    """The outcome of `shard`'s step from what it gathered (None: nothing) and the parts this node put on the
    group's grid (`served`: the grid, what the parts were worth and the parts, from ShardAverager.put_parts; the
    sum comes back on the contribution's device). `exact_group`: this step retried a round that lost a part, and counts only when
    exactly that many peers took part again."""
    k = shard
    gathered = dict(gathered or {})
    took = float(gathered.pop(ELAPSED_KEY, 0.0))
    lost = gathered.pop(FAILED_KEY, 0)
    incomplete = gathered.pop(INCOMPLETE_KEY, 0)
    clipped = gathered.pop(CLIPPED_KEY, {})
    view = gathered.pop(RECEIPT_KEY, None)
    if not gathered:
        return Failed("no group", retry=False)
    if exact_group is not None and len(gathered) != exact_group:
        logger.warning("shard %d: the retry gathered %d of the %d peers that lost a part; not applied", k,
                       len(gathered), exact_group)
        return Failed("no group", retry=False)
    if lost:
        # a stream to a reducer broke: that reducer dropped us, and its INCOMPLETE reply makes the others
        # retry; or only this node missed the sums while the others completed the round (then the retry
        # finds nobody, and the node takes their state)
        logger.warning("shard %d: %d values came back un-summed (a stream to a reducer broke mid all-reduce); "
                       "retrying the round with the same group", k, lost)
        return Failed("part not returned", retry=True, group=len(gathered))
    if incomplete:
        # every groupmate got the same INCOMPLETE reply from that reducer: all of them retry the round
        # together, and nothing was applied anywhere
        logger.warning("shard %d: %d values were summed without every groupmate (a part was lost mid "
                       "all-reduce); the group retries the round", k, incomplete)
        return Failed("part lost", retry=True, group=len(gathered))
    try:
        exps = group_exponents([meta.get(EXPONENTS_KEY) if isinstance(meta, dict) else None
                                for meta in gathered.values()], layout)
        claims = {str(pid): RoundClaim.from_wire(meta) for pid, meta in gathered.items()}
        view = ReducerView.from_wire(view) if view is not None else None
    except (WireError, TypeError, KeyError, ValueError, AttributeError) as e:
        logger.warning("shard %d: a groupmate sent malformed round metadata (%s); round discarded", k, e)
        return Failed("no group", retry=False)
    if served is None or not torch.equal(served[0], exps):
        # the averager sums only after this node put its parts on the grid every member derives from the
        # gathered exponents: a missing or different grid is a bug, never applied
        logger.error("shard %d: the sum came back without this node's parts on the group's grid; round discarded", k)
        return Failed("no group", retry=False)
    _, sent, part = served
    return Summed(averager.sums.to(sent.device, copy=True), exps, sent, part, claims, layout, took,
                  dict(clipped) if isinstance(clipped, dict) else {}, view)
