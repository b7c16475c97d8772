"""Long swarms: a rotated key continues in the daemon, and the DHT keeps a node's whole history past its expiry.

Run: flock /tmp/swarmtune-cpu.lock python -m pytest tests/test_rotation.py -q

The node tests start real `swarmtune run` processes (tiny model, builtin data, real p2pd on
127.0.0.1); the chain and republisher tests run in this process.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.cli import main
from node.identity import generate_identity, load_identity
from node.credit import verify_logs
from node.ledger import Ledger, read_log
from node.republish import Republisher, record_entry
from node.rotation import RotationError, plan_ledger, retire_ledger
from protocol.record import verify_rotation, verify_signed
from tests.conftest import REPO, write_test_manifest

SWARM = "cd" * 32
FIELDS = dict(swarm_id=SWARM, shards=(0,), samples=4, tokens=40, loss_before=1, loss_after=1, adapter_hash="1" * 64,
              data_commitment="2" * 64, grad_commitment="3" * 64, start_ms=0, end_ms=1)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "node", *args], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, **(env or {})))


def _verify(manifest: Path, *ledgers: Path, rotations: Path | None = None, dht: list[str] = ()) -> subprocess.CompletedProcess:
    extra = ["--rotations", str(rotations)] if rotations else []
    if dht:
        extra += ["--dht-peer", *dht]
    return _cli("ledger", "verify", "--manifest", str(manifest), "--ledger", *map(str, ledgers), *extra)


def _read_dht(maddrs: list[str], swarm_id: str) -> tuple[list[bytes], list[bytes]]:
    """(records, rotation statements) of the swarm, read by a client-mode DHT node in this process."""
    from node.rotation import read_dht_rotations
    from node.swarm.dht import start_dht
    from node.swarm.validator import RecordsValidator, collect_records

    dht = start_dht(initial_peers=maddrs, host_maddrs=None, client_mode=True,
                    record_validators=[RecordsValidator(swarm_id)], retries=1)
    try:
        return collect_records(dht, swarm_id), read_dht_rotations(dht, swarm_id)
    finally:
        dht.shutdown()


# ---------------------------------------------------------------- in process: the chain, the republisher


def test_chain_of_two_rotations_continues_the_ledger(tmp_path, monkeypatch, capsys):
    """A signs 3 records; A->B (keygen's default --ledger: the one swarm under the home); B->C before B ever
    ran (its chain here is cut at seq 0); the node with C keeps A's ledger and starts at seq 0."""
    home = tmp_path / "home"
    monkeypatch.setenv("SWARMTUNE_HOME", str(home))
    workdir = home / "swarms" / SWARM
    a, b, c = home / "a.key", home / "b.key", home / "c.key"
    key_a = generate_identity(a)
    with Ledger.open(workdir / "ledger.jsonl") as ledger:
        old = [ledger.append_new(key_a.private_key, round=r, **FIELDS) for r in range(3)]
    assert main(["keygen", "--key", str(a), "--rotate", str(b)]) == 0, capsys.readouterr().err
    # B never ran: keygen follows A->B from the ledger's head and cuts B's (empty) chain at seq 0
    assert main(["keygen", "--key", str(b), "--rotate", str(c)]) == 0, capsys.readouterr().err
    key_c = load_identity(c)
    key_c_peer = key_c.peer_id
    statements = (workdir / "rotations.jsonl").read_bytes().splitlines()
    r1, r2 = map(verify_rotation, statements)
    assert (r1.old_next_seq, r2.old_next_seq, r2.old_peer_id, r2.new_peer_id) == (3, 0, load_identity(b).peer_id, key_c_peer)

    plan = plan_ledger(workdir, key_c.peer_id, c)
    assert plan is not None and plan.old_peer_id == key_a.peer_id and len(plan.chain) == 2
    retired = retire_ledger(plan)
    assert retired.name == f"ledger-{key_a.peer_id}.jsonl" and not (workdir / "ledger.jsonl").exists()
    assert read_log(retired).blobs == old
    with Ledger.open(workdir / "ledger.jsonl") as ledger:
        new = [ledger.append_new(key_c.private_key, round=r, **FIELDS) for r in range(3, 5)]
    assert verify_signed(new[0]).seq == 0
    report = verify_logs({"old": old, "new": new}, SWARM, 10, rotations=statements)
    assert report.ok, [v.reason for v in report.records if not v.ok] + report.rotation_errors
    assert plan_ledger(workdir, key_c.peer_id) is None  # the next start: the ledger is C's own

    # a key with no rotation leading to it: refused, naming both keys and the fix
    stranger = generate_identity(home / "d.key")
    with pytest.raises(RotationError) as err:
        plan_ledger(workdir, stranger.peer_id, home / "d.key")
    text = str(err.value)
    assert key_c.peer_id in text and stranger.peer_id in text and "swarmtune keygen" in text and "--rotate" in text


def test_republisher_restores_everything_due_before_expiry(tmp_path):
    key = generate_identity(tmp_path / "k.key")
    with Ledger.open(tmp_path / "ledger.jsonl") as ledger:
        blobs = [ledger.append_new(key.private_key, round=r, **FIELDS) for r in range(4)]
        now = [0.0]
        batches: list[list] = []

        def store_many(entries):  # stands for Swarm.store_many: the DHT takes everything
            batches.append(entries)
            return [True] * len(entries)

        rep = Republisher(store_many, ttl_s=20, where={"record": record_entry}, batch=3, clock=lambda: now[0])
        rep.add([("record", b) for b in blobs[:4]])
        rep.add([("record", blobs[0])])  # the same DHT entry: not doubled
        rep.follow("record", ledger.blobs, start=4)
        assert len(rep) == 4
        assert rep.tick() == 4 and rep.tick() == 0  # all that is due, 3 per DHT call; the second call is too soon
        blobs.append(ledger.append_new(key.private_key, round=4, **FIELDS))  # a round's record (rounds.py stored it)
        now[0] = 2.5  # the next check (ttl/8): the followed ledger's 5th record counts as just stored
        assert rep.tick() == 0 and len(rep) == 5
        now[0] = 9.0
        assert rep.tick() == 0  # nothing is half-way to expiry yet
        now[0] = 11.5  # the first four are (due at 10 s, ttl/2); the 5th not before 12.5 s
        assert rep.tick() == 4
        now[0] = 14.0
        assert rep.tick() == 1
        assert [len(b) for b in batches] == [3, 1, 3, 1, 1]
        assert {e[2] for b in batches for e in b} == set(blobs)
        assert batches[0][0][:2] == record_entry(blobs[0])


def test_republisher_keeps_up_with_more_entries_than_one_batch_per_check(tmp_path):
    """A node of fast rounds tracks a record and receipts per round: more than one DHT batch can be due at a
    check (seen: 64 a check, 1.9 s apart, fell behind a 15 s TTL and a record expired). Every entry is stored
    again before its expiry, however many are due."""
    key = generate_identity(tmp_path / "k.key")
    with Ledger.open(tmp_path / "ledger.jsonl") as ledger:
        blobs = [ledger.append_new(key.private_key, round=r, **FIELDS) for r in range(300)]
    now = [0.0]
    last: dict[bytes, float] = {}
    worst = [0.0]

    def store_many(entries):
        for _, _, blob in entries:
            worst[0] = max(worst[0], now[0] - last.get(blob, 0.0))
            last[blob] = now[0]
        return [True] * len(entries)

    rep = Republisher(store_many, ttl_s=20, where={"record": record_entry}, batch=64, clock=lambda: now[0])
    rep.add([("record", b) for b in blobs], stored=True)  # all stored at 0 s: all expire at 20 s
    while now[0] < 60:
        now[0] += 0.5
        rep.tick()
    assert len(last) == 300 and worst[0] < 20, f"an entry waited {worst[0]:.1f} s for a TTL of 20 s"


def test_republisher_thread_stores_while_the_caller_is_busy(tmp_path):
    """A node's round can hold its loop longer than half a TTL: the republisher's own thread stores meanwhile,
    survives a store that raises, and stops when asked."""
    key = generate_identity(tmp_path / "k.key")
    with Ledger.open(tmp_path / "ledger.jsonl") as ledger:
        blob = ledger.append_new(key.private_key, round=0, **FIELDS)
        calls: list[float] = []

        def store_many(entries):
            calls.append(time.monotonic())
            if len(calls) == 1:
                raise ConnectionError("the DHT process is busy")  # logged; tried again at the next check
            return [True] * len(entries)

        rep = Republisher(store_many, ttl_s=0.4, where={"record": record_entry}, check_every=0.05)
        rep.add([("record", blob)])
        rep.start()
        time.sleep(1.0)  # the caller is busy (a long round): nobody calls tick()
        rep.stop()
        n = len(calls)
        assert n >= 4, f"the thread stored {n} times in 1 s (due every 0.2 s)"
        assert rep.stored == n - 1  # the first call raised and counted nothing
        assert max(b - a for a, b in zip(calls[1:], calls[2:])) < 0.4, "a stored entry waited past its expiry"
        time.sleep(0.3)
        assert len(calls) == n, "the thread stopped"


# ---------------------------------------------------------------- real nodes


@pytest.mark.swarm
@pytest.mark.timeout(240)
def test_rotated_node_continues_with_a_new_ledger(tmp_path, tiny_base, spawn_node):
    manifest = write_test_manifest(tmp_path / "swarm.toml", tiny_base, rounds={"max_rounds": 400})
    b = spawn_node(manifest, "b")  # stays up: the DHT the restarted node joins and the test reads
    peers = b.wait_info()["maddrs"]
    a = spawn_node(manifest, "a", "--initial-peers", *peers, "--max-rounds", "3")
    assert a.wait_exit(timeout=120) == 0, a.log.read_text()[-3000:]
    workdir, old_key, new_key = a.workdir, a.home / "identity.key", a.home / "new.key"
    old_peer = load_identity(old_key).peer_id
    old_blobs = read_log(workdir / "ledger.jsonl").blobs
    assert len(old_blobs) == 3

    t0 = time.time()
    out = _cli("keygen", "--key", str(old_key), "--rotate", str(new_key), env={"SWARMTUNE_HOME": str(a.home)})
    assert out.returncode == 0, out.stderr  # --ledger defaulted to the one swarm under the home
    new_peer = load_identity(new_key).peer_id
    a2 = spawn_node(manifest, "a2", "--key", str(new_key), "--initial-peers", *peers, "--max-rounds", "2", home=a.home)
    assert a2.wait_exit(timeout=150) == 0, a2.log.read_text()[-3000:]
    restart_s = time.time() - t0

    retired = workdir / f"ledger-{old_peer}.jsonl"
    assert read_log(retired).blobs == old_blobs, "the old key's ledger is kept as it was"
    new = [verify_signed(blob) for blob in read_log(workdir / "ledger.jsonl").blobs]
    assert [r.seq for r in new] == [0, 1] and {r.peer_id for r in new} == {new_peer}
    assert new[0].round > verify_signed(old_blobs[-1]).round, "training went on from the rounds before"
    rotations = workdir / "rotations.jsonl"
    verified = _verify(manifest, retired, workdir / "ledger.jsonl", rotations=rotations)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    records, statements = _read_dht(peers, verify_signed(old_blobs[0]).swarm_id)
    assert statements == rotations.read_bytes().splitlines(), "the rotation statement is in the DHT"
    dht_blobs = set(records)
    assert set(old_blobs) <= dht_blobs and set(read_log(workdir / "ledger.jsonl").blobs) <= dht_blobs
    print(f"rotation: restart with the new key and 2 rounds took {restart_s:.1f} s; "
          f"DHT holds {len(records)} records and {len(statements)} rotation statement(s)")
    b.signal(signal.SIGTERM)
    assert b.wait_exit(timeout=60) == 0


@pytest.mark.swarm
@pytest.mark.timeout(150)
def test_other_key_without_rotation_exits_2_and_writes_nothing(tmp_path, tiny_base, spawn_node):
    manifest = write_test_manifest(tmp_path / "swarm.toml", tiny_base, rounds={"max_rounds": 400})
    a = spawn_node(manifest, "a", "--max-rounds", "1")
    assert a.wait_exit(timeout=120) == 0, a.log.read_text()[-3000:]
    workdir = a.workdir
    before = {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()}
    old_peer = load_identity(a.home / "identity.key").peer_id
    other = a.home / "other.key"
    other_peer = generate_identity(other).peer_id
    a2 = spawn_node(manifest, "a2", "--key", str(other), home=a.home)
    assert a2.wait_exit(timeout=120) == 2, a2.log.read_text()[-3000:]
    log = a2.log.read_text()
    assert old_peer in log and other_peer in log and "swarmtune keygen" in log and "--rotate" in log, log[-2000:]
    after = {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()}
    assert after == before, "a refused start writes nothing"
    # a key the node would create (--create-key, the default in these tests) is not written either
    fresh = a.home / "fresh.key"
    a3 = spawn_node(manifest, "a3", "--key", str(fresh), home=a.home)
    assert a3.wait_exit(timeout=120) == 2 and not fresh.exists(), a3.log.read_text()[-2000:]


@pytest.mark.swarm
@pytest.mark.timeout(200)
def test_records_outlive_the_dht_expiry(tmp_path, tiny_base, spawn_node):
    ttl = 15
    env = {"SWARMTUNE_RECORD_TTL_S": str(ttl)}
    manifest = write_test_manifest(tmp_path / "swarm.toml", tiny_base, rounds={"max_rounds": 400})
    b = spawn_node(manifest, "b", env=env)
    peers = b.wait_info()["maddrs"]
    a = spawn_node(manifest, "a", "--initial-peers", *peers, env=env)
    a.wait_round(1, timeout=120)
    first = time.time()
    deadline = first + 2.5 * ttl
    while time.time() < deadline:  # well past the expiry of the first records
        assert a.popen.poll() is None and b.popen.poll() is None
        time.sleep(1)
    a_blobs = read_log(a.workdir / "ledger.jsonl").blobs
    records, _ = _read_dht(peers, verify_signed(a_blobs[0]).swarm_id)
    missing = [verify_signed(blob).seq for blob in a_blobs if blob not in set(records)]
    # the newest record may be appended after the read: only it may be missing
    assert missing in ([], [len(a_blobs) - 1]), f"records missing from the DHT after {2.5 * ttl:.0f} s: seqs {missing}"
    log = a.log.read_text()
    print(f"ttl {ttl} s: after {time.time() - first:.0f} s the DHT holds {len(a_blobs) - len(missing)} of a's "
          f"{len(a_blobs)} records ({len(records)} records of both nodes)")
    for node in (a, b):
        node.signal(signal.SIGTERM)
    for node in (a, b):
        assert node.wait_exit(timeout=60) == 0, node.log.read_text()[-3000:]
    # no store failed outright (a timeout or a DHT error). A store the DHT "did not take" is not one: both nodes
    # store the receipts of their rounds (each its own, and the groupmate's as its evidence), so the copy with
    # the earlier expiry is refused; the records' presence past the expiry, above, is what the republisher owes
    assert "DHT entries failed" not in log and "could not publish" not in log, log[-3000:]
