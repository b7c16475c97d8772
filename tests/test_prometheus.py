"""Metrics that tell the truth: a real Prometheus server scrapes a running node, `promtool check metrics`
lints the exposition, and every metric README lists exists in the node's registry and is scraped.

Run: python -m pytest tests/test_prometheus.py -q     (needs Debian's prometheus; skipped without it)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from node.metrics import NodeMetrics
from tests.conftest import write_test_manifest

README = Path(__file__).resolve().parents[1] / "README.md"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readme_metrics() -> set[str]:
    """Metric names in README's metrics table (rows starting with `swarmtune_...`)."""
    return set(re.findall(r"^\| `(swarmtune_[a-z_]+)`", README.read_text(), flags=re.M))


def _families(registry) -> set[str]:
    names = set()
    for family in registry.collect():
        names.add(family.name + ("_total" if family.type == "counter" else "") + ("_info" if family.type == "info" else ""))
    return names


def test_readme_lists_exactly_the_registered_metrics() -> None:
    listed, registered = readme_metrics(), _families(NodeMetrics().registry)
    assert listed, "README has no metrics table"
    assert listed == registered, f"only in README: {sorted(listed - registered)}; only in the code: {sorted(registered - listed)}"


def _query(port: int, expr: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = json.loads(urllib.request.urlopen(url, timeout=5).read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def _value(port: int, expr: str) -> float | None:
    try:
        result = _query(port, expr)
    except OSError:  # prometheus still starting
        return None
    return float(result[0]["value"][1]) if result else None


@pytest.mark.swarm
@pytest.mark.timeout(240)
@pytest.mark.skipif(shutil.which("prometheus") is None or shutil.which("promtool") is None,
                    reason="needs prometheus and promtool (apt-get install prometheus)")
def test_prometheus_scrapes_a_running_node(tmp_path, tiny_base, spawn_node):
    manifest = write_test_manifest(tmp_path / "swarm.toml", tiny_base, rounds={"max_rounds": 1000})
    mport, pport = _free_port(), _free_port()
    node = spawn_node(manifest, "a", "--metrics-port", str(mport))
    node.wait_round(1, timeout=120)
    exposition = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read()
    lint = subprocess.run(["promtool", "check", "metrics"], input=exposition, capture_output=True, timeout=30)
    assert lint.returncode == 0 and not lint.stdout.strip() and not lint.stderr.strip(), lint

    config = tmp_path / "prometheus.yml"
    config.write_text(f"global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: swarmtune\n"
                      f"    static_configs:\n      - targets: ['127.0.0.1:{mport}']\n")
    check = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    with open(tmp_path / "prometheus.log", "wb") as log:
        prom = subprocess.Popen(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{pport}"], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        first = None
        while time.monotonic() < deadline:
            first = _value(pport, 'swarmtune_round{job="swarmtune"}')
            if first is not None:
                break
            assert prom.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            time.sleep(0.5)
        assert first is not None, "prometheus never scraped the node: " + (tmp_path / "prometheus.log").read_text()[-2000:]
        later = first
        while time.monotonic() < deadline and later <= first:
            time.sleep(1)
            later = _value(pport, 'swarmtune_round{job="swarmtune"}')
        assert later > first, f"swarmtune_round stayed at {first}"
        assert _value(pport, 'up{job="swarmtune"}') == 1
        assert _value(pport, "swarmtune_rss_bytes") > 50e6
        # fed by a solo node after a few rounds (network bytes need peers: tests/test_lifecycle.py checks them)
        for expr in ("swarmtune_samples_total", "swarmtune_tokens_total", "swarmtune_samples_per_second",
                     "swarmtune_round_seconds", "swarmtune_shards_trained", "swarmtune_averaging_seconds_count",
                     "swarmtune_ledger_records_total", 'swarmtune_state{swarmtune_state="training"}'):
            assert (_value(pport, expr) or 0) > 0, expr
        assert _value(pport, "swarmtune_stalled") == 0
        scraped = {r["metric"]["__name__"] for r in _query(pport, '{__name__=~"swarmtune_.+",job="swarmtune"}')}
        expected = (readme_metrics() - {"swarmtune_averaging_seconds"}) | {"swarmtune_averaging_seconds_count"}  # a histogram
        assert expected <= scraped, f"README metrics prometheus did not get: {sorted(expected - scraped)}"
    finally:
        os.killpg(prom.pid, signal.SIGKILL)
        prom.wait(timeout=30)
