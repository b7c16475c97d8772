"""The swarm as the node sees it: the façade over the DHT, membership and one averager per shard.

    dht, reach = start_network(identity, manifest, initial_peers=..., host_maddrs=...)
    swarm = Swarm(dht, swarm_id=..., shard_layouts=..., trained_shards=..., wire="int8", reach=reach, ...)
    results = swarm.allreduce_sums({shard: float32 vector}, RoundClaim(...), expected, round_=r)

It owns the state metadata a donor serves with a shard's tensors (`StateMeta`: round, hash,
optimizer step, swarm id); the round metadata every group member sends with its part (`RoundClaim`)
and what an all-reduce gives (`Summed`, `Failed`) are node/swarm/outcome.py's.
Each shard averages under the hivemind prefix `<swarm_id>/shard-<k>`, so only the trainers of
shard k ever average shard k, and the round number is part of the matchmaking key, so peers
in different rounds never average together.

Contributions are summed exactly on the group's shared grid (node/swarm/exact.py, in the wire
grid the manifest names); each member gets the same integer sum and the grid it is on. hivemind
reports success even when parts were lost, so two checks catch them: a part this peer never got
back (the runner's failure count: only this peer may miss it), and a part some reducer summed
without one of its senders (INCOMPLETE to every sender: the whole group retries the round).
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from typing import Sequence

import torch

from node.swarm.averager import EXPONENTS_KEY, KEY_BITS, STEP_KEY, ShardAverager, group_key
from node.swarm.deadline import AveragingDeadline
from node.swarm.dht import SwarmError, dht_time, peer_id_of, start_dht
from node.swarm.exact import GRIDS, MAX_GROUP, Layout, block_exponents, quantize, wire_bytes_per_value
from node.swarm.membership import Membership, PeerInfo, check_membership, check_no_twin
from node.swarm.outcome import Failed, RoundClaim, Summed, read_outcome
from node.swarm.probe import measure_bandwidth, serve_bandwidth_probe
from node.swarm.reach import PUBLIC, Reachability, detect_reachability, serve_dialback
from node.swarm.statements import collect_checks, collect_receipts, collect_rounds, publish_check, publish_receipt
from node.swarm.stores import PendingStores
from node.swarm.validator import RecordsValidator, collect_record_bucket, publish_record

logger = logging.getLogger(__name__)

STATE_BYTES_PER_VALUE = 12  # a state download, at most: the adapter and two optimizer moments, float32
PROBE_BYTES = 2 << 20  # a link probe before the first all-reduce: this many bytes ...
PROBE_S = 5.0  # ... or this many seconds, whichever comes first
MAX_DONORS = 4  # donors tried per state download
PARTS_POLL_S = 0.002  # how often a node waiting on its steps looks for an averager asking for parts
STORE_BATCH_BYTES = 8192  # values per DHT call in store_many (see there: the pipe to the DHT process)
RECORD_TTL_S = 24 * 3600  # how long a published record stays in the DHT (the node re-stores its own: node/republish.py)


def record_ttl_s() -> float:
    """Seconds a published record, rotation statement or receipt stays in the DHT: RECORD_TTL_S, or the
    environment's SWARMTUNE_RECORD_TTL_S (tests set a few seconds to watch re-publication). Read here only."""
    raw = os.environ.get("SWARMTUNE_RECORD_TTL_S", "").strip()
    if not raw:
        return float(RECORD_TTL_S)
    try:
        ttl = float(raw)
    except ValueError:
        ttl = float("nan")
    if not 5 <= ttl <= 30 * 24 * 3600:
        raise SwarmError(f"SWARMTUNE_RECORD_TTL_S={raw!r} is not a number of seconds from 5 to 2592000 (30 days); "
                         f"unset it for the default of {RECORD_TTL_S} s")
    return ttl


async def _store_many(_dht, node, entries, expiration):
    keys, subkeys, values = zip(*entries)
    done = await node.store_many(list(keys), list(values), expiration, subkeys=list(subkeys))
    return [bool(done.get((key, subkey))) for key, subkey, _ in entries]


