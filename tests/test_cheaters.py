"""Cheaters in a real swarm (127.0.0.1, real p2pd, the tiny Llama), and what credit makes of them.

Two honest nodes train with three adversarial ones the test builds with fault hooks (node/rounds.py, as a
modified client would behave): a free-rider that never trains or averages but signs a record claiming the
round's whole batch every round; a node that sends zeros and one that sends noise at its gradient's norm,
both with valid records. Afterwards two sybil keys sign records and receipts naming only each other for
every round. `swarmtune credit` over every file the nodes kept (ledgers, receipts) and the sybils' says:
the free-rider and the sybils earn nothing, the junk senders nothing for the rounds they were caught in,
the honest nodes every round; the accusations verify offline (`ledger verify` exits 0).

Spot-checks run at rate 1 here (every member checked every round) so the test is decisive in few rounds;
at the default rate (0.21) the draw's frequency is tested in tests/test_receipt.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, write_test_manifest

pytestmark = pytest.mark.swarm


def _credit(manifest, files, *extra):
    out = subprocess.run([sys.executable, "-m", "node", "credit", "--manifest", str(manifest), "--json", "--ledger",
                          *map(str, files), *extra], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    return {row["peer_id"]: row for row in map(json.loads, out.stdout.splitlines())}


def _sybils(tmp_path, manifest, honest_receipts):
    """Two sybil keys: a record each for every round the honest node receipted, and receipts naming only each
    other with the honest round's own result hash (the strongest forgery: copied from the DHT)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from node.ledger import Ledger
    from node.manifest import load_manifest
    from protocol.peerid import peer_id_from_public_key
    from protocol.receipt import RoundReceipt, classify, sign_receipt, verify_receipt
    from protocol.record import public_bytes

    m = load_manifest(manifest)
    honest = {}
    for line in honest_receipts.read_bytes().splitlines():
        if line and classify(line) == "receipt":
            r = verify_receipt(line)
            honest[(r.round, r.shard)] = r.result_hash
    keys = [Ed25519PrivateKey.generate() for _ in range(2)]
    ids = sorted(peer_id_from_public_key(public_bytes(k)) for k in keys)
    out, receipts = [], []
    for i, key in enumerate(keys):
        me = peer_id_from_public_key(public_bytes(key))
        path = tmp_path / f"sybil-{i}.jsonl"
        with Ledger.open(path) as ledger:
            for r in sorted({r for r, _ in honest}):
                ledger.append_new(key, swarm_id=m.swarm_id, round=r, shards=tuple(sorted(k for q, k in honest if q == r)),
                                  samples=m.credit_cap, tokens=m.credit_cap * 10, loss_before=1, loss_after=0,
                                  adapter_hash="0" * 64, data_commitment="1" * 64, grad_commitment="2" * 64,
                                  start_ms=1, end_ms=2)
        out.append(path)
        for (r, k), result in sorted(honest.items()):
            receipts.append(sign_receipt(RoundReceipt(
                version=1, swarm_id=m.swarm_id, round=r, shard=k, peer_id=me, members=tuple(ids),
                commitments=("3" * 64, "4" * 64), result_hash=result, reducers=tuple(ids), check_rate_ppm=0), key))
    (tmp_path / "sybil-receipts.jsonl").write_bytes(b"".join(b + b"\n" for b in receipts))
    return out + [tmp_path / "sybil-receipts.jsonl"], ids


