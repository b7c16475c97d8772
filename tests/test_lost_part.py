"""One lost part in a healthy swarm: the round is retried by the same group, nobody is distrusted, no
split is logged, every adapter stays identical (real processes on 127.0.0.1, the real p2pd).

The fault is real: one node's averager cuts one of its all-reduce streams after the first message
(SWARMTUNE_FAULT_CUT_STREAM, node/swarm/averager.py), as a connection lost mid-transfer would. The
reducer on the other end drops that sender and tells every sender the part is INCOMPLETE.
"""

from __future__ import annotations

import pytest

from tests.conftest import verify_ledgers, write_test_manifest

pytestmark = pytest.mark.swarm


@pytest.mark.timeout(300)
def test_one_cut_stream_is_retried_within_the_round(tmp_path, tiny_base, spawn_node):
    rounds = 8
    manifest = write_test_manifest(tmp_path / "swarm.toml", tiny_base, rounds={"max_rounds": rounds})
    a = spawn_node(manifest, "a", "--min-peers", "3")
    peers = a.wait_info()["maddrs"]
    b = spawn_node(manifest, "b", "--min-peers", "3", "--initial-peers", *peers)
    # in round 2, each averager process of c (one per shard) cuts its first stream to a reducer
    c = spawn_node(manifest, "c", "--min-peers", "3", "--initial-peers", *peers, env={"SWARMTUNE_FAULT_CUT_STREAM": "2"})
    for node in (a, b, c):
        assert node.wait_exit(timeout=240) == 0, node.log.read_text()[-3000:]
    logs = {n.home.name: n.log.read_text() for n in (a, b, c)}
    assert "fault injection: cutting this all-reduce stream" in logs["c"]
    for name, text in logs.items():
        assert "retrying the all-reduce of shard(s)" in text, f"{name} did not retry the round"
        for symptom in ("not asked again", "lost contact", "split", "resync", "synced adapter"):
            assert symptom not in text, f"{name}: {symptom!r} after one lost part:\n{text[-3000:]}"
    rows = {n.home.name: {r["round"]: r for r in n.rounds()} for n in (a, b, c)}
    for r in range(rounds):
        assert all(rows[name][r]["applied"] for name in rows), f"round {r} not applied everywhere"
        assert all(rows[name][r]["groups"] == {"0": 3, "1": 3} for name in rows), r
        assert len({rows[name][r]["hash"] for name in rows}) == 1, f"round {r}: adapters differ"
    # the lost part cost a sender timeout (half the measured deadline, at least 2.5 s) and one retry, not the
    # manifest's 20 s timeout: the round that lost it took seconds
    assert max(rows[name][2]["seconds"] for name in rows) < 8.0, [rows[name][2]["seconds"] for name in rows]
    verify_ledgers(manifest, a, b, c)
