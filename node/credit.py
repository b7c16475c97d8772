"""Offline verification of anyone's ledgers, receipts, spot checks and key rotations, and credit.

Sources are any number of ledger files (node/ledger.py `read_log`), receipts files and DHT dumps; a
source may mix records, receipts, spot checks and rotation statements, one signed line each. Nothing
but protocol/ and node/receipt_sets.py (which receipts and checks count) is needed:

    report = verify_logs({"a.log": blobs_a, "dht": blobs_dht}, swarm_id, max_samples_per_round=512)
    report.ok; report.records (a Verdict per record); report.statements (receipts, checks);
    report.peers (a PeerVerdict per peer); report.groups (receipt sets per round and shard)
    credit = compute_credit(report)          # per peer: claimed, receipted, checked, credited

Rules. Chain: a record is valid only if its signature, schema and swarm id hold, its chain from
seq 0 is intact (every prev_hash matches, no seq missing, no two records with one seq), its round
is later than the previous record's, its samples are within the per-round cap, and it was not
signed by a key after that key's rotation. The same record seen twice counts once.

Receipts (protocol/receipt.py) are verified (signature, schema, swarm id); copies count once.
For each (round, shard) the receipts are grouped by (members, result hash) into receipt sets
(every signer is a member: the receipt's schema says so). The canonical set of a (round, shard)
is the one with the most distinct signers, not counting peers barred by `exclude_after` counted
failed spot checks in earlier rounds (the nodes leave those out of their groups; they must not
outvote the honest group with a group of their own); a tie for the most means none is canonical
(the verdicts say so), and receipts of the other sets are "ignored" (outvoted). Rounds are decided
in order, each round's checks judged against its canonical sets.

A valid record of peer p for round r and shards S is *receipted* when, for at least one k in S,
the canonical set of (r, k) names p and is signed by at least max(1, floor(len(members) / 2))
members other than p: with p itself, a majority of the group. So a group of one (a lone trainer)
is never receipted. Residual risk: two sybils that receipt each other as a group of 2 are
credited when no bigger set exists for that (round, shard) - once an honest group of 3 or more
receipts the same (round, shard), its set wins and the sybils' records earn nothing.

Receipts of one set also agree on the group's reducers (the members that held parts) and its
check rate (ppm): a receipt that names others starts a set of its own. Spot checks count only if
signed by the checker that `spot_checks(result_hash, members, check_rate_ppm / 1e6, reducers)` of
the canonical set draws for that target, with the canonical set's result hash, and
the checker signed a receipt in that set whose commitment for the target equals the check's.
Others are "ignored" with the reason (not counted, not failures); forged or malformed receipts and
checks are failures.

Credit: a record is credited (status "ok") only if its chain rules hold, it is receipted (unless
require_receipts=False) and no counted failed spot check of p in round r exists; a valid record
that misses only a receipt or was accused is "uncredited" (it earns nothing, yet is not a
verification failure). A verified rotation old -> new adds the old key's rows to the new key's
(`Credit.rotated_from`). Not covered: a rotated-out key can still sign receipts (they carry no seq).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Iterable, Mapping, Sequence

from node.receipt_sets import Group, StatementVerdict, receipt_groups, receipted, verify_statements
from protocol.receipt import SpotCheck, classify
from protocol.record import (
    ZERO_HASH,
    ContributionRecord,
    KeyRotation,
    RecordError,
    record_hash,
    verify_rotation,
    verify_signed,
)

DEFAULT_EXCLUDE_AFTER = 3  # the manifest's [credit] exclude_after default


# ---------------------------------------------------------------- verification


@dataclasses.dataclass
class Verdict:
    source: str  # ledger file name, "dht", ...
    index: int  # position in that source
    # "ok" (credited), "uncredited" (a valid record that earns nothing: no receipt names it, or a
    # spot check failed; not a verification failure), "duplicate" (a copy of a record seen before:
    # valid, counted once), "fail"
    status: str
    reason: str = ""
    peer_id: str | None = None
    seq: int | None = None
    round: int | None = None
    record_hash: str | None = None
    record: ContributionRecord | None = None
    receipted: bool = False  # the canonical receipt set of one of its (round, shard)s vouches for it
    receipt_note: str = ""  # which group receipted it, or why none did
    checks: list[SpotCheck] = dataclasses.field(default_factory=list)  # valid spot checks of this peer in this round

    @property
    def ok(self) -> bool:
        return self.status != "fail"


@dataclasses.dataclass
class PeerVerdict:
    peer_id: str
    ok: bool = True
    reasons: list[str] = dataclasses.field(default_factory=list)
    head_seq: int = -1  # last seq of the intact chain from seq 0 (-1: none)
    rotated_to: str | None = None

    def fail(self, reason: str) -> None:
        self.ok = False
        if reason not in self.reasons:
            self.reasons.append(reason)


@dataclasses.dataclass
class Report:
    swarm_id: str
    max_samples_per_round: int
    records: list[Verdict]
    peers: dict[str, PeerVerdict]
    rotation_errors: list[str]
    max_tokens_per_sample: int | None = None  # tokens credited per credited sample at most (None: uncapped)
    statements: list[StatementVerdict] = dataclasses.field(default_factory=list)  # receipts and checks
    groups: dict[tuple[int, int], Group] = dataclasses.field(default_factory=dict)  # (round, shard) -> receipts
    rotations: dict[str, KeyRotation] = dataclasses.field(default_factory=dict)  # old peer id -> verified rotation
    require_receipts: bool = True

    @property
    def ok(self) -> bool:
        return (
            all(v.ok for v in self.records)
            and all(s.ok for s in self.statements)
            and all(p.ok for p in self.peers.values())
            and not self.rotation_errors
        )

    def credited(self) -> list[ContributionRecord]:
        return [v.record for v in self.records if v.status == "ok" and v.record is not None]

    def valid_checks(self) -> list[SpotCheck]:
        """Spot checks that count: signed by the drawn checker, matching its receipt (copies once)."""
        return [s.statement for s in self.statements if s.kind == "check" and s.status == "ok"]


def verify_logs(
    blobs_by_source: Mapping[str, Sequence[bytes]],
    swarm_id: str,
    max_samples_per_round: int,
    published_heads: Mapping[str, int] | None = None,
    rotations: Iterable[bytes] = (),
    max_tokens_per_sample: int | None = None,
    *,
    require_receipts: bool = True,
    exclude_after: int = DEFAULT_EXCLUDE_AFTER,
) -> Report:
    """Verify records, receipts, spot checks and rotations from several sources (see the module
    docstring for the rules); a Verdict per record, a StatementVerdict per receipt or check and a
    PeerVerdict per peer.

    A source may mix the four kinds, one signed statement per item (`protocol.receipt.classify`).
    Within one source a peer's records must appear in increasing seq order (a ledger file is in
    chain order; `collect_records` sorts DHT values). `published_heads` maps peer id to the highest
    seq the peer is known to have published: a chain ending below it is a truncated log. `rotations`
    are signed KeyRotation statements (those found in sources count the same). `max_tokens_per_sample`
    (the manifest's `[data] max_length`) caps the tokens credited per record. `require_receipts=False`
    credits records without receipts (self-reported work, as before receipts existed; spot checks
    still apply). The draw that decides which checks count uses the rate and reducers the canonical
    receipt set names. `exclude_after` (the manifest's `[credit] exclude_after`) counted failed checks
    bar a peer's receipts from the next round on.
    """
    records_by_source: dict[str, list[tuple[int, bytes]]] = defaultdict(list)
    statement_blobs: list[tuple[str, int, str, bytes]] = []
    rotation_blobs: list[tuple[str, bytes]] = [("", blob) for blob in rotations]
    for source, blobs in blobs_by_source.items():
        records_by_source[source]  # keep every source, even one without records
        for index, blob in enumerate(blobs):
            try:
                kind = classify(blob)
            except RecordError:
                kind = "record"  # verify_signed names exactly what is wrong with it
            if kind == "record":
                records_by_source[source].append((index, blob))
            elif kind == "rotation":
                rotation_blobs.append((f"{source}#{index + 1}", blob))
            else:
                statement_blobs.append((source, index, kind, blob))

    rotation_errors: list[str] = []
    rotated: dict[str, KeyRotation] = {}
    for where, blob in rotation_blobs:
        try:
            rotation = verify_rotation(blob)
        except RecordError as e:
            rotation_errors.append(f"rotation statement rejected{f' ({where})' if where else ''}: {e}")
            continue
        if rotation.swarm_id == swarm_id:
            rotated[rotation.old_peer_id] = rotation

    verdicts, peers = _verify_records(records_by_source, swarm_id, rotated)
    for peer_id, by_seq in _chains(verdicts).items():
        _check_chain(peers[peer_id], by_seq, max_samples_per_round, rotated.get(peer_id))
    for peer_id, head in (published_heads or {}).items():
        peer = peers.setdefault(peer_id, PeerVerdict(peer_id))
        if peer.head_seq < head:
            peer.fail(f"log ends at seq {peer.head_seq} below the published head seq {head} (truncated tail)")

    statements = verify_statements(statement_blobs, swarm_id)
    groups = receipt_groups(statements, exclude_after)
    _credit_records(verdicts, groups, statements, require_receipts)
    return Report(
        swarm_id, max_samples_per_round, verdicts, peers, rotation_errors, max_tokens_per_sample,
        statements, groups, rotated, require_receipts,
    )


def _verify_records(
    records_by_source: Mapping[str, list[tuple[int, bytes]]], swarm_id: str, rotated: Mapping[str, KeyRotation]
) -> tuple[list[Verdict], dict[str, PeerVerdict]]:
    """A Verdict per record line: signature, swarm, rotation cut, order within its source, copies."""
    verdicts: list[Verdict] = []
    peers: dict[str, PeerVerdict] = {}
    first_seen: dict[str, Verdict] = {}
    for source, items in records_by_source.items():
        last_in_source: dict[str, Verdict] = {}
        for index, blob in items:
            v = Verdict(source, index, "fail")
            verdicts.append(v)
            try:
                record = verify_signed(blob)
            except RecordError as e:
                v.reason = str(e)
                continue
            v.peer_id, v.seq, v.round, v.record = record.peer_id, record.seq, record.round, record
            v.record_hash = record_hash(blob)
            peer = peers.setdefault(record.peer_id, PeerVerdict(record.peer_id))
            if record.swarm_id != swarm_id:
                v.reason = f"wrong swarm id: record is for {record.swarm_id}, expected {swarm_id}"
                peer.fail("records for another swarm")
                continue
            rotation = rotated.get(record.peer_id)
            if rotation is not None:
                peer.rotated_to = rotation.new_peer_id
                if record.seq >= rotation.old_next_seq:
                    v.reason = (
                        f"signed by a rotated-out key: {record.peer_id} was replaced by {rotation.new_peer_id} "
                        f"from seq {rotation.old_next_seq}"
                    )
                    peer.fail("records signed after key rotation")
                    continue
            previous = last_in_source.get(record.peer_id)
            if previous is not None and record.seq <= previous.seq:
                earlier = first_seen.get(v.record_hash)
                if previous.record_hash == v.record_hash or (earlier is not None and earlier.source == source):
                    v.reason = f"replay: the same record (seq {record.seq}) appears twice in {source}"
                else:
                    v.reason = f"log out of order: seq {record.seq} after seq {previous.seq} in {source} (reordered)"
                peer.fail(f"{source} is not in chain order")
                continue
            last_in_source[record.peer_id] = v
            if v.record_hash in first_seen:
                first = first_seen[v.record_hash]
                v.status, v.reason = "duplicate", f"copy of {first.source}#{first.index}, counted once"
                continue
            first_seen[v.record_hash] = v
            v.status = "pending"  # judged by _check_chain
    return verdicts, peers


def _chains(verdicts: list[Verdict]) -> dict[str, dict[int, list[Verdict]]]:
    chains: dict[str, dict[int, list[Verdict]]] = defaultdict(lambda: defaultdict(list))
    for v in verdicts:
        if v.status == "pending":
            v.status = "fail"
            chains[v.peer_id][v.seq].append(v)
    return chains


def _check_chain(
    peer: PeerVerdict, by_seq: dict[int, list[Verdict]], cap: int, rotation: KeyRotation | None
) -> None:
    broken = ""
    expected_prev = ZERO_HASH
    last_round = -1
    for seq in range(max(by_seq) + 1):
        candidates = by_seq.get(seq, [])
        if broken:
            for v in candidates:
                v.reason = broken
            continue
        if not candidates:
            broken = f"chain broken: seq {seq} is missing (deleted entry)"
            peer.fail(broken)
            continue
        if len(candidates) > 1:
            for v in candidates:
                v.reason = f"equivocation: {len(candidates)} different records signed with seq {seq}"
            broken = f"chain broken at seq {seq} by equivocation"
            peer.fail(f"equivocation at seq {seq}")
            continue
        v = candidates[0]
        record = v.record
        assert record is not None
        if record.prev_hash != expected_prev:
            broken = f"chain broken: prev_hash of seq {seq} does not match the hash of seq {seq - 1}"
            v.reason = broken
            peer.fail(broken)
            continue
        if rotation is not None and seq == rotation.old_next_seq - 1 and v.record_hash != rotation.old_head_hash:
            broken = f"seq {seq} is not the head named by the key rotation"
            v.reason = broken
            peer.fail(broken)
            continue
        expected_prev = v.record_hash or ""
        peer.head_seq = seq
        if record.round <= last_round:
            v.reason = f"round {record.round} is not after round {last_round} of an earlier record (claimed twice)"
            peer.fail(v.reason)
        elif record.samples > cap:
            v.reason = f"samples {record.samples} exceed the cap of {cap} per round"
            peer.fail(v.reason)
        else:
            v.status = "ok"
        last_round = max(last_round, record.round)


def _credit_records(
    verdicts: list[Verdict], groups: Mapping[tuple[int, int], Group], statements: list[StatementVerdict],
    require_receipts: bool,
) -> None:
    """Records whose chain holds ("ok"): "uncredited" unless receipted (when required) and unaccused."""
    checks: dict[tuple[str, int], list[SpotCheck]] = defaultdict(list)
    for sv in statements:
        if sv.kind == "check" and sv.status == "ok":
            checks[(sv.statement.target, sv.statement.round)].append(sv.statement)
    for v in verdicts:
        if v.status != "ok":
            continue
        v.receipted, v.receipt_note = receipted(v.record, groups)
        v.checks = checks.get((v.peer_id, v.round), [])
        reasons = [] if v.receipted or not require_receipts else [v.receipt_note]
        reasons += [
            f"failed spot-check by {c.peer_id} in round {c.round} shard {c.shard} "
            f"(error {c.error_ppm / 1e6:.2f} > tolerance {c.tolerance_ppm / 1e6:.2f})"
            for c in v.checks if c.failed
        ]
        if reasons:
            v.status, v.reason = "uncredited", "; ".join(reasons)


# ---------------------------------------------------------------- credit


@dataclasses.dataclass(frozen=True)
class Credit:
    peer_id: str
    claimed_rounds: int  # records whose chain rules hold (credited or not)
    receipted_rounds: int  # of those, records that a canonical receipt set vouches for
    spot_checks_passed: int  # valid spot checks of this peer that passed (per round, shard, checker)
    spot_checks_failed: int  # valid spot checks of this peer that failed (accusations)
    credited_rounds: int  # records credited: chain holds, receipted (if required), no failed check
    credited_samples: int  # each credited round capped at max_samples_per_round
    credited_tokens: int  # each credited record capped at its credited samples x max_tokens_per_sample
    share: float  # credited_samples / all credited samples of the swarm
    rotated_from: tuple[str, ...] = ()  # retired keys whose work is counted in this row

    # the names from before receipts, still read by status, control, swarmview and demo
    @property
    def rounds(self) -> int:
        return self.credited_rounds

    @property
    def samples(self) -> int:
        return self.credited_samples

    @property
    def tokens(self) -> int:
        return self.credited_tokens


def _successor(peer_id: str, rotations: Mapping[str, KeyRotation]) -> str:
    """The key that carries `peer_id`'s work now: rotations followed to the last key (cycles stop)."""
    seen = {peer_id}
    while peer_id in rotations and rotations[peer_id].new_peer_id not in seen:
        peer_id = rotations[peer_id].new_peer_id
        seen.add(peer_id)
    return peer_id


def compute_credit(report: Report) -> dict[str, Credit]:
    """Per peer credit: only records with status "ok" are credited (copies once); a retired key's
    counts go to the row of the key that replaced it (`rotated_from` names it)."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    merged: dict[str, set[str]] = defaultdict(set)

    def row(peer_id: str) -> dict[str, int]:
        owner = _successor(peer_id, report.rotations)
        if owner != peer_id:
            merged[owner].add(peer_id)
        return counts[owner]

    for v in report.records:
        if v.status not in ("ok", "uncredited") or v.record is None:
            continue
        c = row(v.record.peer_id)
        c["claimed"] += 1
        c["receipted"] += v.receipted
        if v.status == "ok":
            credited = min(v.record.samples, report.max_samples_per_round)
            cap = credited * report.max_tokens_per_sample if report.max_tokens_per_sample else v.record.tokens
            c["rounds"] += 1
            c["samples"] += credited
            c["tokens"] += min(v.record.tokens, cap)
    outcome: dict[tuple[str, int, int, str], bool] = {}  # (target, round, shard, checker) -> failed
    for check in report.valid_checks():
        key = (check.target, check.round, check.shard, check.peer_id)
        outcome[key] = outcome.get(key, False) or bool(check.failed)
    for (target, *_), failed in outcome.items():
        row(target)["failed" if failed else "passed"] += 1
    total = sum(c["samples"] for c in counts.values())
    return {
        peer: Credit(
            peer, c["claimed"], c["receipted"], c["passed"], c["failed"], c["rounds"], c["samples"], c["tokens"],
            c["samples"] / total if total else 0.0, tuple(sorted(merged.get(peer, ()))),
        )
        for peer, c in sorted(counts.items())
    }
