"""The node's view of the swarm: the only place that talks to hivemind's DHT and averagers.

One `Swarm` per node process owns:
- a `hivemind.DHT` (its own p2pd on the given multiaddrs, optionally with the node's
  Ed25519 key as libp2p identity);
- one `ShardAverager` per adapter shard, under the hivemind prefix `<swarm_id>/shard-<k>`,
  so only the trainers of shard k ever average shard k;
- the peer registry `<swarm_id>/peers` in the DHT (heartbeats: round, shards, addresses).

Exact averaging. hivemind's reducer sums parts in a float32 accumulator and hands every
peer `local + (average - local)`, which is not bit-identical across peers for arbitrary
floats. Peers therefore contribute fixed-point integers (gradients scaled by 2**bits),
split into four 10-bit limbs; each limb travels as the float32 `limb * 64 + 1`. Sums of
up to 32 peers stay below 2**21, where float32 is exact in any order, and the rounding of
`average` stays far below 1/group_size, so `round(average * group_size)` recovers the
exact integer sum on every peer: same inputs, same bits out, whatever the reduction order.
The `+ 1` counts contributors: its sum's low 6 bits must equal the group size. hivemind
reports success even when parts were lost, so three checks catch them: a part this peer
never got back (the runner's failure count), a part some reducer averaged without one of
its senders (`_StrictPartReducer` turns it into NaN for everyone), and the count bits.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Sequence

import torch

import hivemind
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging import allreduce as hivemind_allreduce
from hivemind.averaging.partition import TensorPartReducer
from hivemind.utils import get_dht_time

from node.swarm.deadline import AveragingDeadline, allreduce_bytes

logger = logging.getLogger(__name__)

LIMB_BITS = 10
NUM_LIMBS = 4
COUNT_BITS = 6  # low bits of each transmitted limb count the peers that contributed
# a peer's integers must satisfy |x| < MAX_PEER_INT (offset binary in four 10-bit limbs)
MAX_PEER_INT = 2 ** (LIMB_BITS * NUM_LIMBS - 1)
ROUND_BITS = 16  # low bits of the round number in the matchmaking key
MAX_GROUP = 32  # keeps limb sums < 2**21 and the recovery error < 0.5
FAILED_KEY = "__swarmtune_failed_values__"
ELAPSED_KEY = "__swarmtune_allreduce_seconds__"
BYTES_PER_VALUE = 4 * NUM_LIMBS  # on the wire: NUM_LIMBS float32 per gradient value
STATE_BYTES_PER_VALUE = 12  # a state download: the adapter and AdamW's two moments, float32
REDIAL_FOR = 3600.0  # seconds a peer that vanished is still re-dialled (a partition may heal)
REDIAL_BATCH = 16  # peers re-dialled per heartbeat at most
PROBE_BYTES = 2 << 20  # a link probe before the first all-reduce: this many bytes ...
PROBE_S = 5.0  # ... or this many seconds, whichever comes first
CONNECT_TIMEOUT_S = 5.0  # opening a connection or a stream to a peer (latency-bound, not size-bound)
MAX_DONORS = 4  # donors tried per state download


def encode_limbs(x: torch.Tensor) -> torch.Tensor:
    """int64 vector (|x| < MAX_PEER_INT) -> float32 vector of NUM_LIMBS * len(x) exact small integers."""
    if x.numel() and int(x.abs().max()) >= MAX_PEER_INT:
        raise ValueError("fixed-point value out of range; lower [averaging] fixed_point_bits")
    u = x.to(torch.int64) + MAX_PEER_INT
    mask = (1 << LIMB_BITS) - 1
    limbs = [(((u >> (LIMB_BITS * j)) & mask) << COUNT_BITS) + 1 for j in range(NUM_LIMBS)]
    return torch.cat(limbs).to(torch.float32)


def decode_limb_average(avg: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """The group's average of encoded vectors -> (exact int64 sum of the integers, #values short of contributors)."""
    sums = torch.round(avg.to(torch.float64) * group_size).to(torch.int64)
    short = int(((sums & ((1 << COUNT_BITS) - 1)) != group_size).sum())
    parts = (sums >> COUNT_BITS).view(NUM_LIMBS, -1)
    total = sum(parts[j] << (LIMB_BITS * j) for j in range(NUM_LIMBS))
    return total - group_size * MAX_PEER_INT, short


