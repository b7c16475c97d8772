"""Before each round: train, wait, or resync — from quorum's verdicts on one peer view.

Behind: the swarm (lower median of peers' rounds) is ahead; take its state, never train
behind it. Split: peers at or below our round hold another adapter for a shard we train (two
groups formed where one should have, or a partition healed); the larger side wins (then the
later round, then the larger hash) and the other side takes its state, so the swarm converges
back to one adapter. Minority: this node sees under half of the peers it knew recently; with
`[averaging] on_split = "wait"` it pauses until they are back, with "train" it trains on and
says so. Left behind: the swarm's last round was summed without this node and its trainers left
(`LeftBehind`): no round it sums now would end with their adapter.
"""

from __future__ import annotations

import logging
import threading
import time

from node.swarm import quorum
from node.swarm.membership import REDIAL_FOR

logger = logging.getLogger(__name__)


class LeftBehind(RuntimeError):
    """The swarm finished its last round without this node, and the trainers that hold its end have left."""


class SplitGuard:
    def __init__(self, *, swarm, statesync, peer_id: str, on_split: str, peer_ttl: float, stop: threading.Event,
                 metrics=None, set_state=lambda state: None, last_round: int = 0):
        self.swarm = swarm
        self.last_round = last_round  # the manifest's max_rounds (0: no end)
        self.statesync = statesync
        self.peer_id = peer_id
        self.on_split = on_split
        self.peer_ttl = peer_ttl
        self.stop = stop
        self.metrics = metrics
        self.set_state = set_state
        self._seen: dict[str, float] = {}  # peers seen recently -> when (wall clock)
        self._split_noticed = False
        self._waiting = False
        # a node that waits out a split must remember whom it waits for; one that trains on only needs
        # the memory for its warning
        self.memory = REDIAL_FOR if on_split == "wait" else max(120.0, 10 * peer_ttl)

    def before_round(self, my_round: int, my_hashes: dict[int, str], prev_hashes: dict[int, str]) -> tuple[bool, int]:
        """(train now?, the round we are at afterwards). When it returns False the caller loops."""
        view = self.swarm.view()
        peers = quorum.others(view, self.peer_id)
        # a peer downloading state is still there: it counts as visible, not as lost contact
        minority, just_lost = self._minority({p: i for p, i in view.items() if p != self.peer_id})
        if self.on_split == "wait" and (minority or just_lost):
            # a peer missing for less than peer_ttl may be a slow DHT, not a split: with "wait", do not
            # train without it until that is clear
            if minority and not self._waiting:
                logger.warning("this node sees under half of the swarm: waiting for the others to come back "
                               "([averaging] on_split = 'wait'); it resyncs with them when the split heals")
            self._waiting = minority
            self.set_state("paused")
            time.sleep(1.0)
            return False, my_round
        self._waiting = False
        # behind: the peers that train a shard we train are ahead (peers with no shard in common with
        # us keep their own pace, and we could not take a state of ours from them anyway)
        mine = set(my_hashes)
        sharing = {p: i for p, i in peers.items() if mine & set(i.shards)}
        if quorum.swarm_round(sharing) > my_round:  # at the swarm's end too, while its finishers serve their state
            got = self.statesync.resync(my_round, required=False)
            if got is None:
                time.sleep(0.5)
            return False, my_round if got is None else got
        if not sharing and 0 < self.last_round and my_round < self.last_round:
            self._not_left_behind(my_round, mine)
        verdict = quorum.split_verdict(peers, my_round, my_hashes, prev_hashes)
        if verdict is None:
            return True, my_round
        k, (their_round, their_hash), their_votes, our_votes = verdict
        logger.warning("swarm split detected on shard %d: %d peer(s) hold round %d %s…, %d hold ours (round %d %s…); "
                       "taking the majority state", k, their_votes, their_round, their_hash[:12], our_votes, my_round,
                       my_hashes[k][:12])
        if self.metrics:
            self.metrics.on_split()
        for _ in range(6):
            if self.stop.is_set():
                break
            got = self.statesync.resync(my_round, required=False, want_shard_hash=(k, their_hash),
                                        allow_older=their_round < my_round)
            if got is not None:
                return False, got
        time.sleep(0.5)
        return False, my_round

    def _not_left_behind(self, my_round: int, mine: set) -> None:
        """Alone before the swarm's last round: the other trainers may have finished it and left while this node was
        busy (a peer that leaves is gone from the view at once; seen: a 3-node per-step swarm at 50 Mbit/s where one
        node lost round 3, its download failed as the other two finished, and it summed rounds 3 and 4 alone into an
        adapter nobody else holds). Their signed records of the last round say whether they did: raises LeftBehind."""
        from node.swarm.validator import RECORDS_BUCKET
        from protocol.record import body_of, decode_record

        last = self.last_round - 1
        try:
            blobs = self.swarm.read_record_bucket(last // RECORDS_BUCKET)
        except Exception as e:  # hivemind raises whatever the lookup raised; the next pass looks again
            logger.info("could not read the last round's records: %s", e)
            return
        records = [decode_record(body_of(blob)) for blob in blobs]  # verified by the bucket's reader
        done = {r.peer_id for r in records if r.round == last and r.peer_id != self.peer_id and set(r.shards) & mine}
        if done:
            raise LeftBehind(
                f"the swarm finished its last round ({last}) without this node, which is still at round {my_round}, "
                f"and the {len(done)} peer(s) that hold the final adapter have stopped before it could be downloaded. "
                f"This node keeps round {my_round}'s state (its checkpoint); the swarm's final adapter is what those "
                "peers exported (`swarmtune export` on one of them)")

    def _minority(self, peers: dict) -> tuple[bool, bool]:
        """(minority, just_lost): whether this node now sees less than half of the swarm it saw recently
        (a partition, not departures), and whether a peer went missing less than peer_ttl ago.

        Visible: listed by the DHT now (a peer stays listed until its heartbeat expires, whatever one
        lookup returns). Known: seen within `self.memory` seconds and not announced gone."""
        now = time.time()
        for p in peers:
            self._seen[p] = now
        left = self.swarm.left
        for p in list(self._seen):
            if p in left or now - self._seen[p] > self.memory:
                del self._seen[p]
        visible = sum(1 for p in self._seen if p in peers)
        missing = len(self._seen) - visible
        if missing and not self._split_noticed:
            logger.warning("lost contact with %d of %d peers (a network split or crashed peers); %d still visible",
                           missing, len(self._seen), visible)
        elif not missing and self._split_noticed:
            logger.info("all %d known peers are visible again", len(self._seen))
        self._split_noticed = bool(missing)
        if self.metrics:
            self.metrics.set_missing_peers(missing)
        just_lost = any(p not in peers and now - t <= self.peer_ttl for p, t in self._seen.items())
        return quorum.is_minority(visible, len(self._seen)), just_lost
