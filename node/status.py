"""What the control service and the metrics read: a snapshot the training thread publishes.

The training thread calls `StatusBoard.update(...)` at round boundaries and state changes;
gRPC threads only read `StatusBoard.snapshot()`, so a status request never hashes a tensor
or walks the DHT while a step may be running. Credit over the control API is the verification
`CreditCache` last computed in its own thread (local ledger + DHT records, every 30 s).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from node import __version__

logger = logging.getLogger(__name__)

CREDIT_REFRESH_S = 30.0


@dataclass(frozen=True)
class Snapshot:
    state: str = "syncing"
    round: int = 0
    loss: float | None = None
    samples_per_s: float = 0.0
    tokens_per_s: float = 0.0
    last_round_s: float | None = None
    last_round_at: float | None = None
    samples_total: int = 0
    tokens_total: int = 0
    adapter_hash: str = ""
    peers: dict = field(default_factory=dict)  # {peer_id: PeerInfo}, this node included
    coverage: dict = field(default_factory=dict)  # {shard: trainers}
    state_since: float = field(default_factory=time.time)  # unix time the state last changed


class StatusBoard:
    """One writer (the training thread), many readers; `on_change(snapshot)` feeds the metrics."""

    def __init__(self, on_change=lambda snapshot: None):
        self._lock = threading.RLock()  # the signal handler (drain) may update while the main thread does
        self._snap = Snapshot()
        self._on_change = on_change

    def update(self, **fields) -> Snapshot:
        with self._lock:
            if "state" in fields and fields["state"] != self._snap.state and "state_since" not in fields:
                fields["state_since"] = time.time()
            self._snap = dataclasses.replace(self._snap, **fields)
            snap = self._snap
        self._on_change(snap)
        return snap

    def snapshot(self) -> Snapshot:
        with self._lock:
            return self._snap


def memory_bytes() -> tuple[int, int, int]:
    """(rss, peak rss, allocated CUDA memory) of this process, in bytes."""
    import resource

    import psutil
    import torch

    rss = psutil.Process().memory_info().rss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    gpu = int(torch.cuda.memory_allocated()) if torch.cuda.is_available() else 0
    return int(rss), int(max(peak, rss)), gpu


class StallWatch:
    """Says why a node counts as stalled: no round ended for `factor` x the last round's duration, and for
    at least `min_s` seconds (before the first round: `min_s` since the node started). A paused, draining
    or stopped node is never stalled; the clock restarts when the node leaves those states."""

    QUIET_STATES = ("paused", "draining", "stopped")

    def __init__(self, *, factor: float, min_s: float, started_at: float | None = None):
        self.factor = factor
        self.min_s = min_s
        self.started_at = time.time() if started_at is None else started_at

    def reason(self, snap: Snapshot, now: float | None = None) -> str:
        """Empty when the node is not stalled, else one sentence with the figures and what it is doing."""
        now = time.time() if now is None else now
        if snap.state in self.QUIET_STATES:
            return ""
        since = max(snap.last_round_at or self.started_at, snap.state_since, self.started_at)
        if snap.last_round_at is None or snap.last_round_s is None:
            limit, why = self.min_s, f"no round ended since the node started (limit {self.min_s:g} s)"
        else:
            limit = max(self.min_s, self.factor * snap.last_round_s)
            why = (f"no round ended for {now - since:.0f} s (limit {limit:.0f} s: {self.factor:g} x the last round's "
                   f"{snap.last_round_s:.1f} s, at least {self.min_s:g} s)")
        if now - since <= limit:
            return ""
        peers = max(0, len(snap.peers) - 1)
        return f"{why}; state {snap.state} since {now - snap.state_since:.0f} s ago, {peers} peer(s) in the last view"


class CreditCache:
    """The swarm's verified credit, recomputed off the gRPC thread every CREDIT_REFRESH_S seconds.

    Sources: this node's ledger and evidence files (receipts.jsonl: its receipts and checks, and its
    groupmates' receipts that name it), every record in the DHT, and the receipts and checks the DHT
    holds for the rounds those records name (read once per round, at most MAX_ROUNDS_PER_REFRESH rounds
    per refresh; the last two rounds are read again, as their receipts may still be arriving).

    Records live in buckets of RECORDS_BUCKET rounds (node/swarm/validator.py). The first refresh reads
    them all; later ones read only from the oldest bucket not yet complete (the newest round seen is 2
    rounds past its end) up to the empty buckets above the newest: what a refresh moves no longer grows
    with the swarm's history."""

    MAX_ROUNDS_PER_REFRESH = 32

    def __init__(self, *, ledger, read_dht_bucket, swarm_id: str, max_samples_per_round: int,
                 max_tokens_per_sample: int | None = None, read_dht_rounds=None, evidence_files=(),
                 exclude_after: int = 3):
        self.ledger = ledger
        self.read_dht_bucket = read_dht_bucket  # bucket -> the records of that bucket in the DHT
        self._buckets: dict[int, set[tuple[str, int, bytes, int]]] = {}  # bucket -> {(peer, seq, record, round)}
        self._first_open = 0  # the oldest bucket that may still change
        self.read_dht_rounds = read_dht_rounds  # rounds -> {round: its receipts and checks in the DHT}
        self.evidence_files = [Path(p) for p in evidence_files]
        self.swarm_id = swarm_id
        self.cap = max_samples_per_round
        self.token_cap = max_tokens_per_sample
        self.exclude_after = exclude_after
        self._round_blobs: dict[int, list[bytes]] = {}
        self._stop = threading.Event()
        self._rows: list[dict] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="credit-cache", daemon=True)
        self._thread.start()

    def rows(self) -> list[dict]:
        with self._lock:
            return list(self._rows)

    def refresh_soon(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception as e:  # keep the last rows; the next refresh tries again
                logger.warning("could not recompute credit: %s", e)
            self._wake.wait(CREDIT_REFRESH_S)  # woken early by refresh_soon (a new record)
            self._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _evidence(self) -> list[bytes]:
        from node.ledger import LedgerError, read_log

        out = []
        for path in self.evidence_files:
            if path.exists():
                try:
                    out += read_log(path).blobs
                except LedgerError as e:
                    logger.warning("%s", e)
        return out

    def _dht_records(self) -> tuple[list[bytes], set[int]]:
        """Every record of the swarm in the DHT, by (peer, seq), and the rounds they name: cached buckets, and the
        open ones read again."""
        from node.swarm.validator import RECORDS_BUCKET, scan_record_buckets
        from protocol.record import RecordError, verify_signed

        def read(bucket: int) -> list[tuple[str, int, bytes, int]]:  # (peer, seq, record, round)
            out = []
            for blob in self.read_dht_bucket(bucket):
                try:
                    r = verify_signed(blob)
                except RecordError:
                    continue
                out.append((r.peer_id, r.seq, blob, r.round))
            return out

        for bucket, items in scan_record_buckets(read, first=self._first_open).items():
            # merged, not replaced: a signed record stays evidence when a read misses it (a flaky or expired entry)
            self._buckets[bucket] = self._buckets.get(bucket, set()) | set(items)
            newest = max((item[3] for item in items), default=-1)
            while (self._first_open + 1) * RECORDS_BUCKET + 2 <= newest:
                self._first_open += 1
        cached = sorted(item for items in self._buckets.values() for item in items)
        return [blob for _, _, blob, _ in cached], {round_ for *_, round_ in cached}

    def _dht_rounds(self, rounds: set[int]) -> list[bytes]:
        """The receipts and checks of these rounds in the DHT (rounds read before are cached)."""
        if not rounds or self.read_dht_rounds is None:
            return []
        newest = max(rounds)
        todo = [r for r in sorted(rounds, reverse=True) if r not in self._round_blobs or r >= newest - 1]
        batch = todo[: self.MAX_ROUNDS_PER_REFRESH]
        if batch:
            try:
                self._round_blobs.update(self.read_dht_rounds(batch))
            except Exception as e:  # a DHT read can fail many ways; try those rounds again next refresh
                logger.info("could not read the receipts of rounds %d..%d from the DHT: %s", min(batch), max(batch), e)
        return [blob for r in sorted(self._round_blobs) for blob in self._round_blobs[r]]

    def refresh(self) -> None:
        from node.credit import compute_credit, verify_logs

        blobs = {"local": self.ledger.blobs(), "evidence": self._evidence()}
        try:
            records, rounds = self._dht_records()
            blobs["dht"] = records + self._dht_rounds(rounds)
        except Exception as e:  # a DHT read can fail many ways; local records still verify
            logger.warning("could not read records from the DHT: %s", e)
        report = verify_logs(blobs, self.swarm_id, self.cap, max_tokens_per_sample=self.token_cap,
                             exclude_after=self.exclude_after)
        rows = [credit_row(c) for c in compute_credit(report).values()]
        with self._lock:
            self._rows = rows


def credit_row(c) -> dict:
    """One peer's credit (node.credit.Credit) as the control service, the dashboard and `swarm status` show it:
    `verified_rounds` are the credited ones; `claimed_rounds` all rounds its valid records claim."""
    return {"peer_id": c.peer_id, "verified_rounds": c.credited_rounds, "claimed_rounds": c.claimed_rounds,
            "receipted_rounds": c.receipted_rounds, "spot_checks_passed": c.spot_checks_passed,
            "spot_checks_failed": c.spot_checks_failed, "samples": c.credited_samples, "tokens": c.credited_tokens,
            "share": c.share}


class NodeControlView:
    """The node as the control service sees it (node.control.NodeView): snapshots only."""

    def __init__(self, *, board: StatusBoard, ledger, record_cv: threading.Condition, credit: CreditCache,
                 swarm_id: str, peer_id: str, trained, plan, peer_ttl: float, listen_maddrs: list[str],
                 started_at: float, heartbeat_age, commands, reach=None, stall: StallWatch | None = None):
        self.board = board
        self.ledger = ledger
        self.record_cv = record_cv
        self.credit_cache = credit
        self.swarm_id = swarm_id
        self.peer_id = peer_id
        self.trained = tuple(trained)
        self.plan = plan
        self.peer_ttl = peer_ttl
        self.listen_maddrs = list(listen_maddrs)
        self.started_at = started_at
        self.heartbeat_age = heartbeat_age
        self.commands = commands  # pause / resume / drain, as plain callables
        self.reach = reach  # node.swarm.reach.Reachability, detected at start
        self.stall = stall if stall is not None else StallWatch(factor=10.0, min_s=300.0, started_at=started_at)

    def stall_reason(self) -> str:
        return self.stall.reason(self.board.snapshot())

    def status(self) -> dict:
        s = self.board.snapshot()
        stall = self.stall.reason(s)
        rss, peak, gpu = memory_bytes()
        return {
            "round": s.round, "loss": s.loss, "samples_per_s": float(s.samples_per_s),
            "tokens_per_s": float(s.tokens_per_s), "peers": max(0, len(s.peers) - 1), "state": s.state,
            "swarm_id": self.swarm_id, "peer_id": self.peer_id, "shards": list(self.trained),
            "adapter_hash": s.adapter_hash, "rss_bytes": rss, "peak_rss_bytes": peak, "gpu_memory_bytes": gpu,
            "uptime_s": time.time() - self.started_at, "last_round_s": s.last_round_s,
            "last_round_at": s.last_round_at, "listen_maddrs": list(self.listen_maddrs),
            "samples_total": s.samples_total, "tokens_total": s.tokens_total, "version": __version__,
            "reachability": self.reach.kind if self.reach else "public",
            "reachability_fix": self.reach.fix() if self.reach else "",
            "stalled": bool(stall), "stall_reason": stall,
        }

    def peers(self) -> list[dict]:
        out = []
        for pid, info in sorted(self.board.snapshot().peers.items()):
            if pid == self.peer_id:
                continue
            out.append({"peer_id": pid, "multiaddrs": list(info.maddrs), "round": info.round, "shards": list(info.shards),
                        "last_seen_s": self.heartbeat_age(info), "reachability": info.reach})
        return out

    def shards(self) -> list[dict]:
        coverage = self.board.snapshot().coverage
        return [{"index": k, "layer_start": a, "layer_end": b, "trainers": int(coverage.get(k, int(k in self.trained))),
                 "local": k in self.trained} for k, (a, b) in enumerate(self.plan)]

    def records(self, from_seq: int) -> list[dict]:
        from node.control import record_summary

        entries = list(zip(self.ledger.blobs(), self.ledger.records()))
        return [record_summary(b, r) for b, r in entries[max(0, from_seq):][:256]]

    def wait_for_record(self, after_seq: int, timeout: float) -> bool:
        with self.record_cv:
            return self.record_cv.wait_for(lambda: self.ledger.next_seq - 1 > after_seq, timeout=timeout)

    def credit(self) -> list[dict]:
        return self.credit_cache.rows()

    def pause(self) -> None:
        self.commands["pause"]()

    def resume(self) -> None:
        self.commands["resume"]()

    def drain(self) -> None:
        self.commands["drain"]()