class _StrictPartReducer(TensorPartReducer):
    """hivemind's reducer, except that a part averaged without every sender comes out as NaN.

    hivemind divides each part by the weight it actually received, so a sender that dropped out
    mid all-reduce silently turns that part into the mean of the others (with two peers: one
    peer's own gradient), and no in-band count can notice: the mean of the count sentinels is
    still exactly one. A NaN part reaches every groupmate, each discards the round, and the
    swarm retries it without the dead peer: nothing it half-sent is counted or credited."""

    def check_current_part_finished(self):
        if self.current_part_accumulated_from == self.num_current_senders < self.num_senders:
            self.accumulator.fill_(float("nan"))
            self.denominator = 1.0
        super().check_current_part_finished()


# AllReduceRunner builds its reducer from this module-level name; averager processes inherit it
hivemind_allreduce.TensorPartReducer = _StrictPartReducer


class SwarmError(RuntimeError):
    """The p2p layer cannot start or reach the swarm; the message names the cause and the fix."""


class ShardAverager(DecentralizedAverager):
    """A hivemind averager over one float32 buffer: a shard's fixed-point gradient in limbs.

    Its state-sharing RPC serves whatever the node last published for this shard
    (adapter tensors + optimizer state + round), captured at a round boundary.
    """

    def __init__(self, numel: int, **kwargs):
        self.buffer = torch.zeros(NUM_LIMBS * numel, dtype=torch.float32)
        self._published: tuple[Any, list[torch.Tensor]] | None = None
        self._published_lock = threading.Lock()
        super().__init__([self.buffer], **kwargs)

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
        """Runs in the averager process; remembers how many values came back un-averaged."""
        gid = group_info.group_id if group_id is None else group_id
        await super()._run_allreduce_inplace_(tensors, group_info, group_id=group_id, **kwargs)
        runner = self._running_groups[gid].result()
        self._failed_values = int(runner.tensor_part_container.failed_size)

    async def _aggregate_with_group(self, group_info, min_vector_size: int, **kwargs):
        # hivemind returns success even when parts were lost; pass the count back with the gathered data,
        # and how long the all-reduce itself took (matchmaking excluded), which measures the links
        self._failed_values = 0
        started = time.perf_counter()
        gathered = dict(await super()._aggregate_with_group(group_info, min_vector_size, **kwargs))
        gathered[ELAPSED_KEY] = time.perf_counter() - started
        if self._failed_values:
            gathered[FAILED_KEY] = self._failed_values
        return gathered

    async def _set_deadline(self, seconds: float, future) -> None:
        """Runs in the averager process: the all-reduce deadline, and its per-chunk timeouts in the same
        proportions as at construction (a sender may stall half of it, a reducer all of it)."""
        self._allreduce_timeout = seconds
        self.next_chunk_timeout = seconds / 2
        self.allreduce_kwargs["sender_timeout"] = seconds / 2
        self.allreduce_kwargs["reducer_timeout"] = seconds
        future.set_result(None)

    def set_deadline(self, seconds: float) -> None:
        from hivemind.utils import MPFuture

        future = MPFuture()
        self._outer_pipe.send(("_set_deadline", [], dict(seconds=seconds, future=future)))
        future.result(timeout=30)

    async def _download_state_from(self, donors: list[str], chunk_timeout: float, future) -> None:
        """Runs in the averager process: hivemind's state download, but from donors the caller chose, in
        the caller's order, and saying which donor sent it. (hivemind's load_state_from_peers orders
        donors by a priority each peer declares about itself: one peer declaring a huge priority would be
        every newcomer's first and only donor, and a corrupt one would keep them from ever syncing.)"""
        from hivemind.compression import deserialize_torch_tensor
        from hivemind.p2p import PeerID
        from hivemind.proto import averaging_pb2
        from hivemind.utils.asyncio import aiter_with_timeout
        from hivemind.utils.streaming import combine_from_streaming

        try:
            for donor in donors:
                try:
                    peer = PeerID.from_base58(donor)
                    if peer == self.peer_id:
                        continue
                    stub = self.get_stub(self._p2p, peer, namespace=self.prefix)
                    # opening the stream is latency-bound: an unreachable donor must not cost the whole deadline
                    stream = await asyncio.wait_for(stub.rpc_download_state(averaging_pb2.DownloadRequest()),
                                                    timeout=min(chunk_timeout, CONNECT_TIMEOUT_S))
                    metadata, parts, tensors = None, [], []
                    async for message in aiter_with_timeout(stream, timeout=chunk_timeout):
                        if message.metadata:
                            metadata = self.serializer.loads(message.metadata)
                        if message.tensor_part.dtype and parts:  # a dtype starts the next tensor
                            tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
                            parts = []
                        parts.append(message.tensor_part)
                    if parts:
                        tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
                    if metadata is not None:
                        future.set_result((donor, metadata, tensors))
                        return
                except Exception as e:  # an unreachable or misbehaving donor: try the next
                    logger.info("state download from %s failed: %r", donor[:16], e)
        finally:
            if not future.done():
                future.set_result(None)

    def download_state_from(self, donors: Sequence[str], timeout: float):
        """(donor, metadata, tensors) from the first of `donors` that sends its state, or None."""
        from hivemind.utils import MPFuture

        future = MPFuture()
        self._outer_pipe.send(("_download_state_from", [], dict(donors=list(donors), chunk_timeout=timeout, future=future)))
        return future.result(timeout=timeout * max(1, len(donors)) + 5)

    def publish_state(self, metadata: dict, tensors: Sequence[torch.Tensor]) -> None:
        with self._published_lock:
            self._published = (metadata, [t.detach().cpu().clone() for t in tensors])

    def get_current_state(self):
        with self._published_lock:
            if self._published is None:
                return None, [], None
            meta, tensors = self._published
            return meta, tensors, None

    async def _set_target_group_size(self, size: int, future) -> None:
        """Runs in the averager process: a group assembles as soon as `size` peers joined."""
        mm = self._matchmaking
        keys = mm.group_key_manager
        if not getattr(keys, "_swarmtune_fixed", False):
            # the key is set per round by set_group_bits; hivemind's moshpit re-keying would only fight
            # that, and it crashes (random.sample) when a group outgrows target_group_size
            async def _keep_key(*_args, **_kwargs):
                return None

            keys.update_key_on_group_assembled = _keep_key
            keys.update_key_on_not_enough_peers = _keep_key
            keys._swarmtune_fixed = True
        mm.target_group_size = size
        mm.potential_leaders.target_group_size = size
        mm.group_key_manager.target_group_size = size
        future.set_result(None)

    def set_target_group_size(self, size: int) -> None:
        from hivemind.utils import MPFuture

        future = MPFuture()
        self._outer_pipe.send(("_set_target_group_size", [], dict(size=size, future=future)))
        future.result()


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


