"""The DHT record validator: malformed values refused with reasons, and real DHTs on 127.0.0.1.

Run: python -m pytest tests/test_validator.py -q
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import socket

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer, get_dht_time

from node.swarm.statements import (
    check_subkey,
    checks_key,
    collect_checks,
    collect_receipts,
    publish_check,
    publish_receipt,
    receipt_subkey,
    receipts_key,
)
from node.swarm.validator import (
    RecordsValidator,
    check_owned_value,
    check_rotation_value,
    check_value,
    collect_all,
    collect_records,
    collect_rotations,
    owner_subkey,
    publish_record,
    publish_rotation,
    records_key,
    rotation_subkey,
    rotations_key,
)
from protocol.receipt import RoundReceipt, SpotCheck, sign_check, sign_receipt
from protocol.peerid import peer_id_from_public_key
from protocol.record import (
    DOMAIN_TAG,
    ZERO_HASH,
    ContributionRecord,
    KeyRotation,
    body_of,
    public_bytes,
    record_hash,
    sign_record,
    sign_rotation,
)

SWARM = "ab" * 32
A = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
B = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


def pid(key) -> str:
    return peer_id_from_public_key(public_bytes(key))


def record(key, seq, prev=ZERO_HASH, swarm=SWARM, round_=None) -> bytes:
    return sign_record(
        ContributionRecord(
            version=1, swarm_id=swarm, peer_id=pid(key), seq=seq, prev_hash=prev, round=seq if round_ is None else round_,
            shards=(0,), samples=8,
            tokens=800, loss_before=1_000_000, loss_after=900_000, adapter_hash="11" * 32, data_commitment="22" * 32,
            grad_commitment="33" * 32, start_ms=0, end_ms=1,
        ),
        key,
    )


def chain(key, n, rounds=None) -> list[bytes]:
    blobs, prev = [], ZERO_HASH
    for seq in range(n):
        blobs.append(record(key, seq, prev, round_=rounds[seq] if rounds else None))
        prev = record_hash(blobs[-1])
    return blobs


def signed_body(body: bytes, key=A) -> bytes:
    return b'{"signer":"%s","sig":"%s","body":%s}' % (pid(key).encode(), key.sign(DOMAIN_TAG + body).hex().encode(), body)


VALIDATOR = RecordsValidator(SWARM)
KEY_ID = DHTID.generate(source=records_key(SWARM, 0)).to_bytes()  # rounds 0..15


def explain(value, subkey=None, key_id=KEY_ID, raw_value=False) -> str:
    subkey = owner_subkey(pid(A), 0) if subkey is None else subkey
    value_bytes = value if raw_value else MSGPackSerializer.dumps(value)
    return VALIDATOR.explain(DHTRecord(key_id, MSGPackSerializer.dumps(subkey), value_bytes, get_dht_time() + 60))


A0 = record(A, 0)
BODY = body_of(A0)


def test_valid_record_is_accepted():
    assert explain(A0) == ""
    assert VALIDATOR.validate(
        DHTRecord(KEY_ID, MSGPackSerializer.dumps(owner_subkey(pid(A), 0)), MSGPackSerializer.dumps(A0), 0.0)
    )


def test_other_keys_are_not_our_business():
    other_key = DHTID.generate(source="some/other/key").to_bytes()
    assert explain(b"anything", subkey="peer-7", key_id=other_key) == ""
    assert explain(b"anything", subkey=b"\x01", key_id=other_key) == ""
    # ... unless it uses our marker: under `[ed25519-owner:` only a statement that belongs there is stored
    assert "ed25519-owner subkey rejected" in explain(b"anything", key_id=other_key)


def _mutated(old: bytes, new: bytes) -> bytes:
    assert old in BODY
    return signed_body(BODY.replace(old, new, 1))


MALFORMED = [
        (b"x" * 5000, None, "over the 4096-byte bound"),
        (record(B, 0), None, f"record signed by {pid(B)} written to the subkey of {pid(A)}"),
        (record(A, 0), owner_subkey(pid(A), 1), "record seq 0 written to the subkey for seq 1"),
        (record(A, 0, swarm="cd" * 32), None, f"record is for swarm {'cd' * 32}"),
        (A0, "[owner:" + pid(A) + "]:0", "is not of the form"),
        (A0, owner_subkey(pid(A), 0) + "x", "is not of the form"),
        (A0, 7, "subkey must be a string"),
        ("a string", None, "value must be bytes, got str"),
        ({"a": 1}, None, "value must be bytes, got dict"),
        (b"junk", None, "envelope: expected '{\"signer\":\"' at byte 0"),
        (A0[:-1], None, "signature: signature does not verify"),
        (_mutated(b'"samples":8', b'"samples":8,"samples":8'), None, "duplicate key 'samples'"),
        (_mutated(b'"samples":8', b'"samples":8,"bonus":1'), None, "unknown field(s) bonus"),
        (_mutated(b'"samples":8', b'"samples":NaN'), None, "NaN is not allowed"),
        (_mutated(b'"samples":8', b'"samples":[[[8]]]'), None, "nesting deeper than 2"),
        (_mutated(b'"samples":8', b'"samples":8.0'), None, "non-integer number"),
        (_mutated(b'"samples":8', b'"samples":true'), None, "got bool"),
        (_mutated(b'"samples":8', b'"samples":-8'), None, "'samples' = -8"),
        (_mutated(b'"samples":8', b'"samples":9007199254740992'), None, "outside [0, 2^53)"),
        (_mutated(b'"adapter_hash":"1', b'"adapter_hash":"\xff'), None, "not ASCII"),
]


@pytest.mark.parametrize("value, subkey, fragment", MALFORMED, ids=[f[:40] for _, _, f in MALFORMED])
def test_malformed_values_are_refused_with_reasons(value, subkey, fragment):
    reason = explain(value, subkey=subkey)
    assert fragment in reason, reason
    assert not VALIDATOR.validate(
        DHTRecord(
            KEY_ID,
            MSGPackSerializer.dumps(owner_subkey(pid(A), 0) if subkey is None else subkey),
            MSGPackSerializer.dumps(value),
            0.0,
        )
    )


def test_badly_encoded_dht_values():
    assert "badly encoded DHT value" in explain(b"\xc1\xc1", raw_value=True)  # 0xc1 is never valid msgpack
    assert "badly encoded DHT value" in explain(b"\xda\xff", raw_value=True)  # truncated str header


def test_older_record_restored_under_a_newer_seq_is_refused():
    a = chain(A, 3)
    assert check_value(SWARM, owner_subkey(pid(A), 2), a[2]) == ""
    assert check_value(SWARM, owner_subkey(pid(A), 2), a[0]) == "record seq 0 written to the subkey for seq 2"


def test_publish_refuses_invalid_input():
    with pytest.raises(ValueError, match="invalid record"):
        publish_record(None, SWARM, b"junk", get_dht_time() + 60)
    with pytest.raises(ValueError, match="another swarm"):
        publish_record(None, "cd" * 32, A0, get_dht_time() + 60)
    with pytest.raises(ValueError, match="absolute DHT time"):
        publish_record(None, SWARM, A0, 3600)


# ---------------------------------------------------------------- receipts, checks, rotations


def receipt(key, round_=3, shard=1, swarm=SWARM) -> bytes:
    members = tuple(sorted((pid(A), pid(B))))
    return sign_receipt(RoundReceipt(1, swarm, round_, shard, pid(key), members, ("aa" * 32, "bb" * 32), "ee" * 32,
                                     members), key)


def spot_check(key, target, round_=3, shard=1, swarm=SWARM) -> bytes:
    return sign_check(SpotCheck(1, swarm, round_, shard, pid(key), pid(target), "ee" * 32, "aa" * 32, "cc" * 32,
                                2_000_000, 500_000, 1, 5), key)


def rotation(old, new, swarm=SWARM) -> bytes:
    return sign_rotation(KeyRotation(1, swarm, pid(old), pid(new), 0, ZERO_HASH, 5), old, new)


def explain_under(key_name: str, subkey, value) -> str:
    key_id = DHTID.generate(source=key_name).to_bytes()
    return VALIDATOR.explain(
        DHTRecord(key_id, MSGPackSerializer.dumps(subkey), MSGPackSerializer.dumps(value), get_dht_time() + 60))


STATEMENTS = [
    (receipts_key(SWARM, 3), receipt_subkey(pid(A), 1), receipt(A), ""),
    (receipts_key(SWARM, 3), receipt_subkey(pid(B), 1), receipt(A), "receipt belongs under subkey"),
    (receipts_key(SWARM, 4), receipt_subkey(pid(A), 1), receipt(A), f"receipt belongs under key '{SWARM}/receipts/3'"),
    (receipts_key(SWARM, 3), receipt_subkey(pid(A), 2), receipt(A), "belongs under subkey"),
    (receipts_key("cd" * 32, 3), receipt_subkey(pid(A), 1), receipt(A), "belongs under key"),
    (receipts_key(SWARM, 3), receipt_subkey(pid(A), 1), A0, "record belongs under subkey"),  # a record is not a receipt
    (receipts_key(SWARM, 3), receipt_subkey(pid(A), 1), receipt(A)[:-2] + b"}", "ed25519-owner subkey rejected"),
    (receipts_key(SWARM, 3), receipt_subkey(pid(A), 1), b"junk", "ed25519-owner subkey rejected: envelope"),
    (receipts_key(SWARM, 3), receipt_subkey(pid(A), 1), b"x" * 60_000, "over the 49152-byte bound"),
    (receipts_key(SWARM, 3), receipt_subkey(pid(A), 1), "text", "value must be bytes"),
    (checks_key(SWARM, 3), check_subkey(pid(A), 1, pid(B)), spot_check(A, B), ""),
    (checks_key(SWARM, 3), check_subkey(pid(B), 1, pid(B)), spot_check(A, B), "check belongs under subkey"),
    (checks_key(SWARM, 3), check_subkey(pid(A), 1, pid(A)), spot_check(A, B), "check belongs under subkey"),
    (checks_key(SWARM, 3), check_subkey(pid(A), 1, pid(B)), receipt(A), "receipt belongs under subkey"),
    (checks_key(SWARM, 2), check_subkey(pid(A), 1, pid(B)), spot_check(A, B), "check belongs under key"),
    # another swarm's statement in its own place passes (a DHT may carry several swarms); misplaced it does not
    (checks_key("cd" * 32, 3), check_subkey(pid(A), 1, pid(B)), spot_check(A, B, swarm="cd" * 32), ""),
    (rotations_key(SWARM), rotation_subkey(pid(A)), rotation(A, B), ""),
    (rotations_key(SWARM), rotation_subkey(pid(B)), rotation(A, B), f"rotation of {pid(A)} written to the subkey of {pid(B)}"),
    (rotations_key(SWARM), rotation_subkey(pid(A)), rotation(A, B, swarm="cd" * 32), "rotation is for swarm"),
    (rotations_key(SWARM), rotation_subkey(pid(A)), A0, "value rejected"),
    (rotations_key(SWARM), rotation_subkey(pid(A)) + ":0", rotation(A, B), "is not of the form"),
    (records_key(SWARM, 0), owner_subkey(pid(A), 0), receipt(A), "value rejected"),  # a receipt is not a record
    (records_key(SWARM, 0), owner_subkey(pid(A), 0), A0, ""),  # round 0: bucket 0
    (records_key(SWARM, 16), owner_subkey(pid(A), 0), A0, "record of round 0 written to records bucket 1 (rounds 16..31)"),
    (records_key(SWARM, 16), "plain subkey", b"anything", "is not of the form"),  # a bucket is ours, any subkey
    (records_key(SWARM, 16 * 5000), "plain subkey", b"anything", ""),  # far past any record seen: not known yet
    (records_key(SWARM, 16), owner_subkey(pid(A), 20), record(A, 20, "44" * 32), ""),  # round 20: bucket 1
    ("some/other/key", "plain subkey", b"anything", ""),  # not ours
]


@pytest.mark.parametrize("key_name, subkey, value, fragment", STATEMENTS, ids=range(len(STATEMENTS)))
def test_receipts_checks_and_rotations_are_validated(key_name, subkey, value, fragment):
    reason = explain_under(key_name, subkey, value)
    assert (fragment in reason) if fragment else reason == "", reason


def test_statement_checks_and_publish_refusals():
    assert check_owned_value(receipts_key(SWARM, 3), receipt_subkey(pid(A), 1), receipt(A)) == ""
    assert "not '" in check_owned_value(receipts_key(SWARM, 9), receipt_subkey(pid(A), 1), receipt(A))
    assert check_rotation_value(SWARM, 5, rotation(A, B)).startswith("subkey must be a string")
    assert check_rotation_value(SWARM, rotation_subkey(pid(A)), "s").startswith("value must be bytes")
    with pytest.raises(ValueError, match="invalid rotation"):
        publish_rotation(None, SWARM, b"junk", get_dht_time() + 60)
    with pytest.raises(ValueError, match="another swarm"):
        publish_rotation(None, "cd" * 32, rotation(A, B), get_dht_time() + 60)
    with pytest.raises(ValueError, match="absolute DHT time"):
        publish_rotation(None, SWARM, rotation(A, B), 3600)


# ---------------------------------------------------------------- real DHTs on loopback


@pytest.fixture
def no_leaked_sockets():
    """Remove the hivemind unix sockets our DHTs leave behind (only new ones nobody listens on)."""
    before = set(glob.glob("/tmp/hivemind-*.sock"))
    yield
    for path in set(glob.glob("/tmp/hivemind-*.sock")) - before:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(path)
            except ConnectionRefusedError:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            except OSError:
                pass


@pytest.mark.timeout(90)
def test_publish_collect_and_forgery_across_real_dhts(no_leaked_sockets):
    import hivemind

    dhts = []
    try:
        storer = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=[RecordsValidator(SWARM)])
        dhts.append(storer)
        peers = [str(m) for m in storer.get_visible_maddrs()]
        reader = hivemind.DHT(
            initial_peers=peers, start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=[RecordsValidator(SWARM)]
        )
        dhts.append(reader)
        # an attacker that does not run our validator, so its own storage takes anything
        attacker = hivemind.DHT(initial_peers=peers, start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        dhts.append(attacker)

        a, b = chain(A, 3, rounds=[0, 2, 40]), chain(B, 2)  # A: buckets 0 and 2 (1 empty, the scan goes on)
        expiration = get_dht_time() + 120
        assert all(publish_record(storer, SWARM, blob, expiration) for blob in a)
        assert all(publish_record(reader, SWARM, blob, expiration) for blob in b)
        assert collect_records(reader, SWARM) == sorted(a + b, key=lambda x: (json.loads(x)["signer"], json.loads(x)["body"]["seq"]))
        assert collect_records(storer, SWARM) == collect_records(reader, SWARM)

        key = records_key(SWARM, 0)
        # B's validly signed record written into A's subkey: refused by the validating peers
        assert not reader.store(key, b[0], expiration, subkey=owner_subkey(pid(A), 0))
        attacker.store(key, b[1], expiration, subkey=owner_subkey(pid(A), 1))
        attacker.store(key, b"x" * 10, expiration, subkey=owner_subkey(pid(A), 5))
        # the attacker holds the forgeries in its own storage (it validates nothing) ...
        own = attacker.get(key, latest=True).value
        assert {owner_subkey(pid(A), 1), owner_subkey(pid(A), 5)} <= set(own)
        assert collect_records(attacker, SWARM).count(b[1]) == 1  # and collect drops what does not check out
        got = collect_records(reader, SWARM)  # ... the validating peers store and return none of it
        assert got == collect_records(storer, SWARM) and len(got) == 5
        assert b[1] in got and got.count(b[1]) == 1

        # `swarmtune ledger verify` straight from the DHT, with no local files
        from node.cli import main

        assert main(["ledger", "verify", "--dht-peer", *peers, "--swarm-id", SWARM, "--max-samples", "8", "--json"]) == 0
        assert main(["ledger", "verify", "--dht-peer", *peers, "--swarm-id", SWARM, "--max-samples", "7", "--json"]) == 1

        # receipts, checks and rotations: published, collected, forgeries refused
        ra, rb, ca, rot = receipt(A), receipt(B, round_=2), spot_check(A, B), rotation(A, B)
        assert publish_receipt(storer, SWARM, ra, expiration) and publish_receipt(reader, SWARM, rb, expiration)
        assert publish_check(storer, SWARM, ca, expiration) and publish_rotation(reader, SWARM, rot, expiration)
        # B's receipt for round 2 written into A's subkey, or into round 3: refused by the validating peers
        # (whether store() says so depends on whether the non-validating attacker is among the key's nearest
        # nodes; what every validating reader returns below does not)
        reader.store(receipts_key(SWARM, 2), rb, expiration, subkey=receipt_subkey(pid(A), 1))
        attacker.store(receipts_key(SWARM, 3), rb, expiration, subkey=receipt_subkey(pid(B), 1))
        # junk with a later expiration under honest subkeys, from the attacker: validating readers drop it on reading
        attacker.store(checks_key(SWARM, 3), b"junk", expiration + 5, subkey=check_subkey(pid(A), 1, pid(B)))
        attacker.store(receipts_key(SWARM, 2), b"junk", expiration + 5, subkey=receipt_subkey(pid(B), 1))
        for dht in (reader, storer):
            assert collect_receipts(dht, SWARM, 3) == [ra] and collect_receipts(dht, SWARM, 2) == [rb]
        assert collect_checks(reader, SWARM, 3) == [ca] and collect_rotations(storer, SWARM) == [rot]
        everything = collect_all(reader, SWARM)  # records name rounds 0, 1, 2, 40: receipts and checks of those
        assert {k: len(v) for k, v in everything.items()} == {"records": 5, "rotations": 1, "receipts": 1, "checks": 0}
        assert everything["receipts"] == [rb]
        more = collect_all(reader, SWARM, rounds=[2, 3])
        assert (more["receipts"], more["checks"]) == ([rb, ra], [ca])
        from node.swarm.statements import READS_IN_FLIGHT, collect_rounds

        many = range(0, READS_IN_FLIGHT + 9)  # reads in several batches: the same statements, in round order
        by_round = collect_rounds(reader, SWARM, many)
        assert list(by_round) == list(many) and by_round[2] == ([rb], []) and by_round[3] == ([ra], [ca])
        assert not any(by_round[r] != ([], []) for r in many if r not in (2, 3))

        from node.swarm.dht import read_swarm_records, read_swarm_statements

        assert read_swarm_statements(peers, SWARM) == everything
        assert read_swarm_records(peers, SWARM) == everything["records"]
    finally:
        for dht in dhts:
            dht.shutdown()


@pytest.mark.timeout(90)
def test_the_credit_view_rereads_only_the_open_records_buckets(tmp_path, no_leaked_sockets):
    """A node's credit view reads the whole history once; after that each refresh reads the oldest bucket not
    yet complete and the empty ones above the newest, so what it moves no longer grows with the history."""
    import hivemind

    from node.ledger import Ledger
    from node.status import CreditCache
    from node.swarm.validator import collect_record_bucket

    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=[RecordsValidator(SWARM)])
    reads: list[int] = []

    def read(bucket):
        reads.append(bucket)
        return collect_record_bucket(dht, SWARM, bucket)

    cache = CreditCache(ledger=Ledger.open(tmp_path / "ledger.jsonl"), read_dht_bucket=read, swarm_id=SWARM,
                        max_samples_per_round=8)
    try:
        cache.stop()
        cache._thread.join(timeout=30)
        a = chain(A, 46)  # rounds 0..45: buckets 0, 1, 2
        expiration = get_dht_time() + 120
        assert all(publish_record(dht, SWARM, blob, expiration) for blob in a[:40])
        cache._buckets, cache._first_open = {}, 0
        reads.clear()
        cache.refresh()
        assert reads == [0, 1, 2, 3, 4]  # everything once, up to two empty buckets
        assert [r["claimed_rounds"] for r in cache.rows()] == [40]
        assert all(publish_record(dht, SWARM, blob, expiration) for blob in a[40:])
        reads.clear()
        cache.refresh()
        assert reads == [2, 3, 4]  # round 39 was seen: buckets 0 and 1 (rounds to 31) are complete
        assert [r["claimed_rounds"] for r in cache.rows()] == [46]

        # the receipts and checks of the records' rounds: MAX_ROUNDS_PER_REFRESH rounds a refresh, newest first,
        # read in one go (node.swarm.statements.collect_rounds); a round read once is read again only while new
        from node.swarm.statements import collect_rounds, publish_receipt

        late, early = receipt(A, round_=44), receipt(A, round_=3)
        assert publish_receipt(dht, SWARM, late, expiration) and publish_receipt(dht, SWARM, early, expiration)
        asked: list[list[int]] = []

        def read_rounds(rounds):
            asked.append(sorted(rounds))
            return {r: rc + ck for r, (rc, ck) in collect_rounds(dht, SWARM, rounds).items()}

        cache.read_dht_rounds = read_rounds
        assert cache._dht_rounds(set(range(46))) == [late]
        assert cache._dht_rounds(set(range(46))) == [early, late]
        assert asked == [list(range(14, 46)), list(range(0, 14)) + [44, 45]]
    finally:
        cache.stop()
        dht.shutdown()


@pytest.mark.timeout(90)
def test_requests_from_many_threads_do_not_kill_the_dht_process(no_leaked_sockets):
    """hivemind sends every DHT request over one pipe from whatever thread calls, unlocked; a node calls from
    several at once (round loop, heartbeats, background stores, credit view). Requests over PIPE_BUF bytes from
    two threads interleaved once the pipe was full, or its reader took half of one, and the DHT process died on
    a broken pickle (unguarded, this test killed it 2 times in 2: "invalid load key"); start_dht guards the pipe."""
    import threading

    from node.swarm.dht import start_dht

    dht = start_dht(host_maddrs=["/ip4/127.0.0.1/tcp/0"], retries=0)
    try:
        def hammer(i):
            for j in range(300):  # 8 KB: over PIPE_BUF, under the 16 KiB of one write (store_many's batches)
                dht.store(f"k{i}", b"x" * 8_000, get_dht_time() + 60, subkey=str(j), return_future=True)

        threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert dht.is_alive()
        found = dht.get("k3", latest=True, return_future=True).result(timeout=30)  # a dead DHT process never answers
        assert found is not None and len(found.value) == 300
    finally:
        dht.shutdown()
