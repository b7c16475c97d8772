"""The local ledger (append, chain checks, torn-tail recovery), offline verification and credit, and the CLI.

Run: python -m pytest tests/test_ledger.py -q
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node.cli import main
from node.credit import compute_credit, verify_logs
from node.ledger import Ledger, LedgerError, read_log
from protocol.peerid import peer_id_from_public_key
from protocol.record import (
    ZERO_HASH,
    ContributionRecord,
    KeyRotation,
    public_bytes,
    record_hash,
    sign_record,
    sign_rotation,
)

SWARM = "ab" * 32
REPO = Path(__file__).resolve().parents[1]
OTHER_SWARM = "cd" * 32
CAP = 100
A = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
B = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
C = Ed25519PrivateKey.from_private_bytes(bytes(range(2, 34)))


def pid(key) -> str:
    return peer_id_from_public_key(public_bytes(key))


FIELDS = dict(
    shards=(0, 1), samples=50, tokens=5000, loss_before=2_500_000, loss_after=2_400_000, adapter_hash="11" * 32,
    data_commitment="22" * 32, grad_commitment="33" * 32, start_ms=1000, end_ms=2000,
)


def record(key, seq, prev, round_, swarm=SWARM, **over) -> bytes:
    fields = dict(FIELDS, **over)
    return sign_record(
        ContributionRecord(version=1, swarm_id=swarm, peer_id=pid(key), seq=seq, prev_hash=prev, round=round_, **fields),
        key,
    )


def chain(key, n, swarm=SWARM, samples=50, first_round=0) -> list[bytes]:
    blobs, prev = [], ZERO_HASH
    for seq in range(n):
        blob = record(key, seq, prev, first_round + seq, swarm=swarm, samples=samples)
        blobs.append(blob)
        prev = record_hash(blob)
    return blobs


def fields_for(round_, samples=50) -> dict:
    return dict(FIELDS, swarm_id=SWARM, round=round_, samples=samples)


# ---------------------------------------------------------------- local ledger


def verify_chain(*args, **kwargs):
    """verify_logs for the chain rules alone: records credited without receipts (tests/test_receipt.py
    and the receipt tests below cover receipts)."""
    return verify_logs(*args, require_receipts=False, **kwargs)


def test_append_reopen_and_head(tmp_path):
    path = tmp_path / "l.log"
    with Ledger.open(path) as ledger:
        assert ledger.head() is None and ledger.head_hash() == ZERO_HASH
        blobs = [ledger.append_new(A, **fields_for(r)) for r in range(3)]
        assert ledger.head().seq == 2
    assert path.read_bytes() == b"".join(b + b"\n" for b in blobs)
    with Ledger.open(path) as ledger:
        assert ledger.torn is None
        assert [r.seq for r in ledger.records()] == [0, 1, 2] and ledger.blobs() == blobs
        assert ledger.head_hash() == record_hash(blobs[-1])
        ledger.append_new(A, **fields_for(3))
        assert ledger.next_seq == 4


def test_append_checks_the_chain(tmp_path):
    a = chain(A, 2)
    with Ledger.open(tmp_path / "l.log") as ledger:
        with pytest.raises(LedgerError, match="first record must have seq 0"):
            ledger.append(a[1])
        ledger.append(a[0])
        with pytest.raises(LedgerError, match="belongs to"):
            ledger.append(chain(B, 2)[1])
        with pytest.raises(LedgerError, match="swarm"):
            ledger.append(record(A, 1, record_hash(a[0]), 1, swarm=OTHER_SWARM))
        with pytest.raises(LedgerError, match="seq 2 does not follow"):
            ledger.append(record(A, 2, record_hash(a[0]), 1))
        with pytest.raises(LedgerError, match="prev_hash"):
            ledger.append(record(A, 1, "ef" * 32, 1))
        with pytest.raises(LedgerError, match="round 0 is not after"):
            ledger.append(record(A, 1, record_hash(a[0]), 0))
        ledger.append(a[1])
        assert ledger.next_seq == 2
    assert len(read_log(tmp_path / "l.log").blobs) == 2  # refused appends wrote nothing


def test_torn_last_line_is_recovered_reported_and_not_credited(tmp_path, caplog):
    path = tmp_path / "l.log"
    blobs = chain(A, 3)
    path.write_bytes(b"".join(b + b"\n" for b in blobs[:2]) + blobs[2][:77])  # crash mid-write
    contents = read_log(path)
    assert contents.torn is not None and len(contents.blobs) == 2
    report = verify_chain({str(path): contents.blobs}, SWARM, CAP)
    assert report.ok and compute_credit(report)[pid(A)].rounds == 2
    with Ledger.open(path) as ledger:
        assert ledger.torn is not None and ledger.torn.data == blobs[2][:77]
        assert ledger.next_seq == 2
        ledger.append(blobs[2])  # the node re-signs / re-appends the round after recovery
    assert "torn last entry" in caplog.text
    assert (tmp_path / f"l.log.torn-{len(blobs[0]) + len(blobs[1]) + 2}").read_bytes() == blobs[2][:77]
    assert read_log(path).blobs == blobs and read_log(path).torn is None


def test_invalid_complete_last_line_is_dropped_but_corrupt_middle_is_an_error(tmp_path):
    blobs = chain(A, 3)
    path = tmp_path / "l.log"
    path.write_bytes(blobs[0] + b"\n" + blobs[1] + b"\n" + b"\0" * 40 + b"\n")
    with Ledger.open(path) as ledger:
        assert ledger.next_seq == 2 and "invalid" in ledger.torn.reason
    bad = tmp_path / "bad.log"
    bad.write_bytes(blobs[0] + b"\n" + blobs[1].replace(b'"samples":50', b'"samples":51') + b"\n" + blobs[2] + b"\n")
    with pytest.raises(LedgerError, match="line 2: signature"):
        Ledger.open(bad)
    # a valid record that does not extend the chain is not crash junk: an error, nothing dropped
    foreign = tmp_path / "foreign.log"
    foreign.write_bytes(blobs[0] + b"\n" + chain(B, 2)[1] + b"\n")
    with pytest.raises(LedgerError, match="line 2: record is signed by"):
        Ledger.open(foreign)
    with pytest.raises(LedgerError, match="cannot open ledger"):
        Ledger.open(tmp_path)
    assert bad.read_bytes().count(b"\n") == 3  # untouched


def test_one_writer_at_a_time(tmp_path):
    with Ledger.open(tmp_path / "l.log"):
        with pytest.raises(LedgerError, match="in use by another process"):
            Ledger.open(tmp_path / "l.log")


# ---------------------------------------------------------------- verification


def statuses(report):
    return [(v.status, v.reason) for v in report.records]


def test_honest_logs_verify():
    report = verify_chain({"a": chain(A, 3), "b": chain(B, 1, samples=100)}, SWARM, CAP)
    assert report.ok, statuses(report)
    assert all(v.status == "ok" and v.reason == "" for v in report.records)
    assert report.peers[pid(A)].head_seq == 2 and report.peers[pid(B)].head_seq == 0
    credit = compute_credit(report)
    assert (credit[pid(A)].rounds, credit[pid(A)].samples, credit[pid(A)].tokens) == (3, 150, 15000)


def test_tokens_are_capped_by_credited_samples_times_max_length():
    """A record with in-cap samples and 10^12 tokens verifies, but is credited at most samples x max_length
    tokens (no example is trained on more than max_length tokens); honest records are untouched."""
    inflated = [record(A, 0, ZERO_HASH, 0, samples=50, tokens=10**12)]
    report = verify_chain({"a": inflated, "b": chain(B, 1)}, SWARM, CAP, max_tokens_per_sample=128)
    assert report.ok, statuses(report)
    credit = compute_credit(report)
    assert credit[pid(A)].tokens == 50 * 128
    assert credit[pid(B)].tokens == 5000  # 50 samples, 5000 tokens: under the cap
    # a full round's samples: CAP x max_length tokens at most
    over = [record(A, 0, ZERO_HASH, 0, samples=CAP, tokens=10**9)]
    assert compute_credit(verify_chain({"a": over}, SWARM, CAP, max_tokens_per_sample=128))[pid(A)].tokens == CAP * 128


def test_credit_shares():
    report = verify_chain({"a": chain(A, 3), "b": chain(B, 1, samples=100)}, SWARM, CAP)
    assert report.ok
    credit = compute_credit(report)
    assert credit[pid(A)].share == pytest.approx(0.6) and credit[pid(B)].share == pytest.approx(0.4)


def test_replay_same_record_twice_is_credited_once():
    a = chain(A, 3)
    report = verify_chain({"a": a + [a[2]]}, SWARM, CAP)
    assert statuses(report)[3] == ("fail", "replay: the same record (seq 2) appears twice in a")
    assert compute_credit(report)[pid(A)].rounds == 3
    # the same records from the ledger and from the DHT: copies, valid, credited once
    report = verify_chain({"a": a, "dht": a[1:]}, SWARM, CAP)
    assert report.ok and [v.status for v in report.records] == ["ok"] * 3 + ["duplicate"] * 2
    assert compute_credit(report)[pid(A)].samples == 150


def test_reordered_log():
    a = chain(A, 3)
    report = verify_chain({"a": [a[0], a[2], a[1]]}, SWARM, CAP)
    assert not report.ok
    assert statuses(report)[2] == ("fail", "log out of order: seq 1 after seq 2 in a (reordered)")
    assert statuses(report)[1] == ("fail", "chain broken: seq 1 is missing (deleted entry)")


def test_deleted_middle_entry():
    a = chain(A, 4)
    report = verify_chain({"a": [a[0], a[1], a[3]]}, SWARM, CAP)
    assert statuses(report) == [("ok", ""), ("ok", ""), ("fail", "chain broken: seq 2 is missing (deleted entry)")]
    assert report.peers[pid(A)].reasons == ["chain broken: seq 2 is missing (deleted entry)"]
    assert compute_credit(report)[pid(A)].rounds == 2


def test_missing_genesis():
    a = chain(A, 3)
    report = verify_chain({"dht": a[1:]}, SWARM, CAP)
    assert statuses(report)[0] == ("fail", "chain broken: seq 0 is missing (deleted entry)")


def test_truncated_tail_below_published_head():
    a = chain(A, 5)
    report = verify_chain({"a": a[:3]}, SWARM, CAP, published_heads={pid(A): 4})
    assert all(v.status == "ok" for v in report.records) and not report.ok
    assert report.peers[pid(A)].reasons == ["log ends at seq 2 below the published head seq 4 (truncated tail)"]
    assert verify_chain({"a": a}, SWARM, CAP, published_heads={pid(A): 4}).ok


def test_equivocation():
    a = chain(A, 3)
    fork = record(A, 1, record_hash(a[0]), 1, samples=99)  # a second record with seq 1
    report = verify_chain({"a": a, "dht": [fork]}, SWARM, CAP)
    assert not report.ok
    assert statuses(report)[1] == ("fail", "equivocation: 2 different records signed with seq 1")
    assert statuses(report)[3] == ("fail", "equivocation: 2 different records signed with seq 1")
    assert statuses(report)[2] == ("fail", "chain broken at seq 1 by equivocation")
    assert "equivocation at seq 1" in report.peers[pid(A)].reasons
    assert compute_credit(report)[pid(A)].rounds == 1


def test_broken_prev_hash():
    a = chain(A, 2)
    report = verify_chain({"a": [a[0], record(A, 1, "ef" * 32, 1)]}, SWARM, CAP)
    assert statuses(report)[1] == ("fail", "chain broken: prev_hash of seq 1 does not match the hash of seq 0")


def test_wrong_swarm_id():
    report = verify_chain({"a": chain(A, 2, swarm=OTHER_SWARM)}, SWARM, CAP)
    assert statuses(report)[0] == ("fail", f"wrong swarm id: record is for {OTHER_SWARM}, expected {SWARM}")
    assert compute_credit(report) == {}


def test_counts_over_cap_and_same_round_twice():
    a0 = record(A, 0, ZERO_HASH, 5)
    a1 = record(A, 1, record_hash(a0), 5)  # claims round 5 again
    a2 = record(A, 2, record_hash(a1), 6, samples=CAP + 1)
    a3 = record(A, 3, record_hash(a2), 7, samples=CAP)
    report = verify_chain({"a": [a0, a1, a2, a3]}, SWARM, CAP)
    assert statuses(report) == [
        ("ok", ""),
        ("fail", "round 5 is not after round 5 of an earlier record (claimed twice)"),
        ("fail", f"samples {CAP + 1} exceed the cap of {CAP} per round"),
        ("ok", ""),  # the chain itself is intact: later honest work still counts
    ]
    assert compute_credit(report)[pid(A)].samples == 50 + CAP


def test_tampered_and_forged_records_fail_with_reasons():
    a = chain(A, 2)
    moved = a[1].replace(b'"round":1', b'"round":9')
    report = verify_chain({"a": [a[0], moved, b"", b"junk"]}, SWARM, CAP)
    assert statuses(report)[1][1] == f"signature: signature does not verify under the key of {pid(A)}"
    assert statuses(report)[2][1] == "size: empty value"
    assert statuses(report)[3][1] == "envelope: expected '{\"signer\":\"' at byte 0"


def test_rotated_key_misuse():
    a = chain(A, 4)
    rotation = sign_rotation(KeyRotation(1, SWARM, pid(A), pid(C), 2, record_hash(a[1]), 5000), A, C)
    c = chain(C, 2, first_round=2)
    report = verify_chain({"a": a, "c": c}, SWARM, CAP, rotations=[rotation])
    reason = f"signed by a rotated-out key: {pid(A)} was replaced by {pid(C)} from seq 2"
    assert statuses(report) == [("ok", ""), ("ok", ""), ("fail", reason), ("fail", reason), ("ok", ""), ("ok", "")]
    assert report.peers[pid(A)].rotated_to == pid(C)
    credit = compute_credit(report)  # the retired key's work is counted in the new key's row
    assert pid(A) not in credit and credit[pid(C)].rounds == 4 and credit[pid(C)].rotated_from == (pid(A),)
    # the rotation pins the old head: a different record at the old head's seq is rejected
    forged_head = record(A, 1, record_hash(a[0]), 1, samples=77)
    report = verify_chain({"a": [a[0], forged_head]}, SWARM, CAP, rotations=[rotation])
    assert statuses(report)[1] == ("fail", "seq 1 is not the head named by the key rotation")
    # a rotation statement with a bad signature is itself a failure
    bad = rotation[:-5] + b"0000}"
    assert verify_chain({"a": a[:2]}, SWARM, CAP, rotations=[bad]).rotation_errors


# ---------------------------------------------------------------- CLI


@pytest.fixture
def logs(tmp_path):
    good, bad = tmp_path / "a.log", tmp_path / "b.log"
    good.write_bytes(b"".join(b + b"\n" for b in chain(A, 3)))
    b = chain(B, 3)
    bad.write_bytes(b"".join(x + b"\n" for x in [b[0], b[2]]))
    return good, bad


def test_cli_verify_and_credit(logs, capsys):
    good, bad = logs
    assert main(["ledger", "verify", "--ledger", str(good), "--swarm-id", SWARM, "--max-samples", "100"]) == 0
    capsys.readouterr()
    args = ["--ledger", str(good), str(bad), "--swarm-id", SWARM, "--max-samples", "100", "--json", "--no-receipts"]
    assert main(["ledger", "verify", *args]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    verdicts = [d for d in lines if "status" in d]
    assert len(verdicts) == 5
    assert verdicts[4]["status"] == "fail" and "seq 1 is missing" in verdicts[4]["reason"]
    assert main(["credit", *args]) == 0
    credit = {d["peer_id"]: d for d in map(json.loads, capsys.readouterr().out.splitlines())}
    assert credit[pid(A)]["rounds"] == 3 and credit[pid(B)]["rounds"] == 1
    assert main(["ledger", "verify", "--ledger", str(good)]) == 2  # no swarm given
    assert "--manifest" in capsys.readouterr().err


def test_cli_verify_with_manifest(tmp_path, capsys):
    manifest_mod = pytest.importorskip("node.manifest")
    path = tmp_path / "swarm.toml"
    path.write_text(
        '[swarm]\nname = "t"\n[base]\nmodel = "m"\nfingerprint = "' + "0" * 64 + '"\n'
        '[data]\nsource = "d.jsonl"\ndigest = "' + "1" * 64 + '"\n[credit]\nmax_samples_per_round = 40\n'
    )
    manifest = manifest_mod.load_manifest(path)
    log = tmp_path / "a.log"
    log.write_bytes(b"".join(b + b"\n" for b in chain(A, 2, swarm=manifest.swarm_id, samples=40)))
    assert main(["ledger", "verify", "--ledger", str(log), "--manifest", str(path)]) == 0
    capsys.readouterr()
    # the manifest's cap applies; a flag overrides it
    assert main(["ledger", "verify", "--ledger", str(log), "--manifest", str(path), "--max-samples", "39", "--json"]) == 1
    assert "samples 40 exceed the cap of 39 per round" in capsys.readouterr().out
    assert main(["ledger", "verify", "--ledger", str(log), "--swarm-id", SWARM, "--max-samples", "40", "--json"]) == 1
    assert "wrong swarm id" in capsys.readouterr().out
    assert main(["ledger", "verify", "--ledger", str(log), "--manifest", str(tmp_path / "none.toml")]) == 2
    assert "none.toml" in capsys.readouterr().err


def test_cli_show_and_export(logs, tmp_path, capsys):
    good, bad = logs
    assert main(["ledger", "show", "--ledger", str(good), str(bad), "--peer", pid(B)[:20], "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["seq"], r["round"]) for r in rows] == [(0, 0), (2, 2)]
    assert main(["ledger", "show", "--ledger", str(good), "--round", "1", "--json"]) == 0
    assert [json.loads(line)["seq"] for line in capsys.readouterr().out.splitlines()] == [1]
    assert main(["ledger", "show", "--ledger", str(good)]) == 0
    assert "3 record(s)" in capsys.readouterr().out
    out = tmp_path / "x.jsonl"
    assert main(["ledger", "export", "--ledger", str(good), "--format", "jsonl", "--out", str(out)]) == 0
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    assert [e["envelope"].encode() for e in exported] == chain(A, 3)  # re-verifiable as exported
    assert main(["ledger", "export", "--ledger", str(good), "--format", "csv"]) == 0
    csv_lines = capsys.readouterr().out.splitlines()
    assert csv_lines[0].startswith("version,swarm_id,peer_id,seq") and len(csv_lines) == 4
    assert main(["ledger", "show", "--ledger", str(tmp_path / "missing.log")]) == 2


# ---------------------------------------------------------------- receipts, spot checks, credit

from protocol.receipt import (  # noqa: E402
    DEFAULT_SPOT_CHECK_RATE,
    MAX_RECEIPT_BYTES,
    RoundReceipt,
    SpotCheck,
    sign_check,
    sign_receipt,
    spot_checks,
    verify_check,
)

D = Ed25519PrivateKey.from_private_bytes(bytes(range(3, 35)))
S1 = Ed25519PrivateKey.from_private_bytes(bytes(range(4, 36)))
S2 = Ed25519PrivateKey.from_private_bytes(bytes(range(5, 37)))
KEYS = {pid(k): k for k in (A, B, C, D, S1, S2)}


def part(member: str, round_: int, shard: int) -> str:
    return hashlib.sha256(f"{member}|{round_}|{shard}".encode()).hexdigest()


def receipts(group, signers=None, round_=0, shard=0, result="ee" * 32, commitments=True) -> list[bytes]:
    """A receipt from each signer (default: every member) of `group` for (round_, shard)."""
    members = tuple(sorted(pid(k) for k in group))
    out = []
    for key in signers if signers is not None else group:
        parts = tuple(part(m, round_, shard) for m in members) if commitments else ()
        out.append(sign_receipt(RoundReceipt(1, SWARM, round_, shard, pid(key), members, parts, result,
                                             members if commitments else (), RATE_PPM), key))
    return out


RATE_PPM = round(DEFAULT_SPOT_CHECK_RATE * 1e6)


def drawn(group, target, rate=DEFAULT_SPOT_CHECK_RATE):
    """A result hash whose draw checks `target`, and the checker it draws."""
    members = sorted(pid(k) for k in group)
    for i in range(10_000):
        h = hashlib.sha256(b"sum %d" % i).hexdigest()
        for checker, t in spot_checks(h, members, rate, members):
            if t == pid(target):
                return h, KEYS[checker]
    raise AssertionError("no draw found")


def spot(checker, target, result, failed, round_=0, shard=0, commitment=None) -> bytes:
    error = 1_000_000 if failed else 1_000
    return sign_check(SpotCheck(1, SWARM, round_, shard, pid(checker), pid(target), result,
                                commitment or part(pid(target), round_, shard), "dd" * 32, error, 500_000,
                                int(failed), 1_700_000_000_000), checker)


def by_peer(report) -> dict:
    return {v.peer_id: (v.status, v.reason) for v in report.records}


def test_honest_group_is_credited_and_a_free_rider_is_not():
    honest = {"a": chain(A, 1), "b": chain(B, 1), "c": chain(C, 1), "r": receipts([A, B, C])}
    report = verify_logs({**honest, "d": chain(D, 1)}, SWARM, CAP)  # D claims round 0 but no group had it
    assert report.ok  # an uncredited record is not a verification failure
    status = by_peer(report)
    assert all(status[pid(k)] == ("ok", "") for k in (A, B, C))
    assert status[pid(D)] == ("uncredited", "no receipt from another group member names this record "
                                            "(round 0 shard 0: the receipted group of 3 does not include this peer)")
    credit = compute_credit(report)
    assert (credit[pid(D)].claimed_rounds, credit[pid(D)].credited_rounds, credit[pid(D)].share) == (1, 0, 0.0)
    assert credit[pid(A)].receipted_rounds == credit[pid(A)].credited_rounds == 1
    assert credit[pid(A)].credited_samples == 50 and credit[pid(A)].share == pytest.approx(1 / 3)
    alone = verify_logs({"d": chain(D, 1)}, SWARM, CAP)
    assert by_peer(alone)[pid(D)] == ("uncredited", "no receipt from another group member names this record")


def test_sybil_pair_loses_to_an_honest_group_and_wins_alone():
    sybils = {"s1": chain(S1, 1), "s2": chain(S2, 1), "rs": receipts([S1, S2])}
    honest = {"a": chain(A, 1), "b": chain(B, 1), "c": chain(C, 1), "r": receipts([A, B, C])}
    report = verify_logs({**sybils, **honest}, SWARM, CAP)
    status = by_peer(report)
    assert all(status[pid(k)][0] == "ok" for k in (A, B, C))
    for s in (S1, S2):
        assert status[pid(s)] == ("uncredited", "no receipt from another group member names this record "
                                                "(round 0 shard 0: the receipted group of 3 does not include this peer)")
    assert [s.status for s in report.statements if s.peer_id in (pid(S1), pid(S2))] == ["ignored", "ignored"]
    assert "outvoted" in report.statements[0].reason
    assert report.groups[(0, 0)].note == "1 other receipt set(s) with fewer signers outvoted"
    # sybils naming the honest members in a bigger group they alone sign: still outvoted (2 < 3 signers)
    padded = receipts([S1, S2, A, B, C], signers=[S1, S2], result="ff" * 32)
    report = verify_logs({**sybils, "rs": padded, **honest}, SWARM, CAP)
    assert by_peer(report)[pid(S1)][0] == by_peer(report)[pid(S2)][0] == "uncredited"
    # the residual risk (README threat table): with no competing set, two sybils receipting each other are credited
    report = verify_logs(sybils, SWARM, CAP)
    assert by_peer(report)[pid(S1)] == by_peer(report)[pid(S2)] == ("ok", "")


def test_tied_receipt_sets_credit_nobody():
    report = verify_logs({"a": chain(A, 1), "b": chain(B, 1), "s1": chain(S1, 1), "s2": chain(S2, 1),
                          "r": receipts([A, B]) + receipts([S1, S2], result="ff" * 32)}, SWARM, CAP)
    assert report.ok and report.groups[(0, 0)].canonical is None
    tie = "round 0 shard 0: 2 receipt sets tie with 2 signer(s) each; none is canonical"
    assert all(v.status == "uncredited" and tie in v.reason for v in report.records)


def test_a_majority_of_the_group_must_sign():
    group = [A, B, C, D]  # A needs 2 others of 4
    report = verify_logs({"a": chain(A, 1), "r": receipts(group, signers=[A, B])}, SWARM, CAP)
    assert by_peer(report)[pid(A)] == (
        "uncredited", "no receipt from another group member names this record (round 0 shard 0: 1 other member(s) "
                      "of the group of 4 signed a receipt, 2 needed)")
    report = verify_logs({"a": chain(A, 1), "r": receipts(group, signers=[B, C])}, SWARM, CAP)
    assert by_peer(report)[pid(A)] == ("ok", "")  # A's own receipt is not needed
    assert compute_credit(report)[pid(A)].receipted_rounds == 1
    # one of the record's shards is enough: shard 1 receipted, shard 0 not
    report = verify_logs({"a": chain(A, 1), "r": receipts([A, B, C], shard=1)}, SWARM, CAP)
    assert by_peer(report)[pid(A)] == ("ok", "")


def test_failed_spot_check_uncredits_the_round_and_verifies_offline():
    group = [A, B, C]
    result, checker = drawn(group, A)
    sources = {"a": chain(A, 2), "b": chain(B, 1), "c": chain(C, 1),
               "r": receipts(group, result=result) + receipts(group, round_=1)}
    accusation = spot(checker, A, result, failed=True)
    report = verify_logs({**sources, "checks": [accusation]}, SWARM, CAP)
    assert report.ok
    a0, a1 = [v for v in report.records if v.peer_id == pid(A)]
    assert (a0.status, a0.reason) == ("uncredited", f"failed spot-check by {pid(checker)} in round 0 shard 0 "
                                                    "(error 1.00 > tolerance 0.50)")
    assert a0.receipted and (a1.status, a1.reason) == ("ok", "")  # the accused round only
    assert verify_check(accusation).failed == 1  # the evidence is a signed statement anyone can check
    credit = compute_credit(report)[pid(A)]
    assert (credit.claimed_rounds, credit.receipted_rounds, credit.credited_rounds) == (2, 2, 1)
    assert (credit.spot_checks_passed, credit.spot_checks_failed) == (0, 1)
    # a passing check counts as passed and takes nothing away
    report = verify_logs({**sources, "checks": [spot(checker, A, result, failed=False)] * 2}, SWARM, CAP)
    assert [s.status for s in report.statements if s.kind == "check"] == ["ok", "duplicate"]
    credit = compute_credit(report)[pid(A)]
    assert (credit.credited_rounds, credit.spot_checks_passed, credit.spot_checks_failed) == (2, 1, 0)


def test_peers_left_out_after_failed_checks_cannot_tie_the_honest_group():
    """Nodes leave a peer out after exclude_after failed checks; the peer and a partner then sum a group
    of their own. Its receipts must not tie (or outvote) the honest pair's from that round on."""
    group = [A, B, D]
    result, checker = drawn(group, D)
    sources = {"a": chain(A, 2), "b": chain(B, 2), "d": chain(D, 2), "s1": chain(S1, 1, first_round=1),
               "r": receipts(group, result=result) + receipts([A, B], round_=1)
               + receipts([D, S1], round_=1, result="ff" * 32),
               "checks": [spot(checker, D, result, failed=True)]}
    report = verify_logs(sources, SWARM, CAP, exclude_after=1)
    assert report.ok
    status = {(v.peer_id, v.round): v.status for v in report.records}
    assert status[(pid(A), 1)] == status[(pid(B), 1)] == "ok"
    assert status[(pid(D), 0)] == status[(pid(D), 1)] == status[(pid(S1), 1)] == "uncredited"
    assert "outvoted" in report.groups[(1, 0)].note
    # below the threshold the accused peer still counts: the two pairs tie and nobody is credited for round 1
    report = verify_logs(sources, SWARM, CAP, exclude_after=2)
    assert report.groups[(1, 0)].canonical is None
    assert {(v.peer_id, v.status) for v in report.records if v.round == 1} == {
        (pid(A), "uncredited"), (pid(B), "uncredited"), (pid(D), "uncredited"), (pid(S1), "uncredited")}


