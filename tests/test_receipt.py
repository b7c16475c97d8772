"""Round receipts and spot checks (protocol/receipt.py): encoding, signing, verification, the draw.

Run: python -m pytest tests/test_receipt.py -q
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.peerid import peer_id_from_public_key
from protocol.receipt import (
    DEFAULT_SPOT_CHECK_RATE,
    MAX_CHECK_BYTES,
    MAX_RECEIPT_BYTES,
    RoundReceipt,
    SpotCheck,
    catch_rounds,
    classify,
    error_ppm,
    sign_check,
    sign_receipt,
    spot_checks,
    statement_hash,
    verify_check,
    verify_receipt,
)
from protocol.record import (
    KeyRotation,
    RecordError,
    ContributionRecord,
    public_bytes,
    sign_record,
    sign_rotation,
    verify_signed,
)

SWARM = "ab" * 32
KEYS = [Ed25519PrivateKey.from_private_bytes(bytes([i]) * 32) for i in range(1, 6)]


def pid(key) -> str:
    return peer_id_from_public_key(public_bytes(key))


def receipt(key=KEYS[0], keys=KEYS[:3], **over) -> RoundReceipt:
    members = tuple(sorted(pid(k) for k in keys))
    fields = dict(version=1, swarm_id=SWARM, round=7, shard=3, peer_id=pid(key), members=members,
                  commitments=tuple(hashlib.sha256(m.encode()).hexdigest() for m in members), result_hash="ee" * 32,
                  reducers=members, check_rate_ppm=210_000)
    fields.update(over)
    return RoundReceipt(**fields)


def check(key=KEYS[0], target=KEYS[1], **over) -> SpotCheck:
    fields = dict(version=1, swarm_id=SWARM, round=7, shard=3, peer_id=pid(key), target=pid(target),
                  result_hash="ee" * 32, commitment="cc" * 32, evidence_hash="dd" * 32, error_ppm=12,
                  tolerance_ppm=500, failed=0, time_ms=1_700_000_000_000)
    fields.update(over)
    return SpotCheck(**fields)


def test_receipt_round_trip_and_hash():
    r = receipt()
    blob = sign_receipt(r, KEYS[0])
    assert verify_receipt(blob) == r
    assert classify(blob) == "receipt"
    assert len(statement_hash(blob)) == 64
    outbound = receipt(commitments=(), reducers=())  # a node that reduced no part signs with no commitments
    assert verify_receipt(sign_receipt(outbound, KEYS[0])) == outbound
    assert json.loads(blob)["body"]["members"] == list(r.members)  # plain JSON lines: jq works


def test_check_round_trip_and_classify_every_kind():
    c = check()
    blob = sign_check(c, KEYS[0])
    assert verify_check(blob) == c
    assert classify(blob) == "check"
    record = ContributionRecord(
        version=1, swarm_id=SWARM, peer_id=pid(KEYS[0]), seq=0, prev_hash="0" * 64, round=1, shards=(0,), samples=1,
        tokens=1, loss_before=0, loss_after=0, adapter_hash="11" * 32, data_commitment="22" * 32,
        grad_commitment="33" * 32, start_ms=1, end_ms=2)
    assert classify(sign_record(record, KEYS[0])) == "record"
    rotation = KeyRotation(1, SWARM, pid(KEYS[0]), pid(KEYS[1]), 0, "0" * 64, 5)
    assert classify(sign_rotation(rotation, KEYS[0], KEYS[1])) == "rotation"
    for junk in (b"", b"[]", b'{"signer":"x","sig":"y","kind":"other","body":{}}', b'{"foo":1}'):
        with pytest.raises(RecordError):
            classify(junk)


def test_statements_do_not_cross_verify():
    """A receipt is not a check or a record, even with the envelope relabelled."""
    blob = sign_receipt(receipt(), KEYS[0])
    with pytest.raises(RecordError, match="envelope"):
        verify_check(blob)
    with pytest.raises(RecordError):
        verify_signed(blob)
    relabelled = blob.replace(b'"kind":"receipt"', b'"kind":"check"')
    with pytest.raises(RecordError, match="signature"):
        verify_check(relabelled)


def test_forged_signature():
    blob = sign_receipt(receipt(), KEYS[0])
    tampered = blob.replace(b'"round":7', b'"round":8')
    with pytest.raises(RecordError, match="signature"):
        verify_receipt(tampered)
    other = sign_receipt(receipt(key=KEYS[1]), KEYS[1])  # signer swapped in the envelope
    forged = other.replace(pid(KEYS[1]).encode(), pid(KEYS[0]).encode(), 1)
    with pytest.raises(RecordError, match="signature"):
        verify_receipt(forged)
    with pytest.raises(ValueError, match="key belongs to"):
        sign_receipt(receipt(key=KEYS[1]), KEYS[0])
    cblob = sign_check(check(), KEYS[0])
    with pytest.raises(RecordError, match="signature"):
        verify_check(cblob.replace(b'"failed":0', b'"failed":1').replace(b'"error_ppm":12', b'"error_ppm":999'))


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(peer_id=pid(KEYS[4])), "not one of the members"),
        (dict(members=tuple(sorted((pid(k) for k in KEYS[:3]), reverse=True))), "sorted"),
        (dict(members=(pid(KEYS[0]), pid(KEYS[0]))), "sorted"),
        (dict(members=()), "1..256"),
        (dict(commitments=("aa" * 32,)), "one per member"),
        (dict(commitments=("aa" * 32, "bb" * 32, "XX" * 32)), "64 lowercase hex"),
        (dict(shard=256), "outside"),
        (dict(result_hash="ee" * 31), "64 lowercase hex"),
        (dict(version=2), "version"),
    ],
)
def test_receipt_schema_rules(over, match):
    key = KEYS[4] if over.get("peer_id") == pid(KEYS[4]) else KEYS[0]
    with pytest.raises(RecordError, match=match):
        sign_receipt(receipt(key=key, **over), key)


def _resign(blob: bytes, key, new_body: bytes) -> bytes:
    """An envelope around `new_body` with a valid signature over it (what a hostile signer can make)."""
    from protocol.record import RECEIPT_DOMAIN_TAG, _sign_statement

    sig = _sign_statement(key, RECEIPT_DOMAIN_TAG, new_body)
    head = blob[: blob.index(b'"sig":"')]
    return head + b'"sig":"' + sig.encode() + b'","kind":"receipt","body":' + new_body + b"}"


def test_malformed_and_non_canonical_bodies_are_refused_even_when_signed():
    blob = sign_receipt(receipt(), KEYS[0])
    body = json.loads(blob)["body"]
    spaced = json.dumps(body, sort_keys=True).encode()  # spaces: not canonical
    with pytest.raises(RecordError, match="canonical"):
        verify_receipt(_resign(blob, KEYS[0], spaced))
    unsorted = json.dumps(dict(reversed(list(body.items()))), separators=(",", ":")).encode()
    with pytest.raises(RecordError, match="canonical"):
        verify_receipt(_resign(blob, KEYS[0], unsorted))
    with pytest.raises(RecordError, match="not valid JSON"):
        verify_receipt(_resign(blob, KEYS[0], b'{"round":'))
    for bad, match in [({**body, "round": 7.0}, "non-integer"), ({**body, "extra": 1}, "unknown field"),
                       ({**body, "members": body["members"][0]}, "list")]:
        text = json.dumps(bad, sort_keys=True, separators=(",", ":")).encode()
        with pytest.raises(RecordError, match=match):
            verify_receipt(_resign(blob, KEYS[0], text))
    nested = json.dumps({**body, "members": [[m] for m in body["members"]]}, sort_keys=True,
                        separators=(",", ":")).encode()
    with pytest.raises(RecordError, match="nesting"):
        verify_receipt(_resign(blob, KEYS[0], nested))
    for junk in (b"", b"not json", blob[:-1], "text"):
        with pytest.raises(RecordError):
            verify_receipt(junk)


def test_size_bounds():
    keys = [Ed25519PrivateKey.from_private_bytes(i.to_bytes(32, "big")) for i in range(1, 257)]
    big = receipt(key=keys[0], keys=keys)
    blob = sign_receipt(big, keys[0])
    assert len(blob) <= MAX_RECEIPT_BYTES  # 256 members fit
    assert 170 * 256 < len(blob) < 185 * 256 + 1024  # ~180 bytes per member (as member, reducer, commitment)
    assert verify_receipt(blob) == big
    with pytest.raises(RecordError, match="size"):
        verify_receipt(blob[:-1] + b" " * (MAX_RECEIPT_BYTES - len(blob) + 1) + b"}")
    with pytest.raises(RecordError, match="257|1..256"):
        sign_receipt(receipt(key=keys[0], keys=keys + [KEYS[0]]), keys[0])
    cblob = sign_check(check(), KEYS[0])
    assert len(cblob) < MAX_CHECK_BYTES
    with pytest.raises(RecordError, match="size"):
        verify_check(cblob[:-1] + b" " * MAX_CHECK_BYTES + b"}")


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(failed=1), "contradicts"),  # error 12 <= 500: cannot be a failure
        (dict(error_ppm=501), "contradicts"),  # error > tolerance but failed = 0
        (dict(failed=2, error_ppm=501), "0 or 1"),
        (dict(target=KEYS[0]), "itself"),
        (dict(error_ppm=-1), "outside"),
    ],
)
def test_check_schema_rules(over, match):
    with pytest.raises(RecordError, match=match):
        sign_check(check(**over), KEYS[0])
    failed = check(error_ppm=1_000_000, tolerance_ppm=500_000, failed=1)
    assert verify_check(sign_check(failed, KEYS[0])) == failed


def test_error_ppm():
    assert error_ppm(0.0) == 0
    assert error_ppm(1.5) == 1_500_000
    assert error_ppm(float("inf")) == error_ppm(float("nan")) == error_ppm(1e300) == 2**53 - 1


def test_draw_is_deterministic_and_never_self():
    members = sorted(pid(k) for k in KEYS)
    h = "12" * 32
    assert spot_checks(h, members, 0.5) == spot_checks(h, list(reversed(members)), 0.5)
    assert spot_checks(h, members, 0.0) == []
    everyone = spot_checks(h, members, 1.0)
    assert [t for _, t in everyone] == members
    assert all(c != t and c in members for c, t in everyone)
    assert spot_checks(h, members[:1], 1.0) == []  # a group of one has nobody to check it


def test_draw_frequency_matches_the_rate():
    members = sorted(pid(k) for k in KEYS[:3])
    checked = 0
    checkers: dict[str, int] = {}
    for i in range(10_000):
        h = hashlib.sha256(i.to_bytes(4, "big")).hexdigest()
        for checker, target in spot_checks(h, members, DEFAULT_SPOT_CHECK_RATE):
            assert checker != target
            if target == members[0]:
                checked += 1
                checkers[checker] = checkers.get(checker, 0) + 1
    assert abs(checked / 10_000 - DEFAULT_SPOT_CHECK_RATE) < 0.01
    assert set(checkers) == set(members[1:])  # both others get drawn as checker, about evenly
    assert abs(checkers[members[1]] - checkers[members[2]]) < 0.15 * checked


def test_catch_rounds():
    assert catch_rounds(DEFAULT_SPOT_CHECK_RATE) == 20
    assert 1 - (1 - DEFAULT_SPOT_CHECK_RATE) ** 20 >= 0.99
    assert catch_rounds(0.206) == 20 and catch_rounds(0.2) == 21
    assert catch_rounds(1.0) == 1 and catch_rounds(0.5, 0.75) == 2
    with pytest.raises(ValueError):
        catch_rounds(0.0)


def test_dataclass_fields_documented():
    """Receipt field order is the spec's; a changed field is a protocol version bump."""
    assert [f.name for f in dataclasses.fields(RoundReceipt)] == [
        "version", "swarm_id", "round", "shard", "peer_id", "members", "commitments", "result_hash", "reducers",
        "check_rate_ppm"]
