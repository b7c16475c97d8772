"""Who is in the swarm: heartbeats, the peer view, re-dialling after a partition, the member check.

Every node stores a heartbeat under `<swarm_id>/peers` (subkey: its peer id) every
peer_ttl/4 seconds: its round, the shards it trains, their hashes at the start of that
round, its addresses (none when it is outbound-only), its reachability, whether it is
downloading state. `Membership.view()` reads them back
into `PeerInfo`s; `node.swarm.quorum` decides from one such view.

The member check (`check_membership`) runs once at start: a newcomer whose initial peers
train another swarm is told which manifest fields differ instead of training alone.
`check_no_twin` runs right after it: a node whose peer id already has a live heartbeat (another
machine runs the same key) is refused before it publishes anything under that id.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Sequence

from node.manifest import Manifest, manifest_diff
from node.swarm.averager import CONNECT_TIMEOUT_S, dial_and_ping
from node.swarm.dht import SwarmError, dht_time

logger = logging.getLogger(__name__)

REDIAL_FOR = 3600.0  # seconds a peer that vanished is still re-dialled (a partition may heal)
REDIAL_BATCH = 16  # peers re-dialled per heartbeat at most
MEMBERS_KEY = "swarmtune/members"


@dataclass
class PeerInfo:
    peer_id: str
    round: int
    shards: tuple[int, ...]
    maddrs: tuple[str, ...]
    samples_per_s: float
    expires_at: float
    syncing: bool = False  # downloading state: not a trainer this round
    shard_hashes: dict = field(default_factory=dict)  # shard -> hash of its trained shards at the start of `round`
    complete: int = -1  # the last round at which it held every shard, untrained ones too (-1: not said)
    reach: str = "public"  # public | relayed | outbound-only (node/swarm/reach.py); old peers say nothing: public


def parse_heartbeat(subkey: str, value: dict, expires_at: float) -> PeerInfo:
    """A heartbeat as stored in the DHT -> PeerInfo; raises TypeError/KeyError/ValueError when malformed."""
    return PeerInfo(
        peer_id=str(subkey), round=int(value["round"]), shards=tuple(int(s) for s in value["shards"]),
        maddrs=tuple(str(a) for a in value.get("maddrs", ())), samples_per_s=float(value.get("sps", 0.0)),
        expires_at=float(expires_at), syncing=bool(value.get("syncing", False)),
        shard_hashes={int(k): str(h) for k, h in dict(value.get("hashes") or {}).items()},
        complete=int(value.get("complete", -1)), reach=str(value.get("reach", "public")),
    )


class Membership:
    """This node's heartbeat and its view of the others. Thread-safe; one heartbeat thread."""

    def __init__(self, dht, *, swarm_id: str, trained: Sequence[int], peer_ttl: float, initial_peers: Sequence[str] = (),
                 heartbeat: bool = True, reach: str = "public"):
        """`heartbeat=False`: only read the view (a follower such as `serve --swarm`, which must not look
        like a peer to the trainers: it neither publishes a heartbeat nor re-dials)."""
        self.dht = dht
        self.peer_id = str(dht.peer_id)
        self.peers_key = f"{swarm_id}/peers"
        self.peer_ttl = peer_ttl
        self.lookup_timeout = max(2.0, peer_ttl / 2)  # a slower lookup falls back on the last view
        self._pending_stores: list = []
        self._pending_lock = threading.Lock()
        self._heartbeat: dict[str, Any] = {"round": 0, "shards": list(trained), "sps": 0.0, "syncing": False, "reach": reach}
        self.dialable = reach != "outbound-only"  # an outbound-only node publishes no addresses: nobody could dial them
        self.left: set[str] = set()  # peers that announced they left (not a split)
        # peers seen before, for re-dialling after a partition: {peer_id: (addresses, last seen)}
        self._known: dict[str, tuple[tuple[str, ...], float]] = {}
        self._known_lock = threading.Lock()
        for maddr in initial_peers:
            if "/p2p/" in maddr:
                base, pid = maddr.rsplit("/p2p/", 1)
                old = self._known.get(pid, ((), 0.0))[0]
                self._known[pid] = ((*old, base), time.time())
        self._last_view: dict[str, PeerInfo] = {}  # the freshest heartbeat seen from each peer
        self._view_lock = threading.Lock()
        self._lookups_failing = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat_loop, name="swarm-heartbeat", daemon=True)
        if heartbeat:
            self._thread.start()

    def visible_maddrs(self) -> list[str]:
        return [str(a) for a in self.dht.get_visible_maddrs()]

    # ------------------------------------------------------------------ heartbeat

    def announce(self, **fields) -> None:
        """Update what this node tells the swarm (round, samples/s, ...) and publish it now."""
        self._heartbeat.update(fields)
        self._publish_heartbeat()

    def _publish_heartbeat(self) -> None:
        """Store the heartbeat without waiting: right after a partition a store can take ~6 s (it waits on
        unreachable replicas), and a blocking store would let our entry expire at the peers we still reach.
        A later store always wins (its expiration time is later)."""
        value = dict(self._heartbeat, maddrs=self.visible_maddrs() if self.dialable else [], v=1)
        with self._pending_lock:
            still = []
            for fut in self._pending_stores:
                if not fut.done():
                    still.append(fut)
                elif fut.exception() is not None:
                    logger.warning("could not publish heartbeat to the DHT: %s", fut.exception())
            self._pending_stores = still
            try:
                self._pending_stores.append(self.dht.store(
                    self.peers_key, subkey=self.peer_id, value=value, expiration_time=dht_time() + self.peer_ttl,
                    return_future=True))
            except Exception as e:  # the DHT process is gone (hivemind raises whatever its pipe raised)
                logger.warning("could not publish heartbeat to the DHT: %s", e)

    def _heartbeat_loop(self) -> None:
        redialling = None
        while not self._stop.wait(max(0.5, self.peer_ttl / 4)):
            self._publish_heartbeat()
            if redialling is None or not redialling.is_alive():  # a redial waits on dead addresses; never block heartbeats on it
                redialling = threading.Thread(target=self.redial, name="swarm-redial", daemon=True)
                redialling.start()

    def redial(self) -> list[str]:
        """Dial peers seen in the last REDIAL_FOR seconds that are not visible now; returns those that answered.

        When a partition heals, nothing in the DHT brings the sides back together: each side dropped
        the other from its routing table when requests failed, so both keep a consistent but split
        view forever. Re-dialling known peers (and the initial peers) puts them back in the routing
        table, and the next heartbeat reaches them."""
        now = time.time()
        with self._view_lock:
            visible = set(self._last_view)
        with self._known_lock:
            for pid in [p for p, (_, seen) in self._known.items() if now - seen > REDIAL_FOR]:
                del self._known[pid]
            candidates = sorted(
                ((seen, pid, addrs) for pid, (addrs, seen) in self._known.items()
                 if pid != self.peer_id and pid not in visible and pid not in self.left and addrs),
                reverse=True,
            )[:REDIAL_BATCH]
        missing = [(pid, addrs) for _, pid, addrs in candidates]
        if not missing:
            return []
        try:
            # bounded: hivemind's DHT process keeps no reference to the task running a coroutine, and one seen
            # collected while pending (asyncio: "Task was destroyed but it is pending!") never answers; an
            # unbounded wait here would stop this node's heartbeats
            back = self.dht.run_coroutine(partial(dial_and_ping, missing, CONNECT_TIMEOUT_S),
                                          return_future=True).result(timeout=3 * CONNECT_TIMEOUT_S + 5)
        except Exception as e:  # the DHT process is gone, its pipe broke, or no answer in time
            logger.warning("re-dialling %d peer(s) failed: %r", len(missing), e)
            return []
        if back:
            logger.info("reached %d peer(s) again: %s", len(back), ", ".join(p[:12] + "…" for p in back))
        return back

    # ------------------------------------------------------------------ the view

    def view(self) -> dict[str, PeerInfo]:
        """Live peers of this swarm (this node included), from the DHT; malformed entries are skipped.

        A lookup is bounded (a traversal that waits on unreachable nodes, as right after a partition,
        can take ~10 s); a peer seen in an earlier lookup stays listed until its heartbeat expires,
        so one slow or failed lookup never makes the swarm look empty. When every lookup fails (the
        DHT process is gone) that is logged, and the view empties as the heartbeats expire."""
        # two reads: what peers stored on this node (latest=False stops at a fresh local value: instant,
        # and it keeps working when a traversal waits on unreachable nodes), and a traversal of the DHT
        # for the heartbeats stored elsewhere (large swarms), waited for briefly when the local read had data
        errors = []
        local = found = None
        try:
            network = self.dht.get(self.peers_key, latest=True, return_future=True)
        except Exception as e:  # the DHT process is gone (hivemind raises whatever its pipe raised)
            errors, network = [e, e], None
        if network is not None:
            try:
                local = self.dht.get(self.peers_key, latest=False, return_future=True).result(timeout=self.lookup_timeout)
            except Exception as e:  # TimeoutError, or the DHT process is gone
                errors.append(e)
            try:
                found = network.result(timeout=0.5 if local is not None else self.lookup_timeout)
            except Exception as e:
                errors.append(e)
        failing = len(errors) == 2
        if failing and not self._lookups_failing:
            logger.warning("peer lookups in the DHT fail (%s); using the heartbeats seen before until they expire",
                           "; ".join(f"{type(e).__name__}: {e}" for e in errors))
        elif not failing and self._lookups_failing:
            logger.info("peer lookups in the DHT work again")
        self._lookups_failing = bool(failing)
        with self._view_lock:
            self._merge_view(local)
            return self._merge_view(found)

    def last_view(self) -> dict[str, PeerInfo]:
        """The view as the last lookup left it (no DHT work): for readers off the training thread."""
        now = dht_time()
        with self._view_lock:
            return {p: i for p, i in self._last_view.items() if i.expires_at > now}

    def _merge_view(self, found) -> dict[str, PeerInfo]:
        now = dht_time()
        if found is not None and isinstance(found.value, dict):
            for subkey, item in found.value.items():
                value = getattr(item, "value", None)
                if value is None:  # a peer that left cleanly
                    self.left.add(str(subkey))
                    self._last_view.pop(str(subkey), None)
                    continue
                self.left.discard(str(subkey))
                try:
                    info = parse_heartbeat(subkey, value, item.expiration_time)
                except (TypeError, KeyError, ValueError, AttributeError) as e:
                    logger.warning("ignoring malformed peer entry %r in the DHT: %s", subkey, e)
                    continue
                old = self._last_view.get(info.peer_id)
                if old is None or info.expires_at >= old.expires_at:
                    self._last_view[info.peer_id] = info
        out = {pid: info for pid, info in self._last_view.items() if info.expires_at > now}
        self._last_view = dict(out)
        for info in out.values():
            addrs = tuple(a.split("/p2p/")[0] for a in info.maddrs if a)
            with self._known_lock:
                self._known[info.peer_id] = (addrs or self._known.get(info.peer_id, ((), 0.0))[0], time.time())
        return out

    def wait_for_peers(self, n: int, timeout: float) -> dict[str, PeerInfo]:
        deadline = time.monotonic() + timeout
        while True:
            peers = self.view()
            if len(peers) >= n or time.monotonic() > deadline:
                return peers
            time.sleep(0.25)

    def leave(self) -> None:
        """Stop the heartbeat and tell peers we left (bounded: a dead p2pd must not hang the exit)."""
        self._stop.set()
        try:
            self.dht.store(self.peers_key, subkey=self.peer_id, value=None, expiration_time=dht_time() + 1,
                           return_future=True).result(timeout=2)
        except Exception as e:  # best effort: peers see our heartbeat expire instead
            logger.info("could not announce leaving: %s", e)


