"""Benchmark: sign and verify contribution records, and append them to a ledger.

    python scripts/bench_records.py [--records 100000] [--appends 2000] [--out bench_records.json]

Measures, in one run on one core: records/s for `sign_record` (encode + Ed25519 sign),
records/s for `verify_signed` (size/envelope checks + Ed25519 verify + canonical parse),
records/s for bare Ed25519 sign/verify of the same bodies, measured in interleaved chunks
so that load from other processes hits both alike (the ratio is the format's overhead), and
`Ledger.append` rate (verify + chain checks + write + fsync per record), then writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from node.ledger import Ledger  # noqa: E402
from protocol.peerid import peer_id_from_public_key  # noqa: E402
from protocol.record import (  # noqa: E402
    DOMAIN_TAG,
    ZERO_HASH,
    ContributionRecord,
    encode_record,
    public_bytes,
    sign_record,
    verify_signed,
)


CHUNK = 1000


def make_records(key: Ed25519PrivateKey, n: int) -> list[ContributionRecord]:
    peer_id = peer_id_from_public_key(public_bytes(key))
    return [
        ContributionRecord(
            version=1, swarm_id="ab" * 32, peer_id=peer_id, seq=i, prev_hash=ZERO_HASH if i == 0 else f"{i:064x}",
            round=i, shards=(0, 1, 3), samples=64, tokens=8192 + i, loss_before=2_500_000 - i, loss_after=2_400_000 - i,
            adapter_hash="11" * 32, data_commitment="22" * 32, grad_commitment="33" * 32,
            start_ms=1_700_000_000_000 + i * 1000, end_ms=1_700_000_000_900 + i * 1000,
        )
        for i in range(n)
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--appends", type=int, default=2_000, help="ledger appends (each one fsyncs)")
    parser.add_argument("--out", default="bench_records.json")
    args = parser.parse_args()

    key = Ed25519PrivateKey.generate()
    records = make_records(key, args.records)

    # Side by side, in interleaved chunks, so load from other processes hits both alike:
    # the full path (encode/validate + sign, or check + verify + parse) vs bare Ed25519.
    bodies = [encode_record(r) for r in records]
    public = key.public_key()
    blobs: list[bytes] = []
    sigs: list[bytes] = []
    sign_s = raw_sign_s = verify_s = raw_verify_s = 0.0
    for start in range(0, len(records), CHUNK):
        chunk = slice(start, start + CHUNK)
        t = time.perf_counter()
        blobs += [sign_record(r, key) for r in records[chunk]]
        sign_s += time.perf_counter() - t
        t = time.perf_counter()
        sigs += [key.sign(DOMAIN_TAG + b) for b in bodies[chunk]]
        raw_sign_s += time.perf_counter() - t
    for start in range(0, len(records), CHUNK):
        chunk = slice(start, start + CHUNK)
        t = time.perf_counter()
        for blob in blobs[chunk]:
            verify_signed(blob)
        verify_s += time.perf_counter() - t
        t = time.perf_counter()
        for body, sig in zip(bodies[chunk], sigs[chunk]):
            public.verify(sig, DOMAIN_TAG + body)
        raw_verify_s += time.perf_counter() - t
    raw_n = len(records)

    fields = dict(
        swarm_id="ab" * 32, shards=(0, 1, 3), samples=64, tokens=8192, loss_before=2_500_000, loss_after=2_400_000,
        adapter_hash="11" * 32, data_commitment="22" * 32, grad_commitment="33" * 32, start_ms=0, end_ms=1,
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.log"
        with Ledger.open(path) as ledger:
            t = time.perf_counter()
            for i in range(args.appends):
                ledger.append_new(key, round=i, **fields)
            append_s = time.perf_counter() - t
        t = time.perf_counter()
        Ledger.open(path).close()
        reopen_s = time.perf_counter() - t

    result = {
        "records": args.records,
        "sign_records_per_s": round(args.records / sign_s),
        "verify_records_per_s": round(args.records / verify_s),
        "raw_ed25519_sign_per_s": round(raw_n / raw_sign_s),
        "raw_ed25519_verify_per_s": round(raw_n / raw_verify_s),
        "sign_overhead_vs_raw": round((raw_n / raw_sign_s) / (args.records / sign_s), 2),
        "verify_overhead_vs_raw": round((raw_n / raw_verify_s) / (args.records / verify_s), 2),
        "mean_record_bytes": round(sum(map(len, blobs)) / len(blobs)),
        "ledger_appends": args.appends,
        "ledger_append_per_s": round(args.appends / append_s),
        "ledger_reopen_records_per_s": round(args.appends / reopen_s),
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(), "platform": platform.platform()},
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