@pytest.mark.timeout(420)
def test_free_rider_junk_and_sybils_earn_nothing(tmp_path, tiny_base, spawn_node):
    rounds = 8  # a node can come up a few rounds late on a busy 2-core box
    manifest = write_test_manifest(tmp_path / "swarm.toml", tiny_base, rounds={"max_rounds": rounds},
                                   credit={"spot_check_rate": 1.0, "exclude_after": 2})
    # the free-rider first, up before anyone trains (it only watches: a late start would leave it nothing to claim)
    f = spawn_node(manifest, "freerider", "--min-peers", "5", env={"SWARMTUNE_FAULT_FREERIDE": "1"})
    peers = f.wait_info()["maddrs"]
    a = spawn_node(manifest, "a", "--min-peers", "5", "--initial-peers", *peers)
    b = spawn_node(manifest, "b", "--min-peers", "5", "--initial-peers", *peers)
    z = spawn_node(manifest, "zeros", "--min-peers", "5", "--initial-peers", *peers, env={"SWARMTUNE_FAULT_JUNK": "zeros"})
    n = spawn_node(manifest, "noise", "--min-peers", "5", "--initial-peers", *peers, env={"SWARMTUNE_FAULT_JUNK": "noise"})
    for node in (a, b):
        assert node.wait_exit(timeout=360) == 0, node.log.read_text()[-4000:]
    time.sleep(2)  # the cheaters' last records
    ids = {node.home.name: node.info()["peer_id"] for node in (a, b, z, n, f)}
    # honest adapters identical every round they both applied
    rows = {node.home.name: node.applied() for node in (a, b)}
    both = sorted(set(rows["a"]) & set(rows["b"]))
    # (5 nodes on a 2-core box: one may come up late, or lose a round or two while exclusions settle)
    assert len(both) >= rounds // 2, (sorted(rows["a"]), sorted(rows["b"]))
    # four trainers may match as two pairs in a round (honest + junk each) before the junk is left out; the
    # honest pair then resyncs. Most rounds are summed together, and both end with one adapter.
    same = [r for r in both if rows["a"][r]["hash"] == rows["b"][r]["hash"]]
    assert len(same) >= rounds // 2, [(r, rows["a"][r]["groups"], rows["b"][r]["groups"]) for r in both]
    assert a.rounds()[-1]["hash"] == b.rounds()[-1]["hash"], "the honest pair ends with one adapter"
    # the junk senders were caught and then left out
    for name in ("zeros", "noise"):
        # checked by a groupmate (an honest node, or the other junk sender: its checks run the honest code)
        assert f"spot-check of {ids[name][:16]}" in "".join(node.log.read_text() for node in (a, b, z, n)), name
        assert any(f"peer {ids[name]} failed" in node.log.read_text() for node in (a, b)), name
    files = [node.workdir / name for node in (a, b, z, n, f) for name in ("ledger.jsonl", "receipts.jsonl")
             if (node.workdir / name).exists()]
    credit = _credit(manifest, files)  # the swarm's own evidence
    assert credit[ids["freerider"]]["credited_rounds"] == 0, credit[ids["freerider"]]
    assert credit[ids["freerider"]]["claimed_rounds"] >= 1  # as many as its state downloads allowed
    for name in ("zeros", "noise"):
        row = credit.get(ids[name], {"credited_rounds": 0, "spot_checks_failed": 0})
        assert row["spot_checks_failed"] >= 2, row
        assert row["credited_rounds"] == 0, row
    for name in ("a", "b"):  # every honest round summed in a group is credited, even those where the excluded
        row = credit[ids[name]]  # junk senders summed a pair of their own (a round a node summed alone is not)
        grouped = sum(1 for r in rows[name].values() if r["groups"])
        assert row["claimed_rounds"] >= row["credited_rounds"] >= max(grouped, rounds // 2), (row, grouped)
        assert row["spot_checks_failed"] == 0 and row["spot_checks_passed"] >= 1, row
    # two sybil keys receipting each other with the honest rounds' result hashes (copied from the DHT) earn
    # nothing; where the honest group was a pair they tie it, and that round credits nobody (README: residual risks)
    sybil_files, sybils = _sybils(tmp_path, manifest, a.workdir / "receipts.jsonl")
    with_sybils = _credit(manifest, files + sybil_files)
    for s in sybils:
        assert with_sybils[s]["claimed_rounds"] >= rounds // 2 and with_sybils[s]["credited_rounds"] == 0, with_sybils[s]
    files += sybil_files
    verify = subprocess.run([sys.executable, "-m", "node", "ledger", "verify", "--manifest", str(manifest), "--ledger",
                             *map(str, files)], capture_output=True, text=True, cwd=REPO)
    assert verify.returncode == 0, verify.stdout[-3000:] + verify.stderr
    explain = subprocess.run([sys.executable, "-m", "node", "credit", "--manifest", str(manifest), "--explain",
                              ids["freerider"], "--ledger", *map(str, files)], capture_output=True, text=True, cwd=REPO)
    assert explain.returncode == 0 and "receipt" in explain.stdout, explain.stdout + explain.stderr
