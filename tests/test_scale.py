"""One shard's group beyond the old 32-peer cap: 40 averaging-only peers (scripts/sim_scale.py), each a
real hivemind DHT with its own p2pd on 127.0.0.1 running the node's exchange, sum random vectors; every
group that forms gives each member the exact integer sum of its members' grid values, and a round
with all 40 in one group completes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.swarm


@pytest.mark.timeout(900)
def test_forty_peers_sum_exactly_in_one_group(tmp_path):
    out = tmp_path / "sim.json"
    log = tmp_path / "sim.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "scripts/sim_scale.py", "--peers", "40", "--values", "16384", "--rounds",
                                 "2", "--matchmaking-per-peer", "0.25", "--out", str(out)],
                                cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proc.wait(timeout=840)
    finally:  # its DHT processes and p2p daemons are in its process group
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert out.exists(), log.read_text(errors="replace")[-3000:]
    result = json.loads(out.read_text())["results"][0]
    assert result["peers_seen_min"] == 40, result
    assert result["exact"], result["rows"]  # whatever groups formed summed exactly
    assert result["rounds_complete"] >= 1, result["rows"]  # and all 40 summed together
    assert all(row["exact"] for row in result["rows"])
