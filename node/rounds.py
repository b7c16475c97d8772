"""One round: train my slice of the round's global batch, sum exactly with each shard's group,
apply the same AdamW step as every groupmate, and record what this node contributed.

    runner = RoundRunner(manifest=..., swarm=..., trainer=..., ...)
    result = runner.run(round_, view)        # result.applied: the shards updated (all or none)

A round is all or nothing: when any trained shard failed (no group, a lost part, a groupmate
that started from another state) nothing is applied and nothing recorded; the daemon then
resyncs with the peers that completed it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from node.data import assign_examples, data_commitment
from node.swarm import quorum
from node.swarm.exact import from_fixed_point, to_fixed_point
from node.swarm.swarm import Failed, RoundClaim
from node.trainer import LocalResult, grad_commitment, lr_at
from protocol.record import to_fixed

logger = logging.getLogger(__name__)

RETRIES = 1  # all-reduce retries within a round after a lost part (a retry costs one matchmaking window at most)


@dataclass
class RoundResult:
    round: int
    start_hash: str  # adapter state the round started from
    shard_hashes: dict[int, str]  # trained shards' hashes at the start of the round
    loss: float | None  # swarm loss of the round (mean token CE over every group member's samples)
    local_loss: float | None
    samples: int
    tokens: int
    groups: dict[int, int]  # shard -> group size (1 = trained alone)
    applied: list[int]  # shards updated this round
    resync: list[int]  # shards that must be downloaded from peers
    seconds: float
    compute_seconds: float
    averaging_seconds: float


class RoundRunner:
    """Runs rounds for one node; holds no round number of its own (the daemon does)."""

    def __init__(self, *, manifest, swarm, trainer, adapter, trained, examples, data_digest: str, peer_id: str,
                 ledger, private_key, on_record=lambda: None):
        self.m = manifest
        self.swarm_id = manifest.swarm_id
        self.swarm = swarm
        self.trainer = trainer
        self.adapter = adapter
        self.trained = tuple(trained)
        self.examples = examples
        self.data_digest = data_digest
        self.peer_id = peer_id
        self.ledger = ledger
        self.private_key = private_key
        self.on_record = on_record

    def run(self, r: int, view: dict) -> RoundResult:
        m = self.m
        t0 = time.time()
        start_hash = self.adapter.state_hash()
        shard_hashes = {k: self.adapter.shard_hash(k) for k in self.trained}
        peers = quorum.others(view, self.peer_id)
        members = quorum.round_members(peers, self.peer_id, r)
        total = m.rounds.target_batch_size
        indices = assign_examples(len(self.examples), swarm_id=self.swarm_id, round=r, total=total, members=members, me=self.peer_id)
        examples = [self.examples[i] for i in indices]

        local = self.trainer.local_gradients(examples) if examples else self._empty_local()
        t_compute = time.time() - t0
        bits = m.averaging.fixed_point_bits
        ints, clipped = {}, 0
        for k in self.trained:
            ints[k], c = to_fixed_point(local.grad_sums[k], bits=bits, norm=total)
            clipped += c
        if clipped:
            logger.warning("round %d: %d gradient values exceeded the fixed-point range and were clipped; lower [averaging] fixed_point_bits", r, clipped)
        claim = RoundClaim(round=r, hashes=shard_hashes, samples=local.samples, tokens=local.tokens, loss_sum=local.loss_sum)
        expected = quorum.expected_group_sizes(peers, members, self.peer_id, self.trained)

        t1 = time.time()
        solo = {k: (ints[k], {self.peer_id: claim}) for k in self.trained if expected[k] <= 1}
        to_average = {k: v for k, v in ints.items() if k not in solo}
        results = dict(solo)
        if to_average:
            results.update(self.swarm.allreduce_sums(to_average, claim, expected, round_=r))
        for attempt in range(1, RETRIES + 1):  # a lost part is retried within the round, by the whole group
            lost = {k: res.group for k, res in results.items() if isinstance(res, Failed) and res.retry}
            if not lost:
                break
            logger.info("round %d: retrying the all-reduce of shard(s) %s with the same group (attempt %d)", r,
                        sorted(lost), attempt + 1)
            results.update(self.swarm.allreduce_sums({k: ints[k] for k in lost}, claim, expected, round_=r,
                                                     attempt=attempt, exact_groups=lost))
        t_avg = time.time() - t1

        grads, groups, resync, loss_num, loss_den = {}, {}, [], 0.0, 0
        for k in self.trained:
            res = results.get(k)
            if res is None or isinstance(res, Failed):
                resync.append(k)
                continue
            total_ints, claims = res
            groups[k] = len(claims)
            canonical = quorum.group_claim({p: c.to_wire() for p, c in claims.items()}, k)
            if canonical != (r, shard_hashes[k]):
                logger.warning("shard %d: my state (round %d) differs from the group's (round %d); resyncing", k, r, canonical[0])
                resync.append(k)
                continue
            group_tokens = sum(c.tokens for c in claims.values())
            grads[k] = from_fixed_point(total_ints, bits=bits, norm=total, tokens=group_tokens)
            if not loss_den:
                loss_num = sum(c.loss_sum for c in claims.values())
                loss_den = group_tokens
        if grads and not resync:
            self.trainer.apply(grads, lr_at(r, m.optim, m.rounds.max_rounds))
        else:
            resync = sorted(self.trained)
            grads = {}
        t_end = time.time()

        result = RoundResult(
            round=r, start_hash=start_hash, shard_hashes=shard_hashes, loss=(loss_num / loss_den) if loss_den else None,
            local_loss=(local.loss_sum / local.tokens) if local.tokens else None,
            samples=local.samples, tokens=local.tokens, groups=groups, applied=sorted(grads), resync=resync,
            seconds=t_end - t0, compute_seconds=t_compute, averaging_seconds=t_avg,
        )
        if result.applied:
            self._record(result, indices, ints, t0, t_end)
        return result

    def _empty_local(self) -> LocalResult:
        return LocalResult({k: torch.zeros(self.adapter.shard_numel(k)) for k in self.trained}, 0, 0, 0.0)

    def _record(self, res: RoundResult, indices, ints, t0: float, t1: float) -> None:
        """Sign, append and publish this node's contribution record for a completed round."""
        head = self.ledger.head()
        if head is not None and head.round >= res.round:
            # a restart replayed a round the ledger already holds (crash between record and checkpoint):
            # one record per round, so the replay is not recorded (nor credited) twice
            logger.info("round %d is already in the ledger (seq %d); not recording it again", res.round, head.seq)
            return
        loss_before = res.local_loss if res.local_loss is not None else 0.0
        blob = self.ledger.append_new(
            self.private_key, swarm_id=self.swarm_id, round=res.round, shards=tuple(res.applied),
            samples=res.samples, tokens=res.tokens, loss_before=to_fixed(loss_before),
            loss_after=to_fixed(res.loss if res.loss is not None else loss_before),
            adapter_hash=res.start_hash, data_commitment=data_commitment(indices, self.data_digest),
            grad_commitment=grad_commitment(ints), start_ms=int(t0 * 1000), end_ms=int(t1 * 1000),
        )
        self.on_record()
        try:
            self.swarm.publish_record(blob)
        except Exception as e:  # best effort (a DHT store can fail many ways); the local ledger is the source of truth
            logger.warning("could not publish record %d to the DHT: %s", self.ledger.next_seq - 1, e)