def start_dht(
    *,
    initial_peers: Sequence[str] = (),
    host_maddrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
    announce_maddrs: Sequence[str] = (),
    identity_path: str | None = None,
    record_validators: Sequence = (),
    startup_timeout: float = 30,
    retries: int = 2,
) -> hivemind.DHT:
    """Start the DHT + p2pd, turning hivemind's opaque failures into a cause and a fix."""
    kwargs: dict[str, Any] = dict(
        initial_peers=list(initial_peers),
        host_maddrs=list(host_maddrs),
        start=True,
        record_validators=list(record_validators),
        startup_timeout=startup_timeout,
    )
    if announce_maddrs:
        kwargs["announce_maddrs"] = list(announce_maddrs)
    if identity_path:
        kwargs["identity_path"] = identity_path
        kwargs["check_if_identity_free"] = False
    last: BaseException | None = None
    for attempt in range(retries + 1):
        try:
            return hivemind.DHT(**kwargs)
        except Exception as e:  # hivemind raises P2PDaemonError, RuntimeError, ValueError, ... for the same situations
            last = e
            text = str(e).lower()
            # only "nobody answered yet" is worth retrying (the first node may still be starting); a taken
            # port, a malformed address or a bad key fails the same way every time
            if "bootstrap" not in text or attempt == retries:
                break
            delay = min(2.0 * 2**attempt, 10.0)
            logger.warning("no initial peer answered (attempt %d of %d); retrying in %.0f s", attempt + 1, retries + 1, delay)
            time.sleep(delay)
    raise SwarmError(_explain_dht_failure(last, initial_peers, host_maddrs)) from last


