"""One round: train, sum exactly with each shard's group, apply the same step as every groupmate,
and record what this node contributed.

    runner = RoundRunner(manifest=..., swarm=..., trainer=..., ...)
    result = runner.run(round_, view)        # result.applied: the shards updated (all or none)

per-step mode: my slice of the round's global batch -> its gradient -> summed -> one AdamW step.
diloco mode: `inner_steps` local AdamW steps, one slice of one global batch each -> the pseudo-gradient
(start - end) -> summed -> one outer step from the start (node.trainer). With [sync] overlap, round r
sums round r - 1's pseudo-gradient in a thread while its own inner steps run, then takes the outer
step along that sum from round r's start (one round late); its own pseudo-gradient waits for r + 1
(node.trainer.Pending). Round r's inner steps start from the swarm's state at r moved by the outer step
this node's own pseudo-gradient of round r - 1 would take (its guess at the sum in flight, which is not
in that state yet); the pseudo-gradient is measured from there, so no progress is made, and applied,
twice. A round's record credits the samples it summed.

A contribution goes on the wire grid (node/swarm/exact.py) with this node's error-feedback residual
added; what the grid could not carry becomes the next residual, once the round is applied.

A round is all or nothing: when any trained shard failed (no group, a lost part, a groupmate
that started from another state) nothing is applied and nothing recorded (diloco puts the
round's start weights back); the daemon then resyncs with the peers that completed it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from node import spotcheck
from node.data import assign_examples, data_commitment
from node.swarm import quorum
from node.swarm.outcome import Failed, RoundClaim
from node.trainer import LocalResult, Pending, grad_commitment, lr_at
from protocol.receipt import check_unit
from protocol.record import to_fixed

logger = logging.getLogger(__name__)

RETRIES = 1  # all-reduce retries within a round after a lost part (a retry costs one matchmaking window at most)
# How long a node's first exchange looks for its group (no round of its own measured yet). Nodes that start
# together reach round 0 seconds apart (model load, link probe, state sync); seen: an overlap node 6 s ahead of two
# others gave up after the usual 8 s window, the two paired, and it resynced until round 3; a per-step node at
# 20 Mbit/s that came after the other two had paired spent the swarm downloading state. A full group starts the
# moment its last member comes; a groupmate that never comes (a peer that only watches, a stuck one) costs this
# once. Overlap's exchange runs beside the inner steps, where waiting costs nothing until they end
FIRST_PATIENCE = 60.0  # overlap
START_PATIENCE = 15.0  # per-step and sequential diloco (at least)
# Fault injection for tests (a poisoner, as a modified client would be): SWARMTUNE_FAULT_POISON=F sends, instead of
# this node's contribution, seeded noise F times its norm.
_POISON = float(os.environ.get("SWARMTUNE_FAULT_POISON", "0") or 0)
# SWARMTUNE_FAULT_JUNK=zeros|noise: a node that sends zeros, or seeded noise at its contribution's norm, and records
# its round as if it had trained (what spot-checks catch)
_JUNK = os.environ.get("SWARMTUNE_FAULT_JUNK", "")
# SWARMTUNE_FAULT_FREERIDE=1: a free-rider, which never trains nor averages: it waits for the first other node to finish
# each round, signs a record claiming the round's whole batch, and takes the state (what receipts stop)
_FREERIDE = os.environ.get("SWARMTUNE_FAULT_FREERIDE", "") == "1"
# SWARMTUNE_FAULT_LATE=R:S: this node comes S seconds late to round R's exchange (a stalled machine), after its
# groupmates gave up waiting for it
_LATE = tuple(float(v) for v in os.environ["SWARMTUNE_FAULT_LATE"].split(":")) if os.environ.get("SWARMTUNE_FAULT_LATE") else None


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
    clipped: dict = field(default_factory=dict)  # peer id -> largest norm / median of its parts that we clipped
    checks: list = field(default_factory=list)  # spot-checks this node made this round (node.spotcheck.Outcome)


class RoundRunner:
    """Runs rounds for one node; holds no round number of its own (the daemon does)."""

    def __init__(self, *, manifest, swarm, trainer, adapter, trained, examples, data_digest: str, peer_id: str,
                 ledger, private_key, on_record=lambda: None, receipts=None):
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
        self.receipts = receipts  # node.receipts.ReceiptBook: signs, keeps and publishes receipts and checks
        # per-step contributions carry microbatch sketches for spot-checks (node.spotcheck), unless checks are off
        checked = spotcheck.applies(manifest) and manifest.credit.spot_check_rate > 0
        self._compute_s = 0.0  # overlap: the last round's inner steps (seconds)
        self._allreduce_s = 0.0  # the last whole exchange's all-reduce, matchmaking excluded (seconds)
        self._exchanged = False  # this process ran an exchange (the first one waits longer for its group)
        self._unsummed = None  # overlap: the pending pseudo-gradient a failed round did not sum
        self.sketch = spotcheck.Sketch(self.swarm_id, {k: adapter.shard_numel(k) for k in self.trained}) if checked else None

    def _local_work(self, r: int, members) -> tuple[LocalResult, dict[int, torch.Tensor], list[int], dict]:
        """This node's part of round r: (what it computed, its contribution per trained shard before the
        residual, the example indices it used, the round's start weights (diloco))."""
        total = self.m.rounds.target_batch_size
        if not self.trainer.diloco:
            indices = assign_examples(len(self.examples), swarm_id=self.m.order_key, round=r, total=total,
                                      members=members, me=self.peer_id)
            local = self._gradients(indices)
            return local, {k: local.grad_sums[k] / total for k in self.trained}, indices, {}
        local, delta, indices, start = self._inner_steps(r, members)
        return local, self._weighted(delta, local.samples), indices, start

    def _inner_steps(self, r: int, members, ahead: dict | None = None):
        """diloco: round r's inner AdamW steps from the round's start weights (moved by `ahead`, with overlap: the
        outer step of this node's own progress, which the swarm has not applied yet). Returns (what it computed, the pseudo-gradient
        (phase start - end) per trained shard, the example indices, the round's start weights)."""
        m, total, steps = self.m, self.m.rounds.target_batch_size, self.m.sync.inner_steps
        start = {k: self.trainer.flat_shard(k) for k in self.trained}
        begin = start
        if ahead is not None:
            begin = {k: start[k] - ahead[k] for k in self.trained}
            for k, flat in begin.items():
                self.trainer.load_flat_shard(k, flat)
            begin = {k: self.trainer.flat_shard(k) for k in self.trained}  # as the weights hold it (their dtype)
        all_indices, samples, tokens, loss_sum = [], 0, 0, 0.0
        for h in range(steps):  # inner step h trains on my slice of global batch r * steps + h
            step = r * steps + h
            indices = assign_examples(len(self.examples), swarm_id=self.m.order_key, round=step, total=total,
                                      members=members, me=self.peer_id)
            local = self._gradients(indices)
            if local.tokens:
                lr = lr_at(step, _per_step(m.optim, steps), m.rounds.max_rounds * steps)
                self.trainer.inner_step(local, lr)
            all_indices += indices
            samples, tokens, loss_sum = samples + local.samples, tokens + local.tokens, loss_sum + local.loss_sum
        delta = {k: begin[k] - self.trainer.flat_shard(k) for k in self.trained}
        return LocalResult({}, samples, tokens, loss_sum), delta, all_indices, start

    def _weighted(self, delta: dict, samples: int) -> dict:
        """A pseudo-gradient weighted by this node's samples (the group's sum / its samples is the weighted mean)."""
        weight = samples / (self.m.sync.inner_steps * self.m.rounds.target_batch_size)
        return {k: v * weight for k, v in delta.items()}

    def _gradients(self, indices) -> LocalResult:
        examples = [self.examples[i] for i in indices]
        return self.trainer.local_gradients(examples, self.sketch) if examples else self._empty_local()

    @property
    def overlap(self) -> bool:
        return self.trainer.diloco and self.m.sync.overlap

    def _pending_work(self, r: int) -> tuple[LocalResult, dict[int, torch.Tensor], tuple, Pending | None]:
        """overlap: what this node sums in round r, the pseudo-gradient of its round r - 1 inner steps (weighted),
        and that Pending itself (round r's inner steps start from the swarm's state plus its progress, so that
        no progress is made twice); zeros and no samples when it has none from that round (its first round, a
        late joiner, after a resync)."""
        # a round that failed is retried from the same state with the same pseudo-gradient (self._unsummed), or the
        # node resynced to the next round, which sums the failed round's own inner steps (trainer.pending)
        found = [p for p in (self.trainer.pending, self._unsummed) if p is not None and p.round == r - 1]
        self.trainer.pending = self._unsummed = None
        if not found:
            zeros = {k: self.trainer.zeros(k) for k in self.trained}
            return LocalResult({}, 0, 0, 0.0), zeros, (), None
        pend = found[0]
        local = LocalResult({}, pend.samples, pend.tokens, pend.loss_sum)
        return local, self._weighted(pend.delta, pend.samples), pend.indices, pend

    def _wire_input(self, r: int, local: LocalResult, contribution: dict, indices, shard_hashes: dict):
        """What this node puts on the wire (its contribution plus its error-feedback residual) and its claim."""
        x = {k: contribution[k] + self.trainer.residual[k] for k in self.trained}
        if _POISON or _JUNK:
            g = torch.Generator().manual_seed(r)
            scale = _POISON or 1.0
            for k, v in x.items():
                noise = torch.randn(v.numel(), generator=g) if _JUNK != "zeros" else torch.zeros(v.numel())
                x[k] = (noise * (scale * float(contribution[k].norm()) / max(float(noise.norm()), 1e-30))).to(v.device)
        claim = RoundClaim(round=r, hashes=shard_hashes, samples=local.samples, tokens=local.tokens, loss_sum=local.loss_sum,
                           indices=tuple(indices) if not self.trainer.diloco else (), sketches=local.sketches)
        return x, claim

    def _exchange(self, r: int, x: dict, claim: RoundClaim, expected: dict, patience: float) -> tuple[dict, float]:
        """Each trained shard's exact sum with its group (a group of one sums alone), a lost part retried within
        the round; returns ({shard: Summed | Failed}, seconds). `patience`: how long to look for the group, and to
        wait for the whole of it, when longer than the usual window: groupmates on other machines end their inner
        steps seconds apart (seen: 24 s and 33 s for 20 inner steps on one box; 42 s and 58 s with 3 nodes on 2
        cores), so a sequential round waits up to half its compute time, and an overlapped one, whose exchange runs
        alongside the next inner steps and costs nothing until they end, up to the whole of the last round's."""
        t1 = time.time()
        if _LATE and r == int(_LATE[0]):
            time.sleep(_LATE[1])
        results = {k: self.swarm.local_sum(k, x[k], claim) for k in self.trained if expected[k] <= 1}
        to_average = {k: v for k, v in x.items() if k not in results}
        if to_average:
            results.update(self.swarm.allreduce_sums(to_average, claim, expected, round_=r, patience=patience))
        for attempt in range(1, RETRIES + 1):  # a lost part is retried within the round, by the whole group
            lost = {k: res.group for k, res in results.items() if isinstance(res, Failed) and res.retry}
            if any(not isinstance(res, Failed) for res in results.values()):
                # other shards of this round were summed (their groups applied them): a shard whose group did
                # not form is matched again within the round, with the trainers that missed it too
                lost.update({k: expected[k] for k, res in results.items()
                             if isinstance(res, Failed) and not res.retry and attempt == 1})
            if not lost:
                break
            logger.info("round %d: retrying the all-reduce of shard(s) %s with the same group (attempt %d)", r,
                        sorted(lost), attempt + 1)
            results.update(self.swarm.allreduce_sums({k: x[k] for k in lost}, claim, expected, round_=r,
                                                     attempt=attempt, exact_groups=lost))
        return results, time.time() - t1

    def run(self, r: int, view: dict) -> RoundResult:
        m = self.m
        t0 = time.time()
        every = {k: self.adapter.shard_hash(k) for k in range(self.adapter.num_shards)}
        start_hash = self.adapter.state_hash(every)
        shard_hashes = {k: every[k] for k in self.trained}
        peers = {p: c for p, c in quorum.others(view, self.peer_id).items() if p not in self.swarm.excluded}
        # a trainer resyncing at this round (its last attempt failed as ours did) trains it with us the moment its
        # download ends: counted, or this node sums the round alone while it sums with the others. Seen: a home
        # node SIGKILLed mid-round, both public nodes' retry failed, one resynced while the other ran the round
        # alone, and the two public nodes held different round-4 states until the split guard healed it
        resyncing = {p: c for p, c in view.items() if p != self.peer_id and c.syncing and c.shard_hashes
                     and p not in self.swarm.excluded}
        trainers = {**peers, **resyncing}
        members = quorum.round_members(trainers, self.peer_id, r)
        total = m.rounds.target_batch_size

        if _FREERIDE:
            return self._free_ride(r, t0, start_hash, shard_hashes)
        expected = quorum.expected_group_sizes(trainers, members, self.peer_id, self.trained)
        if self.overlap:
            # the last round's pseudo-gradient is summed now, while this round's inner steps run
            local, contribution, indices, sending = self._pending_work(r)
            x, claim = self._wire_input(r, local, contribution, indices, shard_hashes)
            with ThreadPoolExecutor(1, thread_name_prefix="exchange") as pool:
                # the groupmates' rounds began as their last ones ended, up to about a round's compute apart
                exchange = pool.submit(self._exchange, r, x, claim, expected, self._compute_s or FIRST_PATIENCE)
                try:
                    if m.rounds.max_rounds and r >= m.rounds.max_rounds - 1:  # nothing would sum this round's steps
                        fresh, start = None, {k: self.trainer.flat_shard(k) for k in self.trained}
                    else:
                        ahead = None
                        if sending is not None:  # where the outer step summing it will land, with this node's
                            # progress standing for the group's mean (B5, addition: +2.5 % against per-step, where
                            # starting from the state plus that progress itself was +5.2 %)
                            ahead = {k: self.trainer.outer_step_of(k, sending.delta[k]) for k in self.trained}
                        mine, delta, new_indices, start = self._inner_steps(r, members, ahead)
                        fresh = Pending(r, delta, mine.samples, mine.tokens, mine.loss_sum, tuple(new_indices))
                    t_compute = self._compute_s = time.time() - t0
                finally:
                    results, t_avg = exchange.result()
        else:
            local, contribution, indices, start = self._local_work(r, members)
            x, claim = self._wire_input(r, local, contribution, indices, shard_hashes)
            local.grad_sums.clear()  # two adapter-sized buffers (on the GPU, per-step) that x now stands for
            del contribution
            t_compute = time.time() - t0
            # groupmates end a round as their all-reduce ends, seconds apart on a slow link (seen: 1.3-1.6 s of
            # 6-7 s at 20 Mbit/s, 3 nodes; the late one came after the other two had run as a pair): the wait
            # grows with the last whole exchange's all-reduce too: its own time (a wait for the group in it would
            # feed itself round after round: seen, 60 s rounds), and not one that failed (that timed a search)
            patience = max(t_compute / 2, self._allreduce_s if self._exchanged else START_PATIENCE)
            results, t_avg = self._exchange(r, x, claim, expected, patience)
            self._exchanged = True
            if results and not any(isinstance(res, Failed) for res in results.values()):
                self._allreduce_s = max(res.seconds for res in results.values())

        updates, groups, resync, failed, loss_num, loss_den, clipped = {}, {}, [], [], 0.0, 0, {}
        for k in self.trained:
            res = results.get(k)
            if res is None or isinstance(res, Failed):
                failed.append(k)
                continue
            groups[k] = len(res.claims)
            for peer, ratio in res.clipped.items():
                clipped[peer] = max(ratio, clipped.get(peer, 0.0))
            canonical = quorum.group_claim({p: c.to_wire() for p, c in res.claims.items()}, k)
            if canonical != (r, shard_hashes[k]):
                logger.warning("shard %d: my state (round %d) differs from the group's (round %d); resyncing", k, r, canonical[0])
                resync.append(k)
                continue
            group_tokens = sum(c.tokens for c in res.claims.values())
            group_samples = sum(c.samples for c in res.claims.values())
            if self.trainer.diloco:  # the samples-weighted mean pseudo-gradient
                updates[k] = res.value() * (m.sync.inner_steps * total / max(group_samples, 1))
            else:  # the gradient of the group's mean token loss (DPO: mean pair loss)
                updates[k] = res.value() * (total / max(self.trainer.loss_count(group_samples, group_tokens), 1))
            if not loss_den:
                loss_num = sum(c.loss_sum for c in res.claims.values())
                loss_den = self.trainer.loss_count(group_samples, group_tokens)
        if updates and not resync:
            # Shards are summed by separate groups: one whose sum came back was applied by its whole group,
            # so it is applied here too, even when another shard's group failed; that one stays at the
            # round's start (nobody in its group applied it) and, if its other trainers went on without
            # this node, the next round's group check takes their state.
            if failed:
                logger.info("round %d: shard(s) %s got no sum and stay at the round's start; %s applied", r, failed, sorted(updates))
                resync = failed
            checks = self._spot_checks(r, {k: results[k] for k in updates})  # from the round's start state
            if self.trainer.diloco:
                self.trainer.outer_apply(start, updates)
            else:
                self.trainer.apply(updates, lr_at(r, m.optim, m.rounds.max_rounds))
            sent = {k: (results[k].exps, results[k].part) for k in updates}
            for k in updates:  # what the grid did not carry joins the next contribution
                self.trainer.residual[k] = x[k] - results[k].sent if not (_POISON or _JUNK) else torch.zeros_like(x[k])
        else:
            resync = sorted(self.trained)
            updates, sent, checks = {}, {}, []
            for k, flat in start.items():  # diloco: back to the round's start (the swarm's state at r)
                self.trainer.load_flat_shard(k, flat)
        if self.overlap:  # summed next round (from a resync to round r + 1 too: those inner steps began at r's state)
            self.trainer.pending = fresh
            self._unsummed = sending if not updates else None
        t_end = time.time()

        result = RoundResult(
            round=r, start_hash=start_hash, shard_hashes=shard_hashes, loss=(loss_num / loss_den) if loss_den else None,
            local_loss=(local.loss_sum / self.trainer.loss_count(local.samples, local.tokens)) if local.tokens else None,
            samples=local.samples, tokens=local.tokens, groups=groups, applied=sorted(updates), resync=resync,
            seconds=t_end - t0, compute_seconds=t_compute, averaging_seconds=t_avg, clipped=clipped, checks=checks,
        )
        for peer, ratio in sorted(clipped.items()):
            logger.warning("round %d: peer %s sent a gradient part %.3g x the group's median norm; it was clipped to "
                           "%g x (flagged)", r, peer, ratio, m.sync.clip)
        if result.applied:
            self._record(result, indices, sent, t0, t_end)
            if self.receipts is not None:
                self.receipts.round_done(r, {k: results[k] for k in updates}, checks)
        return result

    def _spot_checks(self, r: int, summed: dict) -> list:
        """Check each member the round's results draw for a check by this node: recompute the microbatch
        the sum's hash draws from the round's start state, and compare (node.spotcheck.verdict)."""
        if self.sketch is None:
            return []
        outcomes, recomputed = [], {}
        mb, tolerance = self.m.rounds.microbatch_size, self.m.credit.spot_check_tolerance
        for k, res in summed.items():
            if res.view is None:
                continue
            for target, part in res.view.check_parts.items():
                claim = res.claims.get(target)
                if claim is None or not claim.indices or any(not 0 <= i < len(self.examples) for i in claim.indices):
                    continue
                t = time.time()
                unit = check_unit(res.view.result_hash, target, -(-len(claim.indices) // mb))
                if (target, unit) not in recomputed:
                    recomputed[(target, unit)] = self._gradients(list(claim.indices[unit * mb : (unit + 1) * mb]))
                mine = recomputed[(target, unit)].sketches[k][0]
                outcome = spotcheck.verdict(part, res.view.offset, res, mine, claim.sketches.get(k, torch.zeros(0)), unit,
                                            self.sketch, shard=k, target=target, total=self.m.rounds.target_batch_size,
                                            tolerance=tolerance, seconds=time.time() - t)
                outcomes.append(outcome)
                log = logger.warning if outcome.failed else logger.info
                log("round %d shard %d: spot-check of %s… (microbatch %d): error %.3g (microbatch %s, part %.3g; "
                    "tolerance %g): %s", r, k, target[:16], unit, outcome.error,
                    "bit-exact" if outcome.exact else f"{outcome.unit_error:.3g}", outcome.part_error, tolerance,
                    "FAILED" if outcome.failed else "passed")
        return outcomes

    def _free_ride(self, r: int, t0: float, start_hash: str, shard_hashes: dict) -> RoundResult:
        """Fault injection: record round r without training once another node is past it."""
        deadline = time.time() + 60
        while time.time() < deadline:
            others = [i for p, i in self.swarm.view().items() if p != self.peer_id]
            # it follows the leader: waiting for every other node would let one stuck peer hold it back, and a
            # lagging peer pins the swarm's (lower median) round that a behind node may sync to
            if any(i.round > r for i in others):
                break
            time.sleep(0.3)
        samples = self.m.credit_cap
        res = RoundResult(round=r, start_hash=start_hash, shard_hashes=shard_hashes, loss=None, local_loss=None,
                          samples=samples, tokens=samples * 32, groups={}, applied=sorted(self.trained), resync=[],
                          seconds=time.time() - t0, compute_seconds=0.0, averaging_seconds=0.0)
        self._record(res, list(range(samples)), {k: (torch.zeros(0, dtype=torch.int8),) * 2 for k in self.trained}, t0,
                     time.time())
        return dataclasses.replace(res, applied=[], resync=sorted(self.trained))

    def _empty_local(self) -> LocalResult:
        return LocalResult({k: self.trainer.zeros(k) for k in self.trained}, 0, 0, 0.0)

    def _record(self, res: RoundResult, indices, sent, t0: float, t1: float) -> None:
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
            grad_commitment=grad_commitment(sent), start_ms=int(t0 * 1000), end_ms=int(t1 * 1000),
        )
        self.on_record()
        try:
            self.swarm.publish_record(blob)
        except Exception as e:  # best effort (a DHT store can fail many ways); the local ledger is the source of truth
            logger.warning("could not publish record %d to the DHT: %s", self.ledger.next_seq - 1, e)


def _per_step(optim, steps: int):
    """diloco's inner schedule counts inner steps: warmup_rounds rounds are warmup_rounds * steps of them."""
    return dataclasses.replace(optim, warmup_rounds=optim.warmup_rounds * steps)
