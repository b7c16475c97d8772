"""Contribution record encoding, signing and verification, attacked field by field.

Run: python -m pytest tests/test_record.py -q
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.peerid import peer_id_from_public_key, public_key_from_peer_id
from protocol.record import (
    DOMAIN_TAG,
    MAX_BLOB_BYTES,
    ZERO_HASH,
    ContributionRecord,
    KeyRotation,
    RecordError,
    body_of,
    decode_record,
    encode_record,
    public_bytes,
    record_hash,
    sign_record,
    sign_rotation,
    to_fixed,
    verify_rotation,
    verify_signed,
)

SWARM = "ab" * 32
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


def peer(key: Ed25519PrivateKey) -> str:
    return peer_id_from_public_key(public_bytes(key))


def make(key=KEY, **over) -> ContributionRecord:
    fields = dict(
        version=1, swarm_id=SWARM, peer_id=peer(key), seq=1, prev_hash="cd" * 32, round=7, shards=(0, 2, 5),
        samples=64, tokens=8192, loss_before=to_fixed(2.5), loss_after=to_fixed(2.25), adapter_hash="11" * 32,
        data_commitment="22" * 32, grad_commitment="33" * 32, start_ms=1_700_000_000_000, end_ms=1_700_000_001_500,
    )
    fields.update(over)
    return ContributionRecord(**fields)


def join(signer: bytes, sig: bytes, body: bytes) -> bytes:
    return b'{"signer":"' + signer + b'","sig":"' + sig + b'","body":' + body + b"}"


def parts(blob: bytes) -> tuple[bytes, bytes, bytes]:
    head, body = blob.split(b',"body":', 1)
    fields = json.loads(head + b"}")
    return fields["signer"].encode(), fields["sig"].encode(), body[:-1]


def envelope(body: bytes, key=KEY, signer=None, tag=DOMAIN_TAG) -> bytes:
    """A correctly signed envelope around arbitrary body bytes: isolates the body checks."""
    return join((signer or peer(key)).encode(), key.sign(tag + body).hex().encode(), body)


def expect(blob: bytes, code: str, fragment: str = "") -> RecordError:
    with pytest.raises(RecordError) as info:
        verify_signed(blob)
    assert info.value.code == code, str(info.value)
    assert fragment in info.value.detail, str(info.value)
    return info.value


# ---------------------------------------------------------------- peer ids


def test_peer_id_roundtrip_and_libp2p_form():
    pid = peer(KEY)
    assert pid.startswith("12D3KooW") and len(pid) == 52
    assert public_key_from_peer_id(pid) == public_bytes(KEY)


@pytest.mark.parametrize(
    "bad",
    [
        "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",  # sha256 multihash (RSA-style) id
        "",
        "12D3KooW0OIl",  # not base58
        "12D3KooW" + "1" * 44,  # base58 but wrong bytes
        "x" * 200,
    ],
)
def test_peer_id_rejects_anything_but_identity_ed25519(bad):
    with pytest.raises(ValueError):
        public_key_from_peer_id(bad)


# ---------------------------------------------------------------- happy path and canonical form


def test_sign_verify_roundtrip_and_hash():
    record = make()
    blob = sign_record(record, KEY)
    assert verify_signed(blob) == record
    assert len(blob) <= MAX_BLOB_BYTES
    assert record_hash(blob) == record_hash(bytes(blob))
    assert decode_record(body_of(blob)) == record
    body = encode_record(record)
    assert b" " not in body and body == body_of(blob) and parts(blob) == (peer(KEY).encode(), parts(blob)[1], body)
    assert json.loads(blob)["body"] == json.loads(body)  # a ledger line is plain JSON
    assert list(json.loads(body)) == sorted(json.loads(body))


def test_to_fixed():
    assert to_fixed(2.345678) == 2345678
    assert to_fixed(-0.5) == -500000
    with pytest.raises(ValueError):
        to_fixed(float("nan"))
    with pytest.raises(ValueError):
        to_fixed(1e300)


def test_sign_refuses_a_record_naming_another_peer():
    with pytest.raises(ValueError, match="belongs to"):
        sign_record(make(peer_id=peer(OTHER)), KEY)


@pytest.mark.parametrize(
    "over, fragment",
    [
        (dict(samples=-1), "'samples' = -1"),
        (dict(tokens=2**53), "'tokens' = 9007199254740992"),
        (dict(samples=True), "'samples' must be an integer, got bool"),
        (dict(samples=1.0), "'samples' must be an integer, got float"),
        (dict(shards=(2, 1)), "sorted"),
        (dict(shards=(1, 1)), "sorted"),
        (dict(seq=0), "prev_hash must be all zeros"),
        (dict(prev_hash=ZERO_HASH), "prev_hash must be all zeros"),
        (dict(end_ms=1), "before start_ms"),
        (dict(swarm_id="AB" * 32), "'swarm_id' must be 64 lowercase hex"),
        (dict(version=2), "unsupported record version"),
    ],
)
def test_encoder_refuses_illegal_records(over, fragment):
    with pytest.raises(RecordError) as info:
        encode_record(make(**over))
    assert info.value.code == "schema" and fragment in info.value.detail


# ---------------------------------------------------------------- tampering with a signed record

TAMPER = {
    "version": 2, "swarm_id": "ef" * 32, "peer_id": None, "seq": 2, "prev_hash": "ce" * 32, "round": 8,
    "shards": [0, 2], "samples": 65, "tokens": 8193, "loss_before": 2400000, "loss_after": 2000000,
    "adapter_hash": "12" * 32, "data_commitment": "23" * 32, "grad_commitment": "34" * 32,
    "start_ms": 1_700_000_000_001, "end_ms": 1_700_000_001_501,
}


@pytest.mark.parametrize("field", sorted(TAMPER))
def test_every_field_tampered_breaks_the_signature(field):
    blob = sign_record(make(), KEY)
    signer, sig, body = parts(blob)
    obj = json.loads(body)
    obj[field] = TAMPER[field] if TAMPER[field] is not None else peer(OTHER)
    tampered_body = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    assert tampered_body != body
    expect(join(signer, sig, tampered_body), "signature", "does not verify")


def test_record_moved_to_another_round_or_swarm_fails_signature():
    blob = sign_record(make(round=7), KEY)
    expect(blob.replace(b'"round":7', b'"round":9'), "signature")
    expect(blob.replace(SWARM.encode(), b"cd" * 32), "signature")


def test_forged_signatures():
    record = make()
    blob = sign_record(record, KEY)
    signer, sig, body = parts(blob)
    expect(join(signer, os.urandom(64).hex().encode(), body), "signature")  # random bytes
    expect(join(signer, OTHER.sign(DOMAIN_TAG + body).hex().encode(), body), "signature")  # another key
    expect(envelope(body, tag=b"swarmtune/contrib/v2\0"), "signature")  # wrong domain tag
    expect(envelope(body, tag=b""), "signature")  # no domain tag
    expect(blob[:-1], "signature")  # truncated body
    expect(blob[:100], "envelope", "unterminated 'sig'")  # truncated inside the signature
    expect(join(signer, sig[:-2], body), "envelope", "128 lowercase hex")  # short signature
    expect(join(signer, sig.upper(), body), "envelope", "128 lowercase hex")
    expect(b"", "size", "empty")


def test_envelope_shape_is_strict():
    blob = sign_record(make(), KEY)
    signer, sig, body = parts(blob)
    expect(b" " + blob, "envelope", "expected '{\"signer\":\"' at byte 0")
    expect(blob.replace(b'","sig":"', b'", "sig":"'), "envelope", "expected ',\"sig\":\"'")
    expect(blob.replace(b',"body":', b',"body" :'), "envelope", "expected ',\"body\":'")
    expect(blob[:-1], "signature")  # the body lost its closing brace
    expect(blob + b" ", "envelope", "must end with '}'")
    expect(blob + b"\n", "envelope", "must end with '}'")
    expect(b'{"sig":"' + sig + b'","signer":"' + signer + b'","body":' + body + b"}", "envelope")


def test_public_key_must_match_peer_id():
    body = encode_record(make())  # names KEY's peer id
    # signed by OTHER, header claims KEY: the signature is checked against KEY's embedded public key
    expect(join(peer(KEY).encode(), OTHER.sign(DOMAIN_TAG + body).hex().encode(), body), "signature")
    # signed by OTHER and honestly headed by OTHER, but the body names KEY
    expect(envelope(body, key=OTHER), "signer", "signed by " + peer(OTHER))
    # a signer that is not an Ed25519 peer id at all
    expect(envelope(body, signer="QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"), "peer-id")


# ---------------------------------------------------------------- validly signed but malformed bodies


def _body(**over) -> dict:
    obj = json.loads(encode_record(make()))
    obj.update(over)
    return obj


def _dump(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


MALFORMED = [
        (_dump(_body(samples=-5)), "schema", "'samples' = -5 is outside"),
        (_dump(_body(samples=2**53)), "schema", "'samples' = 9007199254740992 is outside"),
        (_dump(_body(tokens=2**64)), "schema", "'tokens'"),
        (_dump(_body(samples=10**4000)), "size", "over the 4096-byte bound"),
        (_dump(_body(loss_before=-(2**53))), "schema", "'loss_before'"),
        (_dump(_body(samples=64.0)), "encoding", "non-integer number 64.0"),
        (_dump(_body(samples=True)), "schema", "'samples' must be an integer, got bool"),
        (_dump(_body(round=False)), "schema", "'round' must be an integer, got bool"),
        (_dump(_body(samples=None)), "schema", "'samples' must be an integer, got NoneType"),
        (_dump(_body(samples={})), "schema", "'samples' must be an integer, got dict"),
        (_dump(_body(prev_hash=5)), "schema", "'prev_hash' must be 64 lowercase hex"),
        (_dump(_body(samples="64")), "schema", "'samples' must be an integer, got str"),
        (_dump(_body(shards=[5, 0])), "schema", "sorted"),
        (_dump(_body(shards=[0, 0])), "schema", "sorted"),
        (_dump(_body(shards=[-1])), "schema", "'shards' = -1"),
        (_dump(_body(shards=7)), "schema", "'shards' must be a list"),
        (_dump(_body(shards=list(range(300)))), "schema", "at most 256"),
        (_dump(_body(extra=1)), "schema", "unknown field(s) extra"),
        (_dump({k: v for k, v in _body().items() if k != "tokens"}), "schema", "missing field(s) tokens"),
        (_dump(_body(swarm_id="AB" * 32)), "schema", "'swarm_id' must be 64 lowercase hex"),
        (_dump(_body(end_ms=0)), "schema", "before start_ms"),
        (_dump(_body(samples=1e3)), "encoding", "non-integer number 1000.0"),
        (_dump(_body()).replace(b'"samples":64', b'"samples":NaN'), "encoding", "NaN is not allowed"),
        (_dump(_body()).replace(b'"samples":64', b'"samples":Infinity'), "encoding", "Infinity is not allowed"),
        (_dump(_body()).replace(b'"samples":64', b'"samples":64,"samples":64'), "encoding", "duplicate key 'samples'"),
        (_dump(_body()).replace(b'"samples":64', b'"samples":064'), "encoding", "not valid JSON"),
        (_dump(_body()).replace(b'"samples":64', b'"samples":6.4e1'), "encoding", "non-integer number"),
        (_dump(_body()).replace(b'"samples":64', b'"samples":[[[[1]]]]'), "encoding", "nesting deeper than 2"),
        (b"[" * 5000, "size", "over the"),  # oversize wins before anything is parsed
        (b"[" * 1000, "encoding", "nesting deeper than 2"),
        (_dump(_body()).replace(b'"samples"', b'"s\xc3amples"'), "encoding", "not ASCII"),
        (_dump(_body()).replace(b'"samples"', b'"s\xffamples"'), "encoding", "not ASCII"),
        (_dump(_body()).replace(b'"samples"', b'"\\u0073amples"'), "encoding", "not in canonical form"),
        (_dump(_body()).replace(b",", b", ", 1), "encoding", "not in canonical form"),
        (json.dumps(_body()).encode(), "encoding", "not in canonical form"),  # default separators
        (_dump(_body(seq=0)), "schema", "prev_hash must be all zeros"),
        (b"[]", "encoding", "must be a JSON object"),
        (b"{", "encoding", "not valid JSON"),
        (b"", "encoding", "not valid JSON"),
]


@pytest.mark.parametrize("body, code, fragment", MALFORMED, ids=[f"{c}:{f[:40]}" for _, c, f in MALFORMED])
def test_malformed_bodies_with_valid_signatures(body, code, fragment):
    expect(envelope(body), code, fragment)


def test_negative_zero_is_not_canonical():
    body = _dump(_body(loss_after=0)).replace(b'"loss_after":0', b'"loss_after":-0')
    expect(envelope(body), "encoding", "not in canonical form")


def test_oversized_value():
    expect(envelope(b"{" + b" " * MAX_BLOB_BYTES + b"}"), "size", "over the 4096-byte bound")


# ---------------------------------------------------------------- key rotation statements


def test_rotation_signed_by_both_keys():
    rotation = KeyRotation(1, SWARM, peer(KEY), peer(OTHER), 3, "cd" * 32, 1_700_000_000_000)
    blob = sign_rotation(rotation, KEY, OTHER)
    assert verify_rotation(blob) == rotation
    head, body = blob.split(b',"body":', 1)
    body = body[:-1]
    fields = json.loads(head + b"}")

    def rjoin(sig_old, sig_new):
        return (
            f'{{"old":"{fields["old"]}","new":"{fields["new"]}","sig_old":"{sig_old}","sig_new":"{sig_new}","body":'.encode()
            + body
            + b"}"
        )

    assert rjoin(fields["sig_old"], fields["sig_new"]) == blob
    third = Ed25519PrivateKey.from_private_bytes(bytes(range(2, 34)))
    forged = third.sign(b"swarmtune/rotate/v1\0" + body).hex()
    with pytest.raises(RecordError, match="new key"):
        verify_rotation(rjoin(fields["sig_old"], forged))
    with pytest.raises(RecordError, match="old key"):
        verify_rotation(rjoin(forged, fields["sig_new"]))
    # a contribution signature is not a rotation signature (domain separation)
    with pytest.raises(RecordError, match="old key"):
        verify_rotation(rjoin(KEY.sign(DOMAIN_TAG + body).hex(), fields["sig_new"]))
    with pytest.raises(ValueError):
        sign_rotation(rotation, OTHER, KEY)


# ---------------------------------------------------------------- property tests

SIGNED = sign_record(make(), KEY)


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_decoder_never_crashes_on_junk(data):
    for blob in (data, SIGNED[:60] + data, SIGNED[:190] + data):
        try:
            verify_signed(blob)
        except RecordError:
            pass


@st.composite
def mutations(draw):
    blob = bytearray(SIGNED)
    kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "append"]))
    pos = draw(st.integers(0, len(blob) - 1))
    if kind == "flip":
        blob[pos] ^= 1 << draw(st.integers(0, 7))
    elif kind == "set":
        value = draw(st.integers(0, 255).filter(lambda b: b != blob[pos]))
        blob[pos] = value
    elif kind == "insert":
        blob[pos:pos] = draw(st.binary(min_size=1, max_size=8))
    elif kind == "delete":
        del blob[pos : pos + draw(st.integers(1, 8))]
    elif kind == "truncate":
        del blob[pos:]
    else:
        blob += draw(st.binary(min_size=1, max_size=8))
    return bytes(blob)


@settings(max_examples=600, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations())
def test_no_mutated_signed_record_is_accepted(blob):
    if blob == SIGNED:
        return
    with pytest.raises(RecordError):
        verify_signed(blob)


@settings(max_examples=100, deadline=None, database=None)
@given(
    seq=st.integers(1, 2**53 - 1),
    samples=st.integers(0, 2**53 - 1),
    loss=st.integers(-(2**53) + 1, 2**53 - 1),
    shards=st.lists(st.integers(0, 10_000), max_size=40, unique=True),
)
def test_encoding_roundtrips(seq, samples, loss, shards):
    record = make(seq=seq, samples=samples, loss_after=loss, shards=tuple(sorted(shards)))
    blob = sign_record(record, KEY)
    assert verify_signed(blob) == record
    assert dataclasses.replace(record) == decode_record(encode_record(record))