def _explain_dht_failure(e: BaseException, initial_peers, host_maddrs) -> str:
    text = f"{type(e).__name__}: {e}"
    low = text.lower()
    if "address already in use" in low or "bind" in low:
        fix = f"another process holds the port in {list(host_maddrs)}; pick another with --host-maddrs or use port 0"
    elif "failed to connect to bootstrap" in low or "initial_peers" in low or "unable to connect" in low:
        fix = f"none of the initial peers {list(initial_peers)} answered; check the addresses (copy them from the first node's log) and that their ports are reachable"
    elif "multiaddr" in low or "invalid" in low or "protocol" in low:
        fix = "an address is malformed; multiaddrs look like /ip4/127.0.0.1/tcp/31337/p2p/12D3KooW..."
    elif "identity" in low or "private key" in low:
        fix = "the identity key could not be used by p2pd; check --key (swarmtune keygen --show)"
    else:
        fix = "run `swarmtune doctor` for a step-by-step check of the p2p daemon"
    return f"the p2p daemon (hivemind DHT) failed to start: {text}. Fix: {fix}"


async def _redial(peers: list[tuple[str, tuple[str, ...]]], timeout: float, _dht, node) -> list[str]:
    """Runs in the DHT process: connect to each peer at its last known addresses and ping it, which
    puts it back in the routing table of both sides. Returns the peers that answered."""
    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    try:
        connected = {str(info.peer_id) for info in await node.p2p.list_peers()}
    except Exception:
        connected = set()

    async def one(pid: str, addrs: tuple[str, ...]) -> str | None:
        try:
            peer = PeerID.from_base58(pid)
            if pid not in connected:  # a dial to a connected peer is useless, and a cancelled one backs off its dials
                # hivemind has no public "dial this address"; the p2pd client's connect is what bootstrap uses too
                await asyncio.wait_for(node.p2p._client.connect(peer, [Multiaddr(a) for a in addrs]), timeout)
            return pid if await node.protocol.call_ping(peer) is not None else None
        except Exception:
            return None

    found = await asyncio.gather(*(one(pid, addrs) for pid, addrs in peers))
    return [pid for pid in found if pid]