def test_checks_that_do_not_count_are_ignored():
    group = [A, B, C]
    result, checker = drawn(group, A)
    other = next(k for k in (B, C) if k is not checker)
    sources = {"a": chain(A, 1), "r": receipts(group, result=result)}
    cases = [
        (spot(other, A, result, failed=True), f"{pid(other)} was not drawn to check {pid(A)}"),
        (spot(checker, A, result, failed=True, commitment="77" * 32), "commits to the part it checked"),
        (spot(checker, A, "12" * 32, failed=True), "result hash is not that of the canonical receipt set"),
        (spot(checker, A, result, failed=True, round_=5), "no canonical receipt set for round 5 shard 0"),
        (spot(checker, D, result, failed=True), "the target is not a member"),
    ]
    for blob, fragment in cases:
        report = verify_logs({**sources, "checks": [blob]}, SWARM, CAP)
        check = report.statements[-1]
        assert check.status == "ignored" and fragment in check.reason, check.reason
        assert report.ok and by_peer(report)[pid(A)] == ("ok", "")
        assert compute_credit(report)[pid(A)].spot_checks_failed == 0
    # a checker whose receipt committed to nothing (it reduced no part) cannot accuse
    quiet = receipts(group, signers=[A, other], result=result) + receipts(group, signers=[checker], result=result,
                                                                         commitments=False)
    report = verify_logs({"a": chain(A, 1), "r": quiet, "checks": [spot(checker, A, result, True)]}, SWARM, CAP)
    assert report.statements[-1].status == "ignored" and by_peer(report)[pid(A)] == ("ok", "")


