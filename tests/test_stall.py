"""Stall detection: a node that ends no round for too long says so, with the reason, in `swarmtune status`,
in `swarmtune_stalled`, and through `swarmtune status --healthcheck` (the Docker healthcheck) exiting 1.

Run: python -m pytest tests/test_stall.py -q
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from node.status import Snapshot, StallWatch
from tests.conftest import write_test_manifest

REPO = Path(__file__).resolve().parents[1]


def test_stall_rule() -> None:
    watch = StallWatch(factor=10, min_s=30, started_at=1000.0)
    start = Snapshot(state="syncing", state_since=1000.0)
    assert watch.reason(start, now=1029) == ""
    assert "no round ended since the node started (limit 30 s)" in watch.reason(start, now=1031)
    # rounds of 5 s: the limit is 10 x 5 = 50 s after the last one
    going = Snapshot(state="training", state_since=1001.0, last_round_at=2000.0, last_round_s=5.0, peers={"a": 1, "b": 1})
    assert watch.reason(going, now=2049) == ""
    reason = watch.reason(going, now=2051)
    assert "no round ended for 51 s (limit 50 s: 10 x the last round's 5.0 s" in reason and "1 peer(s)" in reason
    # fast rounds: at least min_s
    fast = Snapshot(state="training", state_since=1001.0, last_round_at=2000.0, last_round_s=0.5)
    assert watch.reason(fast, now=2029) == "" and watch.reason(fast, now=2031) != ""
    # paused / draining / stopped never stall, and the clock restarts when the node resumes
    assert watch.reason(Snapshot(state="paused", state_since=2001.0, last_round_at=2000.0, last_round_s=0.5), now=9999) == ""
    resumed = Snapshot(state="training", state_since=5000.0, last_round_at=2000.0, last_round_s=0.5)
    assert watch.reason(resumed, now=5029) == "" and watch.reason(resumed, now=5031) != ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthcheck(home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node", "status", "--healthcheck", "--socket", str(home / "node.sock")],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def _wait_health(home: Path, code: int, timeout: float) -> subprocess.CompletedProcess:
    deadline = time.monotonic() + timeout
    while True:
        got = _healthcheck(home)
        if got.returncode == code or time.monotonic() > deadline:
            return got
        time.sleep(1)


@pytest.mark.swarm
@pytest.mark.timeout(300)
def test_stalled_node_fails_its_healthcheck_until_rounds_resume(tmp_path, tiny_base, spawn_node):
    manifest = write_test_manifest(tmp_path / "swarm.toml", tiny_base, rounds={"max_rounds": 1000})
    port = _free_port()
    # waits for a second node that is not there yet: no round, so stalled once stall_min_s passed
    a = spawn_node(manifest, "a", "--min-peers", "2", "--peer-wait", "600", "--stall-min-s", "6", "--metrics-port", str(port))
    peers = a.wait_info()["maddrs"]
    got = _wait_health(a.home, 1, 90)
    assert got.returncode == 1, got.stdout + got.stderr
    assert got.stdout.startswith("unhealthy: stalled at round 0: no round ended since the node started (limit 6 s)"), got.stdout
    status = json.loads(subprocess.run([sys.executable, "-m", "node", "status", "--json", "--socket", str(a.home / "node.sock")],
                                       capture_output=True, text=True, cwd=REPO, timeout=60).stdout)
    assert status["stalled"] is True and "state syncing" in status["stall_reason"], status
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert "swarmtune_stalled 1.0" in metrics

    spawn_node(manifest, "b", "--min-peers", "2", "--initial-peers", *peers)
    a.wait_round(2, timeout=180)
    got = _wait_health(a.home, 0, 60)
    assert got.returncode == 0 and got.stdout.startswith("healthy: training at round"), got.stdout + got.stderr
    assert "swarmtune_stalled 0.0" in urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    none = _healthcheck(tmp_path / "nobody")  # no daemon: exit 2, as before
    assert none.returncode == 2 and "Traceback" not in none.stderr
