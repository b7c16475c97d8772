"""The local ledger (append, chain checks, torn-tail recovery), offline verification and credit, and the CLI.

Run: python -m pytest tests/test_ledger.py -q
"""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node.cli import main
from node.ledger import Ledger, LedgerError, compute_credit, read_log, verify_logs
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