def test_forged_replayed_malformed_and_oversized_statements():
    group = [A, B, C]
    good = receipts(group)
    result, checker = drawn(group, A)
    check = spot(checker, A, result, failed=True)
    forged = good[1].replace(b'"round":0', b'"round":1')
    wrong_swarm = sign_receipt(RoundReceipt(1, OTHER_SWARM, 0, 0, pid(B), (pid(B),), (), "ee" * 32), B)
    oversized = good[1][:-1] + b" " * MAX_RECEIPT_BYTES + b"}"
    cases = [
        (forged, "signature: signature does not verify"),
        (check.replace(b'"failed":1', b'"failed":0'), "signature"),
        (good[1][:100], "envelope"),
        (oversized, "size"),
        (wrong_swarm, "wrong swarm id: receipt is for"),
    ]
    for blob, fragment in cases:
        report = verify_logs({"a": chain(A, 1), "r": [good[0], good[2], blob]}, SWARM, CAP)
        assert not report.ok
        # a line too broken to tell its kind is reported with the records, with the same reason
        failed = [v for v in report.records + report.statements if v.status == "fail"]
        assert len(failed) == 1 and fragment in failed[0].reason, failed[0].reason
        assert by_peer(report)[pid(A)] == ("ok", "")  # A's and C's receipts still make a majority
    # a replayed receipt counts once: B's receipt three times is still one signer
    report = verify_logs({"a": chain(A, 1), "r": [good[0], good[1]], "dht": [good[1], good[1]]},
                         SWARM, CAP)
    assert report.ok and [s.status for s in report.statements] == ["ok", "ok", "duplicate", "duplicate"]
    assert report.groups[(0, 0)].canonical.signers == sorted([pid(A), pid(B)])