@dataclass(frozen=True)
class StateMeta:
    """What a donor serves with a shard's tensors."""

    round: int
    hash: str
    step: int  # the optimizer step count the moments belong to
    swarm: str

    def to_wire(self) -> dict:
        return {"round": self.round, "hash": self.hash, "step": self.step, "swarm": self.swarm}

    @classmethod
    def from_wire(cls, value) -> "StateMeta":
        return cls(round=int(value["round"]), hash=str(value["hash"]), step=int(value["step"]), swarm=str(value["swarm"]))


def start_network(identity, manifest, *, initial_peers: Sequence[str], host_maddrs: Sequence[str],
                  announce_maddrs: Sequence[str]):
    """Start this node's DHT + p2pd with the node's key as its libp2p identity, check that the initial
    peers train the same swarm (SwarmError otherwise), and find out whether peers can dial us
    (node/swarm/reach.py). Returns (dht, Reachability). A node nobody can dial is restarted in hivemind's
    client mode: it asks and sends over connections it opens, and nobody waits on requests to it.
    p2pd reads the key from a private temporary file that is removed as soon as the daemon started."""
    try:
        dht = _start_identified(identity, manifest, initial_peers=initial_peers, host_maddrs=host_maddrs,
                                announce_maddrs=announce_maddrs, client_mode=False)
    except SwarmError as e:
        if "can't access this node" in str(e) and initial_peers:
            # the initial peer dialled our peer id back and reached another process with it: the same key
            # running on another machine looks like this from here (seen in the suite, 1 start in ~20)
            _refuse_if_twin(identity.peer_id, manifest, initial_peers)
        raise
    try:
        check_membership(dht, manifest, initial_peers)
        check_no_twin(dht, manifest.swarm_id, manifest.averaging.peer_ttl)
        serve_dialback(dht)
        reach = detect_reachability(dht, [peer_id_of(a) for a in initial_peers if peer_id_of(a)], peer_maddrs=initial_peers)
    except BaseException:
        dht.shutdown()
        raise
    logger.info("reachability: %s (%s)", reach.kind, reach.detail)
    if reach.dialable:
        return dht, reach
    logger.warning("peers cannot dial this node (%s): it trains in client mode, sending its parts and receiving the "
                   "sums over connections it opens. %s", reach.detail, reach.fix())
    dht.shutdown()
    dht = _start_identified(identity, manifest, initial_peers=initial_peers, host_maddrs=host_maddrs,
                            announce_maddrs=announce_maddrs, client_mode=True)
    try:
        check_membership(dht, manifest, initial_peers)
    except BaseException:
        dht.shutdown()
        raise
    return dht, reach


def _refuse_if_twin(peer_id: str, manifest, initial_peers: Sequence[str]) -> None:
    """SwarmError (another node runs with this key) when `peer_id` has a live heartbeat in the swarm, read by a
    throwaway client-mode node; nothing when it has none or the swarm cannot be read."""
    try:
        reader = start_dht(initial_peers=initial_peers, host_maddrs=None, client_mode=True, retries=0)
    except SwarmError:
        return
    try:
        check_no_twin(reader, manifest.swarm_id, manifest.averaging.peer_ttl, peer_id=peer_id)
    finally:
        reader.shutdown()


def _start_identified(identity, manifest, *, client_mode: bool, **kwargs):
    from node.identity import write_libp2p_identity

    fd, tmp_key = tempfile.mkstemp(prefix="swarmtune-p2p-", suffix=".key")
    os.close(fd)
    try:
        os.unlink(tmp_key)
        write_libp2p_identity(identity, tmp_key)
        return start_dht(identity_path=tmp_key, record_validators=[RecordsValidator(manifest.swarm_id)],
                         client_mode=client_mode, **kwargs)
    finally:
        if os.path.exists(tmp_key):
            os.unlink(tmp_key)


