"""Keeping this node's signed blobs in the DHT for as long as the swarm lives.

The DHT forgets a value when its expiry passes (node/swarm/swarm.py `record_ttl_s()`: 24 h, or
$SWARMTUNE_RECORD_TTL_S seconds). A swarm that runs for weeks would lose its early records, and
`swarmtune ledger verify --dht-peer` could no longer see a node's whole chain. So a running node
stores its own blobs again, each one once half its TTL has passed since it was last stored:
the records of its ledger (and of the ledgers of the keys it rotated away from), its rotation
statements, and whatever else is handed in as (kind, blob) pairs (receipts, later).

    rep = Republisher(swarm.store_many, ttl_s=record_ttl_s(), where=KINDS)   # record, rotation, receipt, check
    rep.add([("rotation", blob)])              # due now
    rep.add([("record", blob)], stored=True)   # was just stored: due in ttl/2
    rep.follow("record", ledger.blobs)         # new entries of a growing list: stored when they were appended
    rep.tick()                                 # cheap unless a check is due
    rep.start(); ...; rep.stop()               # or: tick every `check_every` seconds on a thread of its own

A `tick()` looks at the queue at most every `check_every` seconds and stores every entry that is due,
`batch` entries per DHT call (one traversal per DHT key). It once stored at most one batch per
check: 64 entries every 1.9 s with a 15 s TTL, while a node of 0.2 s rounds tracks a record and two
receipts or more a round, each due every 7.5 s; the queue fell behind and a record expired before
its turn (a flaky test). At a 24 h TTL the same cap (64 a minute: 46 K entries every 12 h) falls
behind within two days of 10 s rounds that add three entries each. An entry the DHT did not take is
tried again at the next check. `for_node` builds the node's republisher.

A node runs it on its own thread, not in the round loop: a round can hold the loop longer than half
a TTL (a lost part's retry waits a whole averaging deadline; a state download takes minutes on a
slow link), and a record stored before such a wait would expire before its next store (seen with a
15 s TTL in a test). The DHT calls are safe from any thread (node/swarm/averager.py
`guard_request_pipe`).
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from node.ledger import read_log
from node.rotation import ROTATIONS_FILENAME, read_rotation_file, retired_ledger_name, rotation_entry, swarm_rotations
from node.swarm.statements import MAX_DHT_VALUE_BYTES, check_subkey, checks_key, receipt_subkey, receipts_key
from node.swarm.validator import owner_subkey, records_key
from protocol.receipt import classify, verify_check, verify_receipt
from protocol.record import RecordError, verify_signed

logger = logging.getLogger(__name__)

Where = Callable[[bytes], tuple[str, str]]  # a blob -> the (DHT key, subkey) it is stored under


def record_entry(blob: bytes) -> tuple[str, str]:
    record = verify_signed(blob)
    return records_key(record.swarm_id, record.round), owner_subkey(record.peer_id, record.seq)


def receipt_entry(blob: bytes) -> tuple[str, str]:
    r = verify_receipt(blob)
    return receipts_key(r.swarm_id, r.round), receipt_subkey(r.peer_id, r.shard)


def check_entry(blob: bytes) -> tuple[str, str]:
    c = verify_check(blob)
    return checks_key(c.swarm_id, c.round), check_subkey(c.peer_id, c.shard, c.target)


KINDS: dict[str, Where] = {"record": record_entry, "rotation": rotation_entry, "receipt": receipt_entry,
                           "check": check_entry}


class Republisher:
    """A queue of (kind, blob) ordered by when each is due to be stored again."""

    def __init__(self, store_many: Callable[[list[tuple[str, str, bytes]]], list[bool]], *, ttl_s: float,
                 where: Mapping[str, Where], batch: int = 64, check_every: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self._store_many, self._where, self._clock = store_many, dict(where), clock
        self.ttl_s = ttl_s
        self.interval = ttl_s / 2  # stored again at half its life: a late check or a slow store still lands in time
        self.check_every = check_every if check_every is not None else min(60.0, ttl_s / 8)
        self.batch = batch
        self._queue: list[tuple[float, int, tuple[str, str]]] = []  # (due, tiebreak, (key, subkey))
        self._blobs: dict[tuple[str, str], bytes] = {}
        self._n = 0
        self._next_check = float("-inf")
        self._followed: list[tuple[str, Callable[[], Sequence[bytes]], int]] = []
        self.stored = 0  # entries stored again so far (tests and the log read it)
        self._lock = threading.Lock()  # one tick at a time (the thread's, or a caller's)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __len__(self) -> int:
        return len(self._blobs)

    def add(self, items: Iterable[tuple[str, bytes]], *, stored: bool = False) -> int:
        """Track blobs; `stored`: they were just stored (due in ttl/2), else due now. A blob already tracked
        under the same DHT entry is replaced, not doubled. Returns how many were new."""
        due = self._clock() + (self.interval if stored else 0.0)
        new = 0
        for kind, blob in items:
            try:
                entry = self._where[kind](blob)
            except KeyError:
                raise ValueError(f"unknown kind {kind!r}: the republisher knows {sorted(self._where)}") from None
            except RecordError as e:
                logger.warning("not re-publishing an invalid %s: %s", kind, e)
                continue
            if entry not in self._blobs:
                new += 1
                self._push(due, entry)
            self._blobs[entry] = bytes(blob)
        return new

    def follow(self, kind: str, source: Callable[[], Sequence[bytes]], *, start: int = 0) -> None:
        """Watch a growing list (a ledger's blobs): each new entry counts as stored when it is first seen."""
        self._followed.append((kind, source, start))

    def _push(self, due: float, entry: tuple[str, str]) -> None:
        self._n += 1
        heapq.heappush(self._queue, (due, self._n, entry))

    def next_due(self) -> float | None:
        return self._queue[0][0] if self._queue else None

    def start(self) -> None:
        """Tick every `check_every` seconds on a daemon thread until `stop()`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="republisher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # a failed check is tried again at the next one; the thread must not die
                logger.exception("re-publishing failed; trying again in %.0f s", self.check_every)
            self._stop.wait(self.check_every)

    def tick(self) -> int:
        """Store again every entry that is due; returns how many the DHT took."""
        with self._lock:
            return self._tick()

    def _tick(self) -> int:
        now = self._clock()
        if now < self._next_check:
            return 0
        self._next_check = now + self.check_every
        for i, (kind, source, seen) in enumerate(self._followed):
            blobs = source()
            if len(blobs) > seen:
                self.add([(kind, b) for b in blobs[seen:]], stored=True)
                self._followed[i] = (kind, source, len(blobs))
        due: list[tuple[str, str]] = []
        while self._queue and self._queue[0][0] <= now:
            due.append(heapq.heappop(self._queue)[2])
        ok = 0
        for i in range(0, len(due), self.batch):
            chunk = due[i : i + self.batch]
            if self._stop.is_set():  # the node is shutting down: the rest stays queued
                for entry in due[i:]:
                    self._push(now, entry)
                due = due[:i]
                break
            try:
                results = self._store_many([(key, subkey, self._blobs[(key, subkey)]) for key, subkey in chunk])
            except Exception as e:  # nothing is known stored: all of them are tried again at the next check
                logger.warning("re-publishing %d DHT entries failed: %s", len(chunk), e)
                results = [False] * len(chunk)
            for entry, accepted in zip(chunk, results):
                if accepted:
                    ok += 1
                    self._push(now + self.interval, entry)
                else:  # tried again at the next check
                    self._push(now + self.check_every, entry)
        self.stored += ok
        if due:
            logger.debug("re-published %d of %d due DHT entries (%d tracked)", ok, len(due), len(self._blobs))
        if ok < len(due):
            # also when the DHT holds a copy that expires later: groupmates' receipts are stored by their signers too
            logger.warning("the DHT did not take %d of %d re-published entries (no peer reachable, or a copy there "
                           "expires later); trying again in %.0f s", len(due) - ok, len(due), self.check_every)
        return ok


def for_node(swarm, workdir: Path, ledger, ttl_s: float) -> Republisher:
    """The node's republisher: its ledger (followed as it grows), the ledgers of keys it rotated away from,
    the swarm's rotation statements in its folder, and the receipts and checks in its receipts.jsonl
    (followed too), all due at the first tick (a restarted node does not
    know whether the DHT still holds them)."""
    rep = Republisher(swarm.store_many, ttl_s=ttl_s, where=KINDS)
    workdir = Path(workdir)
    for path in sorted(workdir.glob(retired_ledger_name("*"))):
        rep.add(("record", blob) for blob in read_log(path).blobs)
    rotations = swarm_rotations(read_rotation_file(workdir / ROTATIONS_FILENAME), swarm.swarm_id)
    rep.add(("rotation", blob) for blob, _ in rotations)
    rep.add(("record", blob) for blob in ledger.blobs())
    rep.follow("record", ledger.blobs, start=ledger.next_seq)
    evidence = workdir / "receipts.jsonl"  # node/receipts.py: its receipts and checks, groupmates' receipts

    def of_kind(kind: str) -> Callable[[], list[bytes]]:
        def read() -> list[bytes]:
            if not evidence.exists():
                return []
            out = []
            for blob in read_log(evidence).blobs:
                try:
                    if classify(blob) == kind and len(blob) <= MAX_DHT_VALUE_BYTES:
                        out.append(blob)
                except RecordError:
                    continue
            return out
        return read

    for kind in ("receipt", "check"):
        found = of_kind(kind)()
        rep.add((kind, blob) for blob in found)
        rep.follow(kind, of_kind(kind), start=len(found))
    return rep