def test_rotation_in_a_source_moves_credit_to_the_new_key():
    a = chain(A, 2)
    rotation = sign_rotation(KeyRotation(1, SWARM, pid(A), pid(D), 2, record_hash(a[1]), 5000), A, D)
    d = chain(D, 1, first_round=2)
    r = receipts([A, B], round_=0) + receipts([A, B], round_=1) + receipts([D, B], round_=2)
    report = verify_logs({"a": a + [rotation], "d": d, "r": r, "b": chain(B, 3)}, SWARM, CAP)
    assert report.ok and report.rotations[pid(A)].new_peer_id == pid(D)
    credit = compute_credit(report)
    assert pid(A) not in credit and credit[pid(D)].rotated_from == (pid(A),)
    assert (credit[pid(D)].claimed_rounds, credit[pid(D)].credited_rounds, credit[pid(D)].credited_samples) == (3, 3, 150)
    # a bad rotation line in a source is a failure, named with its place
    bad = verify_logs({"a": a + [rotation[:-5] + b"0000}"]}, SWARM, CAP)
    assert bad.rotation_errors and "a#3" in bad.rotation_errors[0]


def _run(*args, home):
    env = {**os.environ, "SWARMTUNE_HOME": str(home), "COLUMNS": "250"}
    return subprocess.run([sys.executable, "-m", "node", *args], capture_output=True, text=True, cwd=REPO, env=env)