class Swarm:
    """DHT membership, per-shard exact gradient all-reduce, and shard state download."""

    def __init__(
        self,
        dht: hivemind.DHT,
        *,
        swarm_id: str,
        shard_sizes: Sequence[int],
        trained_shards: Sequence[int],
        matchmaking_time: float,
        allreduce_timeout: float,
        peer_ttl: float,
        initial_peers: Sequence[str] = (),
    ):
        self.dht = dht
        self.swarm_id = swarm_id
        self.peer_id = str(dht.peer_id)
        self.trained = tuple(sorted(trained_shards))
        self.matchmaking_time = matchmaking_time
        self.allreduce_timeout = allreduce_timeout  # the deadline now in force (see node/swarm/deadline.py)
        self.deadline = AveragingDeadline(allreduce_timeout)
        self.shard_sizes = list(shard_sizes)
        # a group forms within ~one matchmaking window once peers are there; waiting longer only delays the resync
        self.find_group_timeout = 2 * matchmaking_time + 2.0
        self.peer_ttl = peer_ttl
        self.averagers: dict[int, ShardAverager] = {}
        for k, numel in enumerate(shard_sizes):
            self.averagers[k] = ShardAverager(
                numel,
                dht=dht,
                prefix=f"{swarm_id}/shard-{k}",
                start=True,
                target_group_size=None,
                min_group_size=2,
                initial_group_bits="0" * ROUND_BITS,
                min_matchmaking_time=matchmaking_time,
                request_timeout=max(0.5, matchmaking_time / 2),
                allreduce_timeout=allreduce_timeout,
                next_chunk_timeout=allreduce_timeout / 2,
                allow_state_sharing=k in self.trained,
                declare_state_period=max(2.0, peer_ttl / 3),
            )
        self._pending_stores: list = []
        self._pending_lock = threading.Lock()
        self._heartbeat: dict[str, Any] = {"round": 0, "shards": list(self.trained), "sps": 0.0, "syncing": False}
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
        self.lookup_timeout = max(2.0, peer_ttl / 2)  # a slower lookup falls back on the last view
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat_loop, name="swarm-heartbeat", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ membership

    @property
    def peers_key(self) -> str:
        return f"{self.swarm_id}/peers"

    def visible_maddrs(self) -> list[str]:
        return [str(a) for a in self.dht.get_visible_maddrs()]

    def announce(self, **fields) -> None:
        """Update what this node tells the swarm (round, samples/s, ...) and publish it now."""
        self._heartbeat.update(fields)
        self._publish_heartbeat()

    def _publish_heartbeat(self) -> None:
        """Store the heartbeat without waiting: right after a partition a store can take ~6 s (it waits on
        unreachable replicas), and a blocking store would let our entry expire at the peers we still reach.
        A later store always wins (its expiration time is later)."""
        value = dict(self._heartbeat, maddrs=self.visible_maddrs(), v=1)
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
                    self.peers_key, subkey=self.peer_id, value=value, expiration_time=get_dht_time() + self.peer_ttl,
                    return_future=True))
            except Exception as e:  # the DHT process is gone
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
            back = self.dht.run_coroutine(partial(_redial, missing, CONNECT_TIMEOUT_S))
        except Exception as e:
            logger.debug("re-dialling peers failed: %s", e)
            return []
        if back:
            logger.info("reached %d peer(s) again: %s", len(back), ", ".join(p[:12] + "…" for p in back))
        return back

    def peers(self) -> dict[str, PeerInfo]:
        """Live peers of this swarm (this node included), from the DHT; malformed entries are skipped.

        A lookup is bounded (a traversal that waits on unreachable nodes, as right after a partition,
        can take ~10 s); a peer seen in an earlier lookup stays listed until its heartbeat expires,
        so one slow or failed lookup never makes the swarm look empty."""
        # two reads: what peers stored on this node (latest=False stops at a fresh local value: instant,
        # and it keeps working when a traversal waits on unreachable nodes), and a traversal of the DHT
        # for the heartbeats stored elsewhere (large swarms), waited for briefly when the local read had data
        network = self.dht.get(self.peers_key, latest=True, return_future=True)
        try:
            local = self.dht.get(self.peers_key, latest=False, return_future=True).result(timeout=self.lookup_timeout)
        except Exception as e:  # TimeoutError, or the DHT process is gone
            logger.debug("local peer lookup failed (%s)", type(e).__name__)
            local = None
        try:
            found = network.result(timeout=0.5 if local is not None else self.lookup_timeout)
        except Exception as e:
            logger.debug("peer lookup failed (%s); using the last view", type(e).__name__)
            found = None
        with self._view_lock:
            self._merge_view(local)
            return self._merge_view(found)

    def _merge_view(self, found) -> dict[str, PeerInfo]:
        now = get_dht_time()
        if found is not None and isinstance(found.value, dict):
            for subkey, item in found.value.items():
                value = getattr(item, "value", None)
                if value is None:  # a peer that left cleanly
                    self.left.add(str(subkey))
                    self._last_view.pop(str(subkey), None)
                    continue
                self.left.discard(str(subkey))
                try:
                    shards = tuple(int(s) for s in value["shards"])
                    info = PeerInfo(
                        peer_id=str(subkey), round=int(value["round"]), shards=shards,
                        maddrs=tuple(str(a) for a in value.get("maddrs", ())), samples_per_s=float(value.get("sps", 0.0)),
                        expires_at=float(item.expiration_time), syncing=bool(value.get("syncing", False)),
                        shard_hashes={int(k): str(h) for k, h in dict(value.get("hashes") or {}).items()},
                    )
                except (TypeError, KeyError, ValueError) as e:
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
            peers = self.peers()
            if len(peers) >= n or time.monotonic() > deadline:
                return peers
            time.sleep(0.25)

    # ------------------------------------------------------------------ averaging

    def allreduce_sums(
        self, contributions: dict[int, torch.Tensor], gather: dict, expected: dict[int, int], *, round_: int
    ) -> dict[int, tuple[torch.Tensor, dict[str, dict]] | None]:
        """Sum each shard's int64 vector over the shard's group, exactly and identically on every member.

        `expected[k]` is how many trainers of shard k this node sees: the group assembles as
        soon as that many joined (else after the matchmaking time, with whoever came).
        The round number is part of the matchmaking key, so peers in different rounds never
        average together (a straggler cannot pollute the next round).
        Returns, per shard, (exact int64 sum, {peer_id: gathered metadata}) or None when no
        group formed in time.
        """
        planned = self.allreduce_bytes({k: expected.get(k, 2) for k in contributions})
        self._apply_deadline(self.deadline.seconds_for(planned))
        controls = {}
        for k, vec in contributions.items():
            avg = self.averagers[k]
            encoded = encode_limbs(vec)
            with avg.get_tensors() as (buf,):
                buf.copy_(encoded)
            avg.set_target_group_size(max(2, min(expected.get(k, 2), MAX_GROUP)))
            avg.set_group_bits(format(round_ % (1 << ROUND_BITS), f"0{ROUND_BITS}b"))
            controls[k] = avg.step(gather=gather, weight=1.0, timeout=self.find_group_timeout, wait=False, allow_retries=True)
        results: dict[int, tuple[torch.Tensor, dict[str, dict]] | None] = {}
        moved, elapsed, slow = 0, 0.0, False
        for k, control in controls.items():
            try:
                gathered = control.result(timeout=self.find_group_timeout + self.allreduce_timeout + 5)
            except Exception as e:
                logger.warning("shard %d: averaging failed (%s: %s)", k, type(e).__name__, e)
                slow = slow or isinstance(e, (TimeoutError, asyncio.TimeoutError)) or "timeout" in type(e).__name__.lower()
                results[k] = None
                continue
            gathered = dict(gathered or {})
            took = float(gathered.pop(ELAPSED_KEY, 0.0))
            lost = gathered.pop(FAILED_KEY, 0)
            if not gathered:
                results[k] = None
                continue
            if lost:
                logger.warning("shard %d: %d values came back un-averaged (a peer dropped mid all-reduce); round discarded", k, lost)
                slow = True  # parts given up on: a deadline too short for the link, or a peer gone (one doubling)
                results[k] = None
                continue
            moved += self.allreduce_bytes({k: len(gathered)})
            elapsed = max(elapsed, took)
            if len(gathered) > MAX_GROUP:
                logger.warning("shard %d: group of %d exceeds %d peers; round discarded", k, len(gathered), MAX_GROUP)
                results[k] = None
                continue
            with self.averagers[k].get_tensors() as (buf,):
                poisoned = int((~torch.isfinite(buf)).sum())
                total, short = decode_limb_average(torch.nan_to_num(buf), len(gathered))
            if poisoned:
                logger.warning("shard %d: %d values were averaged without every groupmate (a peer dropped mid all-reduce); "
                               "round discarded", k, poisoned)
                slow = True
                results[k] = None
                continue
            if short:
                logger.warning("shard %d: %d values were averaged without every groupmate (a peer dropped mid all-reduce); round discarded", k, short)
                results[k] = None
                continue
            results[k] = (total, {str(pid): meta for pid, meta in gathered.items()})
        if slow:
            self.deadline.timed_out()
            logger.warning("averaging ran out of time or lost parts (deadline %.1f s); the next round gets %.1f s",
                           self.allreduce_timeout, self.deadline.seconds_for(planned))
        elif moved and all(r is not None for r in results.values()):
            self.deadline.observe(moved, elapsed)
        return results

    def allreduce_bytes(self, group_sizes: dict[int, int]) -> int:
        """Bytes each way one peer moves to all-reduce these shards ({shard: group size}) in limbs."""
        return sum(allreduce_bytes(BYTES_PER_VALUE * self.shard_sizes[k], n) for k, n in group_sizes.items())

    def _apply_deadline(self, seconds: float) -> None:
        """Give every shard's averager this deadline (only when it changed by more than 5%)."""
        if abs(seconds - self.allreduce_timeout) <= 0.05 * self.allreduce_timeout:
            return
        for avg in self.averagers.values():
            avg.set_deadline(seconds)
        logger.info("averaging deadline %.1f s -> %.1f s (measured %s)", self.allreduce_timeout, seconds,
                    f"{self.deadline.throughput * 8 / 1e6:.1f} Mbit/s" if self.deadline.throughput else "nothing yet")
        self.allreduce_timeout = seconds

    def measure_link(self, peer_id: str) -> float | None:
        """Pull a bounded probe stream from a peer; feeds the deadline estimate. Returns bytes/s or None."""
        from node.swarm.probe import pull_bandwidth

        try:
            got, seconds, error = self.dht.run_coroutine(
                partial(pull_bandwidth, peer_id=peer_id, total=PROBE_BYTES, chunk=64 * 1024, time_limit=PROBE_S),
                return_future=True).result(timeout=PROBE_S + 10)
        except Exception as e:
            error, got, seconds = f"{type(e).__name__}: {e}", 0, 0.0
        if error or got < 64 * 1024 or seconds <= 0:
            logger.info("could not measure the link to %s…: %s", peer_id[:16], error or f"only {got} bytes")
            return None
        self.deadline.observe(got, seconds)
        return got / seconds

    def download_timeout(self, shard: int) -> float:
        """Time allowed for one shard's state download, from its size and the measured throughput."""
        return self.deadline.seconds_for(STATE_BYTES_PER_VALUE * self.shard_sizes[shard])

    # ------------------------------------------------------------------ state sharing

    def publish_state(self, shard: int, metadata: dict, tensors: Sequence[torch.Tensor]) -> None:
        self.averagers[shard].publish_state(metadata, tensors)

    def download_state(self, shard: int, donors: Sequence[str], timeout: float = 30) -> tuple[str, dict, list[torch.Tensor]] | None:
        """Shard state from the first of `donors` (peer ids, in order of preference) that sends it:
        (donor, metadata, tensors), or None."""
        if not donors:
            return None
        try:  # a handful of donors bounds the worst case; the next resync asks again
            result = self.averagers[shard].download_state_from(list(donors)[:MAX_DONORS], timeout=timeout)
        except Exception as e:
            logger.warning("shard %d: state download failed: %s", shard, e)
            return None
        if not result:
            return None
        donor, meta, tensors = result
        if not isinstance(meta, dict):
            return None
        return donor, meta, list(tensors)

    # ------------------------------------------------------------------ lifecycle

    def shutdown(self) -> None:
        self._stop.set()
        for avg in self.averagers.values():
            try:
                avg.shutdown()
            except Exception as e:  # shutting down a half-dead averager must not stop the rest
                logger.debug("averager shutdown: %s", e)
        try:  # tell peers we left (best effort, bounded: a dead p2pd must not hang the exit)
            self.dht.store(self.peers_key, subkey=self.peer_id, value=None, expiration_time=get_dht_time() + 1,
                           return_future=True).result(timeout=2)
        except Exception as e:
            logger.debug("could not announce leaving: %s", e)
        self.dht.shutdown()
