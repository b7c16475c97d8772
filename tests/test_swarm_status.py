"""`swarmtune swarm status`: the whole swarm from the DHT with no local node (peers, rounds, coverage,
verified credit), against a real 2-node swarm on 127.0.0.1.

Run: python -m pytest tests/test_swarm_status.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_test_manifest

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node", *args], capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          start_new_session=True)


@pytest.mark.swarm
@pytest.mark.timeout(300)
def test_swarm_status_from_the_dht(tmp_path, tiny_base, spawn_node):
    manifest = write_test_manifest(tmp_path / "swarm.toml", tiny_base, rounds={"max_rounds": 1000})
    a = spawn_node(manifest, "a", "--min-peers", "2")
    peers = a.wait_info()["maddrs"]
    b = spawn_node(manifest, "b", "--min-peers", "2", "--initial-peers", *peers)
    b.wait_round(3, timeout=180)
    got = _cli("swarm", "status", "--manifest", str(manifest), "--initial-peers", *peers, "--json")
    assert got.returncode == 0, got.stderr[-3000:]
    view = json.loads(got.stdout)
    ids = {a.info()["peer_id"], b.info()["peer_id"]}
    assert {p["peer_id"] for p in view["peers"]} == ids, view["peers"]  # the reader itself is not a peer
    assert view["round"] >= 2 and all(p["round"] >= 2 and p["shards"] == [0, 1] for p in view["peers"]), view
    assert [s["trainers"] for s in view["shards"]] == [2, 2]
    assert view["records"]["verified"] >= 4 and view["records"]["rejected"] == 0, view["records"]
    credit = {c["peer_id"]: c for c in view["credit"]}
    assert set(credit) == ids and all(c["verified_rounds"] >= 2 for c in credit.values()), credit
    text = _cli("swarm", "status", "--manifest", str(manifest), "--initial-peers", *peers)
    assert text.returncode == 0 and "2 peer(s)" in text.stdout and "shard coverage" in text.stdout, text.stdout + text.stderr


def test_swarm_status_bad_manifest_is_a_clear_error(tmp_path):
    got = _cli("swarm", "status", "--manifest", str(tmp_path / "nope.toml"), "--initial-peers", "/ip4/127.0.0.1/tcp/1")
    assert got.returncode == 2 and "nope.toml" in got.stderr and "Traceback" not in got.stderr, got.stderr
