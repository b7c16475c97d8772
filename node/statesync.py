"""Adapter state between peers: publish ours at round boundaries, take the swarm's when behind.

A node serves, per trained shard, the adapter tensors and AdamW moments it holds at the
start of its current round (`publish`). It downloads state (`resync`) when it joins late,
falls behind, or lost a round; a state is taken only when
- it matches the hash its donor advertised (else the donor is distrusted for DISTRUST_S),
- every trained shard came back at the same round, not older than ours (unless asked), and
- most peers at that round advertise the same hashes (`quorum.unvouched_shard`): one peer
  lying about its progress or serving corrupted state cannot move this node.
Donors are picked by `quorum.donor_order`, never by what a donor says of itself.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter

from node.swarm import quorum
from node.swarm.swarm import StateMeta

logger = logging.getLogger(__name__)

DISTRUST_S = 600.0  # seconds a donor whose state failed a check is not asked again
RESYNC_ATTEMPTS = 20  # tries of a required resync (a late joiner whose peers are ahead)


class SyncError(RuntimeError):
    """Peers are ahead and their state cannot be had; the message says what to check."""


class StateSync:
    def __init__(self, *, swarm, trainer, adapter, trained, swarm_id: str, peer_id: str, matchmaking_time: float,
                 stop: threading.Event, on_synced=lambda: None, set_state=lambda state: None):
        self.swarm = swarm
        self.trainer = trainer
        self.adapter = adapter
        self.trained = tuple(trained)
        self.swarm_id = swarm_id
        self.peer_id = peer_id
        self.matchmaking_time = matchmaking_time
        self.stop = stop
        self.on_synced = on_synced
        self.set_state = set_state
        self._distrusted: dict[str, float] = {}  # donor -> until when (monotonic) it is skipped
        self._donors: dict[int, str] = {}  # shard -> who sent the state loaded last

    def shard_hashes(self) -> dict[str, str]:
        """Our trained shards' hashes, as the heartbeat carries them."""
        return {str(k): self.adapter.shard_hash(k) for k in self.trained}

    def publish(self, round_: int) -> dict[str, str]:
        """Serve our trained shards' state at the start of `round_` to peers that download it; returns their hashes
        (`shard_hashes`)."""
        hashes = {}
        for k in self.trained:
            # the shard's own step count: after a round that applied only some shards, opt_step is ahead of the others'
            # AdamW count, and a node loading it would take another bias correction (its shard diverges every round)
            hashes[str(k)] = self.adapter.shard_hash(k)
            meta = StateMeta(round=round_, hash=hashes[str(k)], step=self.trainer.shard_step(k), swarm=self.swarm_id)
            self.swarm.publish_state(k, meta, self.trainer.shard_state(k))
        return hashes

    def distrust(self, donor: str) -> None:
        self._distrusted[donor] = time.monotonic() + DISTRUST_S

    def _donors_for(self, k: int) -> list[str]:
        now = time.monotonic()
        self._distrusted = {p: t for p, t in self._distrusted.items() if t > now}
        return quorum.donor_order(self.swarm.view(), self.peer_id, k, skip=self._distrusted, rng=random)

    def sync_shards(self, shards, *, my_round: int, require_newer: bool) -> dict[int, int]:
        """Download shards from peers; returns {shard: round} of what was loaded (hash-checked)."""
        loaded = {}
        for k in shards:
            got = self.swarm.download_state(k, self._donors_for(k), timeout=self.swarm.download_timeout(k))
            if got is None:
                continue
            donor, meta, tensors = got
            if meta.swarm != self.swarm_id or (require_newer and meta.round < my_round):
                continue
            backup = self.trainer.shard_state(k)
            old_step = self.trainer.opt_step
            try:
                self.trainer.load_shard_state(k, tensors, meta.step)
            except (ValueError, RuntimeError) as e:
                logger.warning("shard %d: peer state does not fit (%s); ignored", k, e)
                continue
            if self.adapter.shard_hash(k) != meta.hash:
                logger.warning("shard %d: the state from %s… does not match its advertised hash; discarded, and that peer "
                               "is not asked again for %.0f s", k, donor[:16], DISTRUST_S)
                self.distrust(donor)
                self.trainer.load_shard_state(k, backup, old_step)
                continue
            if k in self.trained:
                self.trainer.opt_step = meta.step
            loaded[k] = meta.round
            self._donors[k] = donor
        return loaded

    def refresh_untrained(self, shards, round_: int, timeout: float) -> list[int]:
        """Bring the shards this node does not train to `round_`, bit-identical with their trainers,
        before the next forward pass; returns the shards still behind when `timeout` ran out.

        The trainers of shard k announce (round, hash) the moment they applied a round, and serve
        that state: the node waits for the hash most trainers of k at `round_` advertise, and loads
        it from one of them (hash-checked). A shard nobody trains keeps what it has (coverage
        warns about it); trainers already past `round_` mean this node is behind (the split guard
        resyncs it)."""
        pending = set(shards)
        deadline = time.monotonic() + timeout
        while pending and not self.stop.is_set():
            peers = quorum.others(self.swarm.view(), self.peer_id)
            for k in sorted(pending):
                trainers = {p: i for p, i in peers.items() if k in i.shards}
                at = {p: i for p, i in trainers.items() if i.round == round_ and k in i.shard_hashes}
                if not trainers or (not at and max(i.round for i in trainers.values()) > round_):
                    pending.discard(k)
                    continue
                if not at:
                    continue  # the trainers have not announced round_ yet
                votes = Counter(i.shard_hashes[k] for i in at.values())
                want = max(votes, key=lambda h: (votes[h], h))
                if self.adapter.shard_hash(k) == want:
                    pending.discard(k)
                    continue
                donors = [p for p in quorum.donor_order(peers, self.peer_id, k, skip=self._distrusted, rng=random)
                          if p in at and at[p].shard_hashes[k] == want]
                got = self.swarm.download_state(k, donors, timeout=self.swarm.download_timeout(k))
                if got is None:
                    continue
                donor, meta, tensors = got
                if (meta.round, meta.hash, meta.swarm) != (round_, want, self.swarm_id):
                    continue  # it moved on (or lags) since it announced: no evidence against it, ask again
                backup = self.trainer.shard_state(k)
                try:
                    self.trainer.load_shard_state(k, tensors, meta.step)
                except (ValueError, RuntimeError) as e:
                    logger.warning("shard %d: peer state does not fit (%s); ignored", k, e)
                    continue
                if self.adapter.shard_hash(k) == want:
                    pending.discard(k)
                    continue
                # evidence: it served bytes that do not hash to what it (and the other trainers) advertised
                logger.warning("shard %d: the state from %s… does not match the hash it advertised for round %d; "
                               "discarded, and that peer is not asked again for %.0f s", k, donor[:16], round_, DISTRUST_S)
                self.distrust(donor)
                self.trainer.load_shard_state(k, backup, self.trainer.opt_step)
            if pending and time.monotonic() < deadline:
                time.sleep(0.05)
            elif pending:
                break
        if pending:
            logger.warning("shard(s) %s: their trainers' round-%d state did not arrive in %.0f s; training on with an "
                           "older copy (the next round boundary tries again)", sorted(pending), round_, timeout)
        return sorted(pending)

    def _snapshot(self, shards) -> tuple[dict, int]:
        return {k: self.trainer.shard_state(k) for k in shards}, self.trainer.opt_step

    def _restore(self, snapshot: tuple[dict, int]) -> None:
        states, step = snapshot
        for k, state in states.items():
            self.trainer.load_shard_state(k, state, step)
        self.trainer.opt_step = step

    def _vouched(self, round_: int, my_round: int) -> bool:
        """Whether the state now loaded for our trained shards is the swarm's at `round_`."""
        peers = quorum.others(self.swarm.view(), self.peer_id)
        bad = quorum.unvouched_shard(peers, round_, my_round, {k: self.adapter.shard_hash(k) for k in self.trained})
        if bad is None:
            return True
        donor = self._donors.get(bad)
        if bad >= 0 and donor:
            logger.warning("shard %d: the state from %s… is not what most peers at round %d hold; that peer is "
                           "not asked again for %.0f s", bad, donor[:16], round_, DISTRUST_S)
            self.distrust(donor)
        return False

    def resync(self, my_round: int, *, required: bool, want_shard_hash: tuple[int, str] | None = None,
               allow_older: bool = False) -> int | None:
        """Take the swarm's state for every trained shard, all from one round; returns that round, or
        None when no acceptable state came back (our own state is then left as it was).

        With `required` (a late joiner whose peers are ahead) it keeps trying; otherwise one pass.
        `want_shard_hash`: only a state with this hash for that shard will do (healing a split)."""
        self.set_state("syncing")
        self.swarm.announce(syncing=True)
        new_round = my_round
        try:
            for attempt in range(RESYNC_ATTEMPTS if required else 1):
                if self.stop.is_set():
                    return None
                snapshot = self._snapshot(self.trained)  # untrained shards may keep what came (they are refreshed anyway)
                loaded = self.sync_shards(range(self.adapter.num_shards), my_round=my_round, require_newer=not allow_older)
                rounds = {loaded[k] for k in self.trained if k in loaded}
                consistent = len(rounds) == 1 and all(k in loaded for k in self.trained)
                if consistent and not self._vouched(next(iter(rounds)), my_round):
                    logger.warning("downloaded state (round %d) is not what most peers at that round hold; not trusted, retrying",
                                   next(iter(rounds)))
                    consistent = False
                if consistent and (want_shard_hash is None or self.adapter.shard_hash(want_shard_hash[0]) == want_shard_hash[1]):
                    new_round = rounds.pop()
                    self.on_synced()
                    logger.info("synced adapter and optimizer state from peers: round %d, hash %s…", new_round,
                                self.adapter.state_hash()[:12])
                    if want_shard_hash is None and new_round > my_round:
                        # we were behind, and the peers are already computing this round without us
                        new_round = self._join_next_round(new_round)
                    return new_round
                self._restore(snapshot)  # a mix of rounds is worse than our own consistent state
                if required:
                    time.sleep(min(0.25 * (attempt + 1), 2.0))
            return None
        finally:
            self.swarm.announce(syncing=False, round=new_round, hashes=self.shard_hashes())

    def _join_next_round(self, r: int) -> int:
        """After a download at round r the peers are already computing r, and their group would form
        without us. Announce r+1 instead (so they count us in it), take their r+1 state the moment they
        publish it, and start r+1 with them. If they do not get there in time, train r alone-late."""
        peers = quorum.others(self.swarm.view(), self.peer_id)
        if not peers or max(i.round for i in peers.values()) != r:
            return r
        self.swarm.announce(round=r + 1, syncing=False, hashes={})
        deadline = time.monotonic() + max(10.0, 3 * self.matchmaking_time)
        while time.monotonic() < deadline and not self.stop.is_set():
            time.sleep(0.05)
            if any(i.round > r for i in quorum.others(self.swarm.view(), self.peer_id).values()):
                snapshot = self._snapshot(self.trained)
                loaded = self.sync_shards(self.trained, my_round=r, require_newer=True)
                if loaded and set(loaded.values()) == {r + 1} and set(loaded) == set(self.trained) and self._vouched(r + 1, r):
                    logger.info("joined the swarm at round %d", r + 1)
                    return r + 1
                self._restore(snapshot)
        self.swarm.announce(round=r, hashes=self.shard_hashes())
        return r

    def catch_up(self, my_round: int) -> int:
        """Before the first step: if peers are ahead, take their exact state (adapter, optimizer, round).
        Raises SyncError when they are ahead and their state cannot be had."""
        ahead = quorum.swarm_round(quorum.others(self.swarm.view(), self.peer_id))
        if ahead <= my_round:
            return my_round
        new_round = self.resync(my_round, required=True)
        if new_round is None:
            raise SyncError(
                f"peers are at round {ahead} but their state could not be downloaded (tried {RESYNC_ATTEMPTS} times); "
                "check connectivity to them (swarmtune doctor) and restart"
            )
        return new_round
