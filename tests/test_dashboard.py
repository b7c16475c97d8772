"""The operator's web dashboard, in a real browser: `swarmtune run --dashboard-port N`, loaded by headless
Chromium, shows the node's peer id and a round that advances without a reload; a paused node shows
`paused` on the page, in `swarmtune status` and in the metrics. Plus the page's data sources alone.

Run: python -m pytest tests/test_dashboard.py -q      (needs Debian's chromium; skipped without it)
"""

from __future__ import annotations

import json
import logging
import socket
import time
import urllib.request

import pytest

from node.control_client import ControlClient
from node.dashboard import ProgressTail, WarningLog, _finite
from tests.browser import Browser, chromium
from tests.conftest import write_test_manifest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dom(b: Browser) -> dict:
    """What the page shows now (empty strings while it is still loading)."""
    return b.eval("({peer: document.getElementById('peer-id')?.textContent ?? '', round: document.getElementById('round')?.textContent"
                  " ?? '', state: document.getElementById('state')?.textContent ?? '', reach: document.getElementById('reach')?.textContent ?? '', lines: document.querySelectorAll("
                  "'#loss-chart polyline').length, rows: document.querySelectorAll('#shard-rows tr').length})")


def _wait_dom(b: Browser, check, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    dom = {}
    while time.monotonic() < deadline:
        dom = _dom(b)
        if check(dom):
            return dom
        time.sleep(0.3)
    raise AssertionError(f"{what} not seen in {timeout} s; page shows {dom}")


@pytest.mark.swarm
@pytest.mark.timeout(240)
@pytest.mark.skipif(chromium() is None, reason="needs chromium (apt-get install chromium)")
def test_dashboard_in_chromium_shows_peer_and_advancing_round(tmp_path, tiny_base, spawn_node):
    manifest = write_test_manifest(tmp_path / "swarm.toml", tiny_base, rounds={"max_rounds": 1000})
    port, mport = _free_port(), _free_port()
    node = spawn_node(manifest, "a", "--dashboard-port", str(port), "--metrics-port", str(mport))
    peer_id = node.wait_info()["peer_id"]
    node.wait_log("dashboard: http://127.0.0.1:", timeout=120)
    with Browser(tmp_path / "chromium") as b:
        b.open(f"http://127.0.0.1:{port}/")
        first = _wait_dom(b, lambda d: d["peer"] == peer_id and d["round"].isdigit(), 60, "the peer id and a round")
        # the same page, never reloaded: the round advances through server-sent events
        later = _wait_dom(b, lambda d: d["round"].isdigit() and int(d["round"]) >= int(first["round"]) + 2, 90,
                          f"a round past {first['round']}")
        assert later["lines"] == 1 and later["rows"] == 2, later  # the loss curve is drawn; both shards listed
        assert later["state"] == "training", later
        assert later["reach"] == "public", later  # the first node of a swarm: nobody to dial it back, reported public
        overview = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/overview", timeout=10).read())
        assert overview["status"]["peer_id"] == peer_id and len(overview["history"]) >= 2
        own = overview["credit"]["own"]  # from the verified ledger: a lone trainer claims rounds that nobody receipts
        assert own["claimed_rounds"] >= 1 and own["verified_rounds"] == 0, overview["credit"]

        with ControlClient(node.home / "node.sock") as client:  # paused shows paused everywhere
            client.pause()
            _wait_dom(b, lambda d: d["state"] == "paused", 60, "state paused")
            assert client.status()["state"] == "paused"
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()
        assert 'swarmtune_state{swarmtune_state="paused"} 1.0' in metrics
    log = node.log.read_text()
    assert "\x1b[" not in log and "round 1: loss" in log  # not a terminal: plain lines, no live line


def test_progress_tail_reads_only_whole_new_lines(tmp_path) -> None:
    path = tmp_path / "rounds.jsonl"
    tail = ProgressTail(path)
    assert tail.points() == []  # no file yet
    with open(path, "w") as f:
        f.write(json.dumps({"round": 0, "loss": 2.5, "samples": 24, "seconds": 2.0, "averaging_s": 0.5}) + "\n")
        f.write('{"round": 1, "lo')  # being written
        f.flush()
        assert [p["round"] for p in tail.points()] == [0]
        assert tail.points()[0]["samples_per_s"] == 12.0
        f.write('ss": 2.0, "samples": 24, "seconds": 1.0}\n')
    assert [(p["round"], p["loss"]) for p in tail.points()] == [(0, 2.5), (1, 2.0)]


def test_warning_log_keeps_the_last_warnings_and_json_has_no_nan() -> None:
    log = WarningLog(size=2)
    logger = logging.getLogger("test.dashboard")
    logger.addHandler(log)
    try:
        logger.info("not kept")
        for i in range(3):
            logger.warning("warning %d", i)
    finally:
        logger.removeHandler(log)
    assert [w["msg"] for w in log.items()] == ["warning 1", "warning 2"]
    assert json.dumps(_finite({"loss": float("nan"), "x": [float("inf"), 1.0]})) == '{"loss": null, "x": [null, 1.0]}'