def test_cli_credit_json_explain_and_default_sources(tmp_path):
    """`swarmtune credit` as a user runs it, from the node's own files: ledger, receipts, rotations."""
    group = [A, B, C]
    result, checker = drawn(group, A)
    folder = tmp_path / "swarms" / SWARM[:16]
    folder.mkdir(parents=True)
    lines = chain(A, 2) + chain(B, 2) + chain(D, 1)
    (folder / "ledger.jsonl").write_bytes(b"".join(x + b"\n" for x in chain(A, 2)))
    (tmp_path / "b.jsonl").write_bytes(b"".join(x + b"\n" for x in chain(B, 2) + chain(D, 1)))
    statements = receipts(group, result=result) + receipts(group, round_=1) + [spot(checker, A, result, True)]
    (folder / "receipts.jsonl").write_bytes(b"".join(x + b"\n" for x in statements))
    assert lines  # records of B and D live in another file, passed with --ledger below
    swarm = ["--swarm-id", SWARM, "--max-samples", str(CAP)]
    out = _run("credit", "--json", *swarm, home=tmp_path)  # default sources: $SWARMTUNE_HOME/swarms/*/
    assert out.returncode == 0, out.stderr
    rows = {r["peer_id"]: r for r in map(json.loads, out.stdout.splitlines())}
    fields = ("claimed_rounds", "receipted_rounds", "spot_checks_passed", "spot_checks_failed", "credited_rounds",
              "credited_samples", "credited_tokens", "share")
    assert tuple(rows[pid(A)][f] for f in fields) == (2, 2, 0, 1, 1, 50, 5000, 1.0)
    paths = [str(folder / "ledger.jsonl"), str(folder / "receipts.jsonl"), str(tmp_path / "b.jsonl")]
    out = _run("credit", "--json", "--ledger", *paths, *swarm, home=tmp_path)
    rows = {r["peer_id"]: r for r in map(json.loads, out.stdout.splitlines())}
    assert rows[pid(B)]["credited_rounds"] == 2 and rows[pid(B)]["rounds"] == 2
    assert rows[pid(D)]["claimed_rounds"] == 1 and rows[pid(D)]["credited_rounds"] == 0
    out = _run("credit", "--explain", pid(A)[:30], "--ledger", *paths, *swarm, home=tmp_path)
    assert out.returncode == 0, out.stderr
    explained = out.stdout.splitlines()
    assert explained[0].startswith(f"peer {pid(A)}: claimed 2, receipted 2, checks passed 0 failed 1, credited 1")
    assert f"round 0 shards 0,1: not credited: failed spot-check by {pid(checker)}" in explained[1]
    assert "round 1 shards 0,1: credited: receipted in round 1 shard 0 by 2 other member(s)" in explained[2]
    out = _run("credit", "--explain", pid(D), "--ledger", *paths, *swarm, home=tmp_path)
    assert "not credited: no receipt from another group member names this record" in out.stdout
    out = _run("credit", *swarm, "--ledger", *paths, home=tmp_path)
    header = next(line for line in out.stdout.splitlines() if "peer" in line)
    assert all(w in header for w in ("claimed", "receipted", "checks passed/failed", "credited rounds", "share"))
    assert f"{pid(A)} │       2 │         2 │                  0/1 │" in out.stdout
    assert _run("credit", "--explain", "12D3", "--ledger", *paths, *swarm, home=tmp_path).returncode == 2  # ambiguous
    # ledger verify: uncredited records are not failures (0); a forged receipt is (1)
    assert _run("ledger", "verify", "--ledger", *paths, *swarm, home=tmp_path).returncode == 0
    (tmp_path / "forged.jsonl").write_bytes(statements[0].replace(b'"shard":0', b'"shard":1') + b"\n")
    out = _run("ledger", "verify", "--json", "--ledger", *paths, str(tmp_path / "forged.jsonl"), *swarm, home=tmp_path)
    assert out.returncode == 1
    assert any(d.get("kind") == "receipt" and d["status"] == "fail" for d in map(json.loads, out.stdout.splitlines()))
