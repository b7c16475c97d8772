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
The `+ 1` counts contributors: its sum's low 6 bits must equal the group size, which
exposes a part that a reducer averaged without some sender (hivemind reports success
then). A part this peer never got back is caught from the runner's own failure count.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

import hivemind
from hivemind.averaging import DecentralizedAverager
from hivemind.utils import get_dht_time

logger = logging.getLogger(__name__)

LIMB_BITS = 10
NUM_LIMBS = 4
COUNT_BITS = 6  # low bits of each transmitted limb count the peers that contributed
# a peer's integers must satisfy |x| < MAX_PEER_INT (offset binary in four 10-bit limbs)
MAX_PEER_INT = 2 ** (LIMB_BITS * NUM_LIMBS - 1)
ROUND_BITS = 16  # low bits of the round number in the matchmaking key
MAX_GROUP = 32  # keeps limb sums < 2**21 and the recovery error < 0.5
FAILED_KEY = "__swarmtune_failed_values__"


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
        # hivemind returns success even when parts were lost; pass the count back with the gathered data
        self._failed_values = 0
        gathered = await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)
        if self._failed_values:
            gathered = dict(gathered)
            gathered[FAILED_KEY] = self._failed_values
        return gathered

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
    ):
        self.dht = dht
        self.swarm_id = swarm_id
        self.peer_id = str(dht.peer_id)
        self.trained = tuple(sorted(trained_shards))
        self.matchmaking_time = matchmaking_time
        self.allreduce_timeout = allreduce_timeout
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
        self._heartbeat: dict[str, Any] = {"round": 0, "shards": list(self.trained), "sps": 0.0, "syncing": False}
        self.left: set[str] = set()  # peers that announced they left (not a split)
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
        value = dict(self._heartbeat, maddrs=self.visible_maddrs(), v=1)
        try:
            self.dht.store(self.peers_key, subkey=self.peer_id, value=value, expiration_time=get_dht_time() + self.peer_ttl)
        except Exception as e:
            logger.warning("could not publish heartbeat to the DHT: %s", e)

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(max(1.0, self.peer_ttl / 3)):
            self._publish_heartbeat()

    def peers(self) -> dict[str, PeerInfo]:
        """Live peers of this swarm (this node included), from the DHT; malformed entries are skipped."""
        found = self.dht.get(self.peers_key, latest=True)
        out: dict[str, PeerInfo] = {}
        if found is None or not isinstance(found.value, dict):
            return out
        for subkey, item in found.value.items():
            value = getattr(item, "value", None)
            if value is None:  # a peer that left cleanly
                self.left.add(str(subkey))
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
            out[info.peer_id] = info
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
        for k, control in controls.items():
            try:
                gathered = control.result(timeout=self.find_group_timeout + self.allreduce_timeout + 5)
            except Exception as e:
                logger.warning("shard %d: averaging failed (%s: %s)", k, type(e).__name__, e)
                results[k] = None
                continue
            if not gathered:
                results[k] = None
                continue
            lost = gathered.pop(FAILED_KEY, 0)
            if lost:
                logger.warning("shard %d: %d values came back un-averaged (a peer dropped mid all-reduce); round discarded", k, lost)
                results[k] = None
                continue
            if len(gathered) > MAX_GROUP:
                logger.warning("shard %d: group of %d exceeds %d peers; round discarded", k, len(gathered), MAX_GROUP)
                results[k] = None
                continue
            with self.averagers[k].get_tensors() as (buf,):
                total, short = decode_limb_average(buf, len(gathered))
            if short:
                logger.warning("shard %d: %d values were averaged without every groupmate (a peer dropped mid all-reduce); round discarded", k, short)
                results[k] = None
                continue
            results[k] = (total, {str(pid): meta for pid, meta in gathered.items()})
        return results

    # ------------------------------------------------------------------ state sharing

    def publish_state(self, shard: int, metadata: dict, tensors: Sequence[torch.Tensor]) -> None:
        self.averagers[shard].publish_state(metadata, tensors)

    def download_state(self, shard: int, timeout: float = 30) -> tuple[dict, list[torch.Tensor]] | None:
        try:
            result = self.averagers[shard].load_state_from_peers(timeout=timeout)
        except Exception as e:
            logger.warning("shard %d: state download failed: %s", shard, e)
            return None
        if not result:
            return None
        meta, tensors = result
        if not isinstance(meta, dict):
            return None
        return meta, list(tensors)

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
