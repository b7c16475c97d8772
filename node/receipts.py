"""This node's evidence for verified credit: round receipts and spot-check statements, signed, kept and published.

After each round whose sums came back, the node signs, per shard, a receipt (protocol/receipt.py):
the group's members, each member's part hash as this node's reducer received it, and the hash of
the exact sum. A drawn checker signs a spot-check statement (node/spotcheck.py) saying whether the
target's part matched its announced microbatch sketches and the drawn microbatch its recomputation. Both go to the DHT (per-round keys, so a node reads only
one round's worth) and into `receipts.jsonl` next to the ledger, with the groupmates' receipts
that name this node, read back one round later. `swarmtune credit` reads that file with the ledger:
a record earns credit only when other members' receipts name it, and not when a valid spot-check
failed it.

A peer with `exclude_after` failed checks (its own or groupmates', each re-verified here: signed,
by the checker the round's result drew, for a group this node was in) is left out of this node's
groups from then on.

    book = ReceiptBook(path, swarm=swarm, swarm_id=..., private_key=..., rate=..., exclude_after=3)
    book.round_done(r, {shard: Summed}, [spotcheck.Outcome])   # sign, keep, publish
    book.collect(r)                                            # groupmates' receipts and checks of earlier rounds
    book.excluded                                              # peers left out of groups
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node.durable import STORAGE_ERRNOS, StorageError, write_all
from protocol.peerid import peer_id_from_public_key
from protocol.receipt import (
    RECEIPT_VERSION, RoundReceipt, SpotCheck, error_ppm, sign_check, sign_receipt, spot_checks, verify_check, verify_receipt,
)
from protocol.record import RecordError, public_bytes

logger = logging.getLogger(__name__)

PPM = 1_000_000
MAX_PENDING = 8  # rounds whose groupmates' receipts are still to be read (older ones are dropped)


class ReceiptBook:
    def __init__(self, path: str | os.PathLike, *, swarm, swarm_id: str, private_key: Ed25519PrivateKey, rate: float,
                 tolerance: float, exclude_after: int):
        self.path = Path(path)
        self.swarm, self.swarm_id, self.key = swarm, swarm_id, private_key
        self.peer_id = peer_id_from_public_key(public_bytes(private_key))
        self.rate, self.tolerance, self.exclude_after = rate, tolerance, exclude_after
        self._kept: set[bytes] = set()
        self._pending: dict[int, dict[int, list[str]]] = {}  # round -> {shard: members}
        self._draws: dict[tuple[int, int], tuple[str, set]] = {}  # (round, shard) -> (result hash, drawn pairs)
        self._failed: dict[str, set] = defaultdict(set)  # target -> {(round, shard)} of valid failed checks
        self.excluded: set[str] = set()
        self.receipts_signed = self.checks_signed = self.checks_failed = 0
        self._signed_bytes = 0  # bytes of the statements this node signed since take_signed_bytes()
        if self.path.exists():
            self._kept.update(line for line in self.path.read_bytes().split(b"\n") if line)

    # ------------------------------------------------------------------ this node's statements

    def round_done(self, round_: int, summed: dict, outcomes) -> None:
        """Sign a receipt per summed shard and a statement per spot-check; keep and publish them."""
        now = int(time.time() * 1000)
        for k, res in sorted(summed.items()):
            view = res.view
            if view is None or self.peer_id not in view.members:
                continue
            commitments = ()
            if view.commitments:
                if set(view.commitments) != set(view.members):
                    continue  # a reducer that did not see every member has nothing whole to sign
                commitments = tuple(view.commitments[m] for m in view.members)
            receipt = RoundReceipt(version=RECEIPT_VERSION, swarm_id=self.swarm_id, round=round_, shard=k,
                                   peer_id=self.peer_id, members=tuple(view.members), commitments=commitments,
                                   result_hash=view.result_hash, reducers=tuple(view.reducers),
                                   check_rate_ppm=round(self.rate * PPM))
            self._emit(sign_receipt(receipt, self.key), self.swarm.publish_receipt)
            self.receipts_signed += 1
            self._pending[round_] = {**self._pending.get(round_, {}), k: list(view.members)}
            self._draws[(round_, k)] = (view.result_hash, set(spot_checks(view.result_hash, view.members,
                                                                          receipt.check_rate_ppm / PPM, view.reducers)))
        for o in outcomes:
            res = summed[o.shard]
            error = error_ppm(o.error)
            check = SpotCheck(version=RECEIPT_VERSION, swarm_id=self.swarm_id, round=round_, shard=o.shard,
                              peer_id=self.peer_id, target=o.target, result_hash=res.view.result_hash,
                              commitment=o.commitment, evidence_hash=o.evidence_hash, error_ppm=error,
                              tolerance_ppm=int(self.tolerance * PPM), failed=int(error > int(self.tolerance * PPM)),
                              time_ms=now)
            blob = sign_check(check, self.key)
            self._emit(blob, self.swarm.publish_check)
            self.checks_signed += 1
            if check.failed:
                self.checks_failed += 1
                self._count_failure(check)
        while len(self._pending) > MAX_PENDING:
            self._pending.pop(min(self._pending))
        for key in [key for key in self._draws if key[0] < round_ - 4 * MAX_PENDING]:
            del self._draws[key]

    # ------------------------------------------------------------------ groupmates' statements

    def collect(self, current_round: int, budget_s: float | None = None) -> None:
        """Read the receipts and checks of the rounds this node finished before `current_round`: keep the
        receipts that name this node and the checks of its groups (counted towards exclusion). With
        `budget_s`, rounds not reached within it stay pending (a node stopping behind a cut link must not
        spend a DHT timeout per round on its way out; the statements stay in the DHT for later readers)."""
        started = time.monotonic()
        for r in sorted(self._pending):
            if r >= current_round:
                continue
            if budget_s is not None and time.monotonic() - started > budget_s:
                logger.info("left the receipts of rounds %d.. unread (%.0f s spent reading the DHT)", r, budget_s)
                return
            shards = self._pending.pop(r)
            try:
                receipts, checks = self.swarm.read_receipts(r), self.swarm.read_checks(r)
            except Exception as e:  # a DHT read can fail many ways; the receipts stay in the DHT for later readers
                logger.info("could not read round %d's receipts from the DHT: %s", r, e)
                continue
            for blob in receipts:
                try:
                    receipt = verify_receipt(blob)
                except RecordError:
                    continue
                if (receipt.swarm_id == self.swarm_id and receipt.round == r and receipt.shard in shards
                        and receipt.peer_id != self.peer_id and self.peer_id in receipt.members):
                    self._keep(blob)
            for blob in checks:
                try:
                    check = verify_check(blob)
                except RecordError:
                    continue
                drawn = self._draws.get((check.round, check.shard))
                if (check.swarm_id != self.swarm_id or drawn is None or check.result_hash != drawn[0]
                        or (check.peer_id, check.target) not in drawn[1] or check.peer_id == self.peer_id):
                    continue  # not a check this node can vouch for (another group, or a checker nobody drew)
                if check.target == self.peer_id or check.failed:
                    self._keep(blob)
                if check.failed:
                    self._count_failure(check)

    def _count_failure(self, check: SpotCheck) -> None:
        self._failed[check.target].add((check.round, check.shard))
        if len(self._failed[check.target]) >= self.exclude_after and check.target not in self.excluded:
            self.excluded.add(check.target)
            logger.warning("peer %s failed %d spot-checks; it is left out of this node's groups from now on",
                           check.target, len(self._failed[check.target]))
            if self.swarm is not None:
                self.swarm.exclude(self.excluded)

    # ------------------------------------------------------------------ storage

    def take_signed_bytes(self) -> int:
        n, self._signed_bytes = self._signed_bytes, 0
        return n

    def _emit(self, blob: bytes, publish) -> None:
        self._signed_bytes += len(blob)
        self._keep(blob)
        try:
            publish(blob)
        except Exception as e:  # best effort, like records: the file is the source of truth
            logger.warning("could not publish a receipt or check to the DHT: %s", e)

    def _keep(self, blob: bytes) -> None:
        if blob in self._kept:
            return
        line = bytes(blob) + b"\n"
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            if e.errno in STORAGE_ERRNOS:
                raise StorageError(self.path, e) from None
            raise
        try:
            size = os.fstat(fd).st_size
            try:
                write_all(fd, line)
                os.fsync(fd)
            except OSError as e:  # a full disk: cut what was written, the file ends at its last whole line
                os.ftruncate(fd, size)
                if e.errno in STORAGE_ERRNOS:
                    raise StorageError(self.path, e) from None
                raise
        finally:
            os.close(fd)
        self._kept.add(bytes(blob))