def check_membership(dht, manifest: Manifest, initial_peers: Sequence[str], *, announce: bool = True) -> None:
    """Announce which swarm this node is in, and refuse to join through peers of another swarm.

    Every node stores its swarm id and canonical manifest under `swarmtune/members`. A
    newcomer whose initial peers all train a different swarm gets the exact manifest fields
    that differ (SwarmError), instead of silently training alone. `announce=False` only checks
    (a follower is not a member).
    """
    me = str(dht.peer_id)
    mine = manifest.to_dict()
    if announce:
        dht.store(MEMBERS_KEY, subkey=me, value={"swarm_id": manifest.swarm_id, "name": manifest.name, "manifest": mine},
                  expiration_time=dht_time() + 3600)
    wanted = {a.rsplit("/p2p/", 1)[-1] for a in initial_peers if "/p2p/" in a}
    if not wanted:
        return
    found = dht.get(MEMBERS_KEY, latest=True)
    entries = found.value if found is not None and isinstance(found.value, dict) else {}
    others = {}
    for pid, item in entries.items():
        value = getattr(item, "value", None)
        if str(pid) in wanted and isinstance(value, dict) and isinstance(value.get("swarm_id"), str):
            others[str(pid)] = value
    if not others or any(v["swarm_id"] == manifest.swarm_id for v in others.values()):
        return
    pid, theirs = next(iter(others.items()))
    diffs = manifest_diff(theirs.get("manifest") if isinstance(theirs.get("manifest"), dict) else {}, mine)
    shown = "; ".join(f"{k}: theirs {a!r}, yours {b!r}" for k, a, b in diffs[:8]) or "(their manifest was not readable)"
    raise SwarmError(
        f"the initial peer {pid[-12:]} trains swarm '{theirs.get('name')}' ({theirs['swarm_id'][:16]}…), but your manifest "
        f"hashes to {manifest.swarm_id[:16]}…: the manifests differ in {shown}. Get that swarm's manifest file and pass it "
        "with --manifest (every node of a swarm must hold the same one)"
    )


