"""Which receipts and spot checks count: the receipt sets of each (round, shard), the canonical one, the
checks judged against it, and whether a record is receipted (the rules: node/credit.py's docstring).

    statements = verify_statements([(source, index, "receipt" | "check", blob), ...], swarm_id)
    groups = receipt_groups(statements, exclude_after)     # (round, shard) -> Group (its canonical set)
    ok, why = receipted(record, groups)

Nothing but protocol/ is needed.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Mapping

from protocol.receipt import RoundReceipt, SpotCheck, spot_checks, statement_hash, verify_check, verify_receipt
from protocol.record import ContributionRecord, RecordError


@dataclasses.dataclass
class StatementVerdict:
    """A receipt or spot check seen in a source."""

    source: str
    index: int
    kind: str  # "receipt" or "check"
    # "ok" (counts), "duplicate" (a copy: counted once), "ignored" (validly signed but does not
    # count: outvoted receipt set, undrawn checker, ...; the reason says why), "fail" (forged, malformed)
    status: str
    reason: str = ""
    peer_id: str | None = None  # the signer
    round: int | None = None
    shard: int | None = None
    target: str | None = None  # checks: the member checked
    statement_hash: str | None = None
    statement: RoundReceipt | SpotCheck | None = None

    @property
    def ok(self) -> bool:
        return self.status != "fail"


@dataclasses.dataclass
class ReceiptSet:
    """The receipts of one (round, shard) that agree on the group and the result hash."""

    members: tuple[str, ...]
    result_hash: str
    reducers: tuple[str, ...] = ()  # the members that held parts: the only possible checkers
    check_rate_ppm: int = 0  # the group's per-member spot-check chance, parts per million
    receipts: dict[str, list[RoundReceipt]] = dataclasses.field(default_factory=dict)  # signer -> its receipts
    counted: list[str] = dataclasses.field(default_factory=list)  # signers not barred by earlier failed checks
    barred: list[str] = dataclasses.field(default_factory=list)  # members barred by earlier failed checks

    @property
    def signers(self) -> list[str]:
        return sorted(self.receipts)


@dataclasses.dataclass
class Group:
    """Every receipt set of one (round, shard) and the canonical one (None on a tie)."""

    round: int
    shard: int
    sets: list[ReceiptSet]
    canonical: ReceiptSet | None
    note: str = ""  # why none is canonical, or that others were outvoted


def verify_statements(items: list[tuple[str, int, str, bytes]], swarm_id: str) -> list[StatementVerdict]:
    """A StatementVerdict per receipt or check: signature, schema, swarm; copies counted once."""
    out: list[StatementVerdict] = []
    first_seen: dict[str, StatementVerdict] = {}
    for source, index, kind, blob in items:
        sv = StatementVerdict(source, index, kind, "fail")
        out.append(sv)
        try:
            statement = verify_receipt(blob) if kind == "receipt" else verify_check(blob)
        except RecordError as e:
            sv.reason = str(e)
            continue
        sv.peer_id, sv.round, sv.shard, sv.statement = statement.peer_id, statement.round, statement.shard, statement
        sv.target = getattr(statement, "target", None)
        sv.statement_hash = statement_hash(blob)
        if statement.swarm_id != swarm_id:
            sv.reason = f"wrong swarm id: {kind} is for {statement.swarm_id}, expected {swarm_id}"
            continue
        first = first_seen.get(sv.statement_hash)
        if first is not None:
            sv.status, sv.reason = "duplicate", f"copy of {first.source}#{first.index}, counted once"
            continue
        first_seen[sv.statement_hash] = sv
        sv.status = "ok"
    return out


def receipt_groups(statements: list[StatementVerdict], exclude_after: int) -> dict[tuple[int, int], Group]:
    """Receipt sets per (round, shard) and the canonical one, round by round; the spot checks of each
    round are judged against its canonical sets before the next round's sets are weighed.

    A set's weight is its signers that are not barred: a peer is barred from the round after its
    `exclude_after`-th counted failed spot check (as the nodes leave it out of their groups then), so
    cheaters left out cannot outvote or tie the honest group with a group of their own. The canonical
    set has the most weight, at least 1; a tie for the most means none is canonical."""
    sets: dict[tuple[int, int], dict[tuple, ReceiptSet]] = defaultdict(dict)
    by_set: dict[int, list[StatementVerdict]] = defaultdict(list)
    checks: dict[int, list[StatementVerdict]] = defaultdict(list)
    for sv in statements:
        if sv.status != "ok":
            continue
        if sv.kind == "check":
            checks[sv.statement.round].append(sv)
            continue
        r = sv.statement
        key = (r.members, r.result_hash, r.reducers, r.check_rate_ppm)
        rs = sets[(r.round, r.shard)].setdefault(key, ReceiptSet(*key))
        rs.receipts.setdefault(r.peer_id, []).append(r)
        by_set[id(rs)].append(sv)
    failures: dict[str, set[tuple[int, int]]] = defaultdict(set)
    groups: dict[tuple[int, int], Group] = {}
    shards_of: dict[int, list[int]] = defaultdict(list)
    for r, shard in sorted(sets):
        shards_of[r].append(shard)
    for round_ in sorted(set(shards_of) | set(checks)):
        barred = {p for p, failed in failures.items() if len(failed) >= exclude_after}
        for shard in shards_of.get(round_, []):
            found = sets[(round_, shard)]
            for rs in found.values():
                rs.counted = [p for p in rs.signers if p not in barred]
                rs.barred = [p for p in rs.members if p in barred]
            ordered = sorted(found.values(), key=lambda s: (-len(s.counted), s.members, s.result_hash, s.reducers,
                                                            s.check_rate_ppm))
            most = len(ordered[0].counted)
            tied = [s for s in ordered if len(s.counted) == most]
            canonical, note = (ordered[0], "") if len(tied) == 1 and most > 0 else (None, "")
            if most == 0:
                note = "every signer failed spot checks earlier; none is canonical"
            elif canonical is None:
                note = f"{len(tied)} receipt sets tie with {most} signer(s) each; none is canonical"
            elif len(ordered) > 1:
                note = f"{len(ordered) - 1} other receipt set(s) with fewer signers outvoted"
            groups[(round_, shard)] = Group(round_, shard, ordered, canonical, note)
            for rs in ordered:
                if rs is canonical:
                    continue
                for sv in by_set[id(rs)]:
                    sv.status = "ignored"
                    sv.reason = (f"round {round_} shard {shard}: {note}" if canonical is None else
                                 f"outvoted: another receipt set of round {round_} shard {shard} has more signers "
                                 f"({len(canonical.counted)} > {len(rs.counted)}, not counting peers that failed "
                                 f"{exclude_after}+ spot checks before)")
        _judge_checks(checks.get(round_, []), groups)
        for sv in checks.get(round_, []):
            if sv.status == "ok" and sv.statement.failed:
                failures[sv.statement.target].add((sv.statement.round, sv.statement.shard))
    return groups


def _judge_checks(statements: list[StatementVerdict], groups: Mapping[tuple[int, int], Group]) -> None:
    """A check counts only if the canonical set's draw (its rate, among its reducers) names its signer
    for its target and the signer's receipt in that set committed to the part the check compared."""
    for sv in statements:
        if sv.kind != "check" or sv.status != "ok":
            continue
        c = sv.statement
        where = f"round {c.round} shard {c.shard}"
        group = groups.get((c.round, c.shard))
        canonical = group.canonical if group else None
        reason = ""
        if canonical is None:
            reason = f"no canonical receipt set for {where}" + (f" ({group.note})" if group and group.note else "")
        elif canonical.result_hash != c.result_hash:
            reason = f"its result hash is not that of the canonical receipt set of {where}"
        elif c.target not in canonical.members:
            reason = f"the target is not a member of the receipted group of {where}"
        elif (c.peer_id, c.target) not in spot_checks(c.result_hash, canonical.members, canonical.check_rate_ppm / 1e6,
                                                      canonical.reducers):
            reason = (f"{c.peer_id} was not drawn to check {c.target} in {where} "
                      f"(at rate {canonical.check_rate_ppm / 1e6:g} among {len(canonical.reducers)} reducer(s))")
        else:
            at = canonical.members.index(c.target)
            if not any(r.commitments and r.commitments[at] == c.commitment for r in canonical.receipts.get(c.peer_id, [])):
                reason = f"no receipt of the checker in {where} commits to the part it checked"
        if reason:
            sv.status, sv.reason = "ignored", f"spot check does not count: {reason}"


def receipted(record: ContributionRecord, groups: Mapping[tuple[int, int], Group]) -> tuple[bool, str]:
    """Whether a canonical receipt set of one of the record's shards vouches for its peer, and how."""
    problems = []
    for shard in record.shards:
        where = f"round {record.round} shard {shard}"
        group = groups.get((record.round, shard))
        if group is None:
            continue
        rs = group.canonical
        if rs is None:
            problems.append(f"{where}: {group.note}")
            continue
        if record.peer_id not in rs.members:
            problems.append(f"{where}: the receipted group of {len(rs.members)} does not include this peer")
            continue
        others = [s for s in rs.counted if s != record.peer_id]
        need = max(1, (len(rs.members) - len(rs.barred)) // 2)  # barred members neither vouch nor count
        if len(others) >= need:
            return True, f"receipted in {where} by {len(others)} other member(s) of a group of {len(rs.members)}"
        problems.append(f"{where}: {len(others)} other member(s) of the group of {len(rs.members)} signed a receipt, "
                        f"{need} needed")
    return False, "no receipt from another group member names this record" + (
        f" ({'; '.join(problems)})" if problems else "")
