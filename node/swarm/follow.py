"""Follow a running swarm without training in it: read its trainers' heartbeats, download their shards.

    follower = SwarmFollower(manifest, initial_peers=[...])
    target = follower.newest()            # (round, {shard: hash}, {shard: donors}) or None
    got = follower.fetch(shard, donors)   # (donor, StateMeta, tensors) or None
    follower.shutdown()

`swarmtune serve --swarm` uses it to serve a swarm's latest adapter. The follower is a
client-mode DHT node: it dials out only, publishes no heartbeat and no membership entry
(trainers never count it as a peer or wait for it), and runs no averager: the state download
runs as a coroutine in its DHT process, over the same RPC and donor loop the nodes use
(`node.swarm.averager.first_state`). What to hold is decided by `quorum.followed_state`;
checking the downloaded bits against the advertised hash is the caller's (it knows the
parameter names the hash covers).
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Sequence

import torch

from node.swarm import quorum
from node.swarm.averager import first_state_in_dht
from node.swarm.dht import start_dht
from node.swarm.membership import Membership, check_membership
from node.swarm.swarm import MAX_DONORS, StateMeta
from node.swarm.validator import RecordsValidator

logger = logging.getLogger(__name__)

CHUNK_TIMEOUT_S = 20.0  # longest wait between two parts of a state download (not the whole download)
OUTER_TIMEOUT_S = 600.0  # a download that takes longer than this is given up (the next poll tries again)


class SwarmFollower:
    """A read-only member of one swarm's DHT."""

    def __init__(self, manifest, *, initial_peers: Sequence[str], num_shards: int):
        self.swarm_id = manifest.swarm_id
        self.num_shards = num_shards
        # client mode: a follower behind NAT works, and nobody routes DHT traffic through it
        self.dht = start_dht(initial_peers=initial_peers, host_maddrs=None, client_mode=True,
                             record_validators=[RecordsValidator(self.swarm_id)])
        try:
            check_membership(self.dht, manifest, initial_peers, announce=False)
            self.members = Membership(self.dht, swarm_id=self.swarm_id, trained=(), peer_ttl=manifest.averaging.peer_ttl,
                                      initial_peers=initial_peers, heartbeat=False)
        except BaseException:
            self.dht.shutdown()
            raise

    def newest(self) -> tuple[int, dict[int, str], dict[int, list[str]]] | None:
        """The state to hold now, from a fresh peer view (see quorum.followed_state)."""
        return quorum.followed_state(quorum.others(self.members.view(), self.members.peer_id), self.num_shards)

    def trainers(self) -> int:
        """Trainers in the last view read (for status lines)."""
        return sum(1 for i in self.members.last_view().values() if i.shards)

    def fetch(self, shard: int, donors: Sequence[str], chunk_timeout: float = CHUNK_TIMEOUT_S
              ) -> tuple[str, StateMeta, list[torch.Tensor]] | None:
        """Shard state from the first of `donors` that serves it: (donor, metadata, tensors), or None.
        The tensors are what the donor's node publishes: adapter tensors, then AdamW moments."""
        if not donors:
            return None
        donors = list(donors)[:MAX_DONORS]
        job = partial(first_state_in_dht, prefix=f"{self.swarm_id}/shard-{shard}", donors=donors, chunk_timeout=chunk_timeout)
        try:
            # each donor is bounded by its connect and per-chunk timeouts; this bound only guards against a dead
            # DHT process (a large shard over a slow link may take minutes)
            result = self.dht.run_coroutine(job, return_future=True).result(timeout=OUTER_TIMEOUT_S + len(donors) * chunk_timeout)
        except Exception as e:  # a timeout, or the DHT process is gone
            logger.warning("shard %d: state download failed: %s", shard, e)
            return None
        if not result:
            return None
        donor, meta, tensors = result
        try:
            return donor, StateMeta.from_wire(meta), list(tensors)
        except (TypeError, KeyError, ValueError, AttributeError):
            logger.warning("shard %d: peer %s… sent malformed state metadata %r; ignored", shard, str(donor)[:16], meta)
            return None

    def shutdown(self) -> None:
        self.dht.shutdown()