def check_no_twin(dht, swarm_id: str, peer_ttl: float, peer_id: str | None = None) -> None:
    """Refuse to start when another process in the swarm runs with this node's peer id (the same key on
    another machine; on one machine the key lock in node.identity refuses it first).

    Nothing under our id has been published yet, so a heartbeat for it is someone else's, or the
    leftover of our own previous run that crashed. The two are told apart by waiting one heartbeat
    period: a live twin refreshes its heartbeat (a later expiration), a leftover does not. `peer_id`: the id
    to look for when `dht` is not this node's own (a throwaway reader)."""
    me = peer_id or str(dht.peer_id)
    key = f"{swarm_id}/peers"

    def theirs() -> PeerInfo | None:
        try:
            found = dht.get(key, latest=True, return_future=True).result(timeout=max(2.0, peer_ttl / 2))
        except Exception as e:  # a failed or slow lookup must not stop a node; the twin is then seen by the swarm instead
            logger.info("could not look up peers to check for another node with this key: %s", e)
            return None
        item = found.value.get(me) if found is not None and isinstance(found.value, dict) else None
        value = getattr(item, "value", None)
        if not isinstance(value, dict):
            return None
        try:
            return parse_heartbeat(me, value, item.expiration_time)
        except (TypeError, KeyError, ValueError, AttributeError):
            return None

    first = theirs()
    looked_at = dht_time()
    if first is None or first.expires_at <= looked_at:
        return
    time.sleep(max(0.5, peer_ttl / 4) + 1.0)  # one heartbeat period (Membership._heartbeat_loop), plus the store
    again = theirs()
    # refreshed, and stored after we first looked (a replica that lagged behind could make a dead node's
    # last heartbeat look newer the second time; a store made after our first look is a live process's)
    if again is not None and again.expires_at > first.expires_at and again.expires_at - peer_ttl > looked_at - 1.0:
        from node.identity import second_node_message

        raise SwarmError(second_node_message(me, again.maddrs))
    logger.info("a heartbeat of this peer id from a previous run (%s) was not refreshed: it is ours, not another node's",
                ", ".join(first.maddrs) or "no address")