def part_size_bytes(numel: int, grid, chunks: int = 8, floor: int = 4096, ceiling: int = 1 << 19) -> int:
    """hivemind streams a shard in chunks and gives each chunk whole to one reducer; its default 512 KiB chunk
    makes any shard under 512 KiB one chunk, summed by one member, whose own part then nobody else holds (and
    no spot-check can look at). `chunks` chunks per shard spread the parts over the group (64 chunks of 1 KiB
    broke reducer streams on a busy 2-core box: "values came back un-summed")."""
    return max(floor, min(ceiling, numel * torch.empty(0, dtype=grid.dtype).element_size() // chunks))


class Swarm:
    """Membership, per-shard exact gradient all-reduce, shard state sharing, record publication."""

    def __init__(
        self,
        dht,
        *,
        swarm_id: str,
        shard_layouts: Sequence[Sequence[int]],
        trained_shards: Sequence[int],
        matchmaking_time: float,
        allreduce_timeout: float,
        peer_ttl: float,
        wire: str = "int8",
        clip: float = 0.0,
        trim: float = 0.0,
        spot_check_rate: float = 0.0,
        initial_peers: Sequence[str] = (),
        reach: Reachability | None = None,
    ):
        self.dht = dht
        self.excluded: set[str] = set()  # peers left out of this node's groups (failed spot-checks)
        self.reach = reach or Reachability(PUBLIC, "not checked", checked=False)
        # an outbound-only node's DHT runs in client mode, and so do its averagers (hivemind's default follows the
        # DHT): peer fraction 0, so it never holds a part of the all-reduce, and it serves no state
        self.swarm_id = swarm_id
        self.peer_id = str(dht.peer_id)
        self.trained = tuple(sorted(trained_shards))
        self.matchmaking_time = matchmaking_time
        self.allreduce_timeout = allreduce_timeout  # the deadline now in force (see node/swarm/deadline.py)
        self.stores = PendingStores()  # signed statements on their way to the DHT
        self.deadline = AveragingDeadline(allreduce_timeout)
        self.grid = GRIDS[wire]
        self.layouts = [Layout(sizes) for sizes in shard_layouts]
        self.shard_sizes = [layout.numel for layout in self.layouts]
        # a group forms within ~one matchmaking window once peers are there; waiting longer only delays the resync
        self.find_group_timeout = 2 * matchmaking_time + 2.0
        self.peer_ttl = peer_ttl
        self.averagers: dict[int, ShardAverager] = {}
        self._steps = 0  # averager steps started (STEP_KEY: ties an averager's ask for parts to its step)
        if trim > 0:
            logger.info("robust sum: clip %g x the median part norm, then per value a trimmed mean (%g of the senders "
                        "off each end, at least 1 of 3)", clip, trim)
        for k, sizes in enumerate(shard_layouts):
            self.averagers[k] = ShardAverager(
                sizes,
                self.grid,
                clip=clip,
                trim=trim,
                spot_check_rate=spot_check_rate,
                dht=dht,
                prefix=f"{swarm_id}/shard-{k}",
                start=True,
                target_group_size=None,
                min_group_size=2,
                initial_group_bits="0" * KEY_BITS,
                min_matchmaking_time=matchmaking_time,
                request_timeout=max(0.5, matchmaking_time / 2),
                allreduce_timeout=allreduce_timeout,
                next_chunk_timeout=allreduce_timeout / 2,
                allow_state_sharing=k in self.trained and self.reach.dialable,
                client_mode=not self.reach.dialable,
                part_size_bytes=part_size_bytes(sum(sizes), self.grid),
            )
        self.members = Membership(dht, swarm_id=swarm_id, trained=self.trained, peer_ttl=peer_ttl, initial_peers=initial_peers,
                                  reach=self.reach.kind)
        serve_bandwidth_probe(dht)  # lets `swarmtune doctor` on a newcomer's machine measure bandwidth to us

    # ------------------------------------------------------------------ membership

    def view(self) -> dict[str, PeerInfo]:
        """A fresh peer view from the DHT (this node included); see Membership.view. Peers this node excluded
        (failed spot-checks) are not in it: they neither vouch for states, donate them, nor count as the swarm's
        majority (excluded junk senders summing among themselves would otherwise pull honest nodes onto their
        state)."""
        return self._without_excluded(self.members.view())

    def last_view(self) -> dict[str, PeerInfo]:
        """The last view read, without DHT work."""
        return self._without_excluded(self.members.last_view())

    def _without_excluded(self, view: dict[str, PeerInfo]) -> dict[str, PeerInfo]:
        if not self.excluded:
            return view
        return {p: i for p, i in view.items() if p not in self.excluded}

    def announce(self, **fields) -> None:
        self.members.announce(**fields)

    def wait_for_peers(self, n: int, timeout: float) -> dict[str, PeerInfo]:
        return self.members.wait_for_peers(n, timeout)

    @property
    def left(self) -> set[str]:
        return self.members.left

    def visible_maddrs(self) -> list[str]:
        return self.members.visible_maddrs()

    def heartbeat_age(self, info: PeerInfo) -> float:
        """Seconds since a peer's heartbeat was stored."""
        return max(0.0, self.peer_ttl - (info.expires_at - dht_time()))

    # ------------------------------------------------------------------ averaging

    def local_sum(self, shard: int, x: torch.Tensor, claim: "RoundClaim") -> Summed:
        """A group of one (this node trains the shard alone): the same grid and rounding as a group's sum."""
        layout = self.layouts[shard]
        exps = block_exponents(x, layout, self.grid)
        q, sent = quantize(x, exps, layout, self.grid)
        return Summed(q.to(torch.int32), exps, sent, q.cpu(), {self.peer_id: claim}, layout)

    def allreduce_sums(
        self, contributions: dict[int, torch.Tensor], claim: RoundClaim, expected: dict[int, int], *, round_: int,
        attempt: int = 0, exact_groups: dict[int, int] | None = None, patience: float = 0.0,
    ) -> dict[int, "Summed | Failed"]:
        """Sum each shard's float32 contribution over the shard's group, exactly and identically on every member.

        `expected[k]` is how many trainers of shard k this node sees: the group assembles as
        soon as that many joined (else after the matchmaking time, with whoever came).
        Returns, per shard, a `Summed`, or `Failed` when no group formed in time or a part was lost.
        `attempt` (0..3) is part of the matchmaking key, so a retry of the same round meets only the
        peers retrying it; `exact_groups[k]`: the retry of shard k runs only with exactly that many peers
        (the group that lost the part). `patience`: seconds to keep looking for the group when that is longer
        than the usual window (diloco's long rounds end seconds apart on unequal machines).
        """
        planned = self.allreduce_bytes({k: expected.get(k, 2) for k in contributions})
        self._apply_deadline(self.deadline.seconds_for(planned))
        wire_claim = claim.to_wire()
        # a retry's group is known and assembles the moment all are back; but a member whose own stream broke, or
        # whose group search timed out as the leader assembled it, retries at once, while the others learn of the
        # lost part only when their senders give up on it (half the deadline they started with) and the parts in
        # flight end: it waits a whole deadline plus one matchmaking window. Seen (3 nodes, 50 Mbit/s): a node
        # retried for 6.0 s from its timeout, with half of the deadline it had just lowered to 8 s; the other two
        # retried 6.4 s after it, with half of their 9.8 s, and all three resynced apart. A retry nobody comes to
        # ends as soon as the others announce a later round (_await_retry)
        mm = self.matchmaking_time
        find = self.allreduce_timeout + mm + 1.0 if exact_groups else max(self.find_group_timeout, patience + mm + 2.0)
        # how long a leader waits for the whole group it expects before it runs with fewer: one matchmaking window,
        # or the patience when longer (the search is that plus a window and 2 s). A 3-node diloco swarm whose third
        # node ended its inner steps 3 s after the other two was left out of every round (they ran as a pair after
        # 1 s; it found nobody, resynced, and started each next round behind them); per-step groupmates whose
        # rounds ended 1.5 s apart at 50 Mbit/s lost the last one the same way. A full group still assembles the
        # moment its last member arrives
        wait = mm if exact_groups else max(mm, find - mm - 2.0)
        controls, steps, served = {}, {}, {}

        def put_parts() -> None:  # a shard whose group formed asks for its parts on the group's grid
            for j, step in steps.items():
                got = self.averagers[j].put_parts(contributions[j], step)
                if got is not None:
                    served[j] = got

        for k, x in contributions.items():
            avg = self.averagers[k]
            exps = block_exponents(x, self.layouts[k], self.grid)
            self._steps += 1
            steps[k] = self._steps
            if exact_groups and k in exact_groups:
                avg.set_target_group_size(exact_groups[k], min_size=exact_groups[k], wait=wait)
            else:
                avg.set_target_group_size(max(2, min(expected.get(k, 2), MAX_GROUP)), wait=wait)
            avg.set_group_bits(group_key(round_, attempt))
            gather = dict(wire_claim, **{EXPONENTS_KEY: exps.numpy().tobytes(), STEP_KEY: steps[k]})
            controls[k] = avg.step(gather=gather, weight=1.0, timeout=find, wait=False, allow_retries=not exact_groups)
        results: dict = {}
        moved, elapsed, slow = 0, 0.0, False
        for k, control in controls.items():
            results[k] = Failed("no group", retry=False)
            try:
                gathered = self._await(control, k, round_, timeout=find + self.allreduce_timeout + 5, serve=put_parts,
                                       retry=bool(exact_groups and k in exact_groups))
                if gathered is None:
                    logger.warning("shard %d: the group completed round %d without this node (its sums did not reach "
                                   "us); taking its state instead of waiting for a retry", k, round_)
                    continue
            except Exception as e:  # hivemind's step raises whatever matchmaking or the all-reduce raised
                logger.warning("shard %d: averaging failed (%s: %s)", k, type(e).__name__, e)
                slow = slow or isinstance(e, (TimeoutError, asyncio.TimeoutError)) or "timeout" in type(e).__name__.lower()
                continue
            results[k] = outcome = read_outcome(k, gathered, self.averagers[k], self.layouts[k], served.get(k),
                                                exact_groups.get(k) if exact_groups else None)
            if isinstance(outcome, Failed):
                slow = slow or outcome.retry  # parts given up on: a deadline too short for the link, or a peer gone
            else:
                moved += self.allreduce_bytes({k: len(outcome.claims)})
                elapsed = max(elapsed, outcome.seconds)
        if slow:
            self.deadline.timed_out()
            logger.warning("averaging ran out of time or lost parts (deadline %.1f s); the next round gets %.1f s",
                           self.allreduce_timeout, self.deadline.seconds_for(planned))
        elif moved and not any(isinstance(r, Failed) for r in results.values()):
            self.deadline.observe(moved, elapsed)
        return results

    def _await(self, control, shard: int, round_: int, *, timeout: float, serve, retry: bool):
        """The result of `shard`'s step, answering every shard's ask for parts (`serve`) while it runs (a step
        whose group formed waits for them; the steps of all shards run at once). A `retry` returns None as soon
        as every other trainer of `shard` announced a round past `round_`: they completed it (only this node lost
        the sums), and nobody is coming to the retry."""
        deadline = time.monotonic() + timeout
        next_look = time.monotonic() + 0.5
        while True:
            serve()
            try:
                return control.result(timeout=PARTS_POLL_S)
            except TimeoutError:
                pass
            now = time.monotonic()
            if now > deadline:
                control.cancel()
                raise TimeoutError(f"the {'retry' if retry else 'step'} of shard {shard} did not end in {timeout:.0f} s")
            if retry and now >= next_look:
                next_look = now + 0.5
                others = [i for p, i in self.view().items() if p != self.peer_id and shard in i.shards]
                if others and all(i.round > round_ for i in others):
                    control.cancel()
                    return None

    def allreduce_bytes(self, group_sizes: dict[int, int]) -> int:
        """Bytes one peer sends (and, alike, receives) to sum these shards ({shard: group size}) on the wire grid."""
        return int(sum(self.shard_sizes[k] * wire_bytes_per_value(self.grid, n) for k, n in group_sizes.items()))

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
        got, seconds, error = measure_bandwidth(self.dht, peer_id, total=PROBE_BYTES, chunk=64 * 1024, time_limit=PROBE_S)
        if error or got < 64 * 1024 or seconds <= 0:
            logger.info("could not measure the link to %s…: %s", peer_id[:16], error or f"only {got} bytes")
            return None
        self.deadline.observe(got, seconds)
        return got / seconds

    def download_timeout(self, shard: int) -> float:
        """Time allowed for one shard's state download, from its size and the measured throughput."""
        return self.deadline.seconds_for(STATE_BYTES_PER_VALUE * self.shard_sizes[shard])

    # ------------------------------------------------------------------ state sharing

    def publish_state(self, shard: int, meta: StateMeta, tensors: Sequence[torch.Tensor]) -> None:
        self.averagers[shard].publish_state(meta.to_wire(), tensors)

    def download_state(self, shard: int, donors: Sequence[str], timeout: float = 30) -> tuple[str, StateMeta, list[torch.Tensor]] | None:
        """Shard state from the first of `donors` (peer ids, in order of preference) that sends it:
        (donor, metadata, tensors), or None."""
        if not donors:
            return None
        try:  # a handful of donors bounds the worst case; the next resync asks again
            result = self.averagers[shard].download_state_from(list(donors)[:MAX_DONORS], timeout=timeout)
        except Exception as e:  # a timeout, or the averager process is gone
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

    # ------------------------------------------------------------------ records

    def publish_record(self, blob: bytes) -> None:
        """Store a signed record in the DHT for a day (raises ValueError for a record that is not valid). The
        store travels while the next round starts (node/swarm/stores.py)."""
        self.stores.add("a record", publish_record(self.dht, self.swarm_id, blob, dht_time() + record_ttl_s(), return_future=True))

    def store_many(self, entries: Sequence[tuple[str, str, bytes]], timeout: float = 30.0) -> list[bool]:
        """Store (key, subkey, value) entries for the record TTL in batches (one DHT traversal per key and
        batch); whether each was accepted. Re-publication (node/republish.py) uses it; the validators apply.

        A batch is at most STORE_BATCH_BYTES: the call travels to the DHT process through a pipe that it reads
        without blocking, and Python sends a message over 16 KiB in two writes; the reader can then catch it
        half-written, fail, and the DHT process dies (seen with 30 records in one call)."""
        expiration = dht_time() + record_ttl_s()
        batches, size = [[]], 0
        for entry in entries:
            if batches[-1] and size + len(entry[2]) > STORE_BATCH_BYTES:
                batches.append([])
                size = 0
            batches[-1].append(entry)
            size += len(entry[2])
        futures = [self.dht.run_coroutine(partial(_store_many, entries=batch, expiration=expiration), return_future=True)
                   for batch in batches if batch]
        done: list[bool] = []
        for batch, future in zip(batches, futures):
            try:
                done += future.result(timeout=timeout)
            except Exception as e:  # a timeout or a DHT error: nothing is known stored; the caller tries again later
                logger.warning("storing %d DHT entries failed: %s", len(batch), e)
                done += [False] * len(batch)
        return done

    def read_record_bucket(self, bucket: int) -> list[bytes]:
        """The valid records of this swarm's rounds bucket * RECORDS_BUCKET .. found in the DHT (node/swarm/validator.py)."""
        return collect_record_bucket(self.dht, self.swarm_id, bucket)

    def publish_receipt(self, blob: bytes) -> None:
        """Store one of this node's signed round receipts in the DHT (a day, like records), in the background."""
        self.stores.add("a receipt", publish_receipt(self.dht, self.swarm_id, blob, dht_time() + record_ttl_s(), return_future=True))

    def read_receipts(self, round_: int) -> list[bytes]:
        """The valid receipts of one round found in the DHT."""
        return collect_receipts(self.dht, self.swarm_id, round_)

    def publish_check(self, blob: bytes) -> None:
        self.stores.add("a spot-check", publish_check(self.dht, self.swarm_id, blob, dht_time() + record_ttl_s(), return_future=True))

    def read_checks(self, round_: int) -> list[bytes]:
        return collect_checks(self.dht, self.swarm_id, round_)

    def read_rounds(self, rounds) -> dict[int, list[bytes]]:
        """{round: its valid receipts and checks in the DHT}, the reads of many rounds going at once."""
        return {r: receipts + checks for r, (receipts, checks) in collect_rounds(self.dht, self.swarm_id, rounds).items()}

    def exclude(self, peers) -> None:
        """Leave these peers out of every group this node leads or joins (spot-checks failed them)."""
        self.excluded = set(peers)
        for avg in self.averagers.values():
            avg.set_excluded(sorted(self.excluded))

    # ------------------------------------------------------------------ lifecycle

    def shutdown(self) -> None:
        self.stores.flush()
        self.members._stop.set()
        for avg in self.averagers.values():
            try:
                avg.shutdown()
            except Exception as e:  # shutting down a half-dead averager must not stop the rest
                logger.warning("averager shutdown: %s", e)
        self.members.leave()
        self.dht.shutdown()
