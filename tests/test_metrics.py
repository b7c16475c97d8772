"""Prometheus metrics and log formatting: scrape a real /metrics endpoint on 127.0.0.1.

Run: python -m pytest tests/test_metrics.py -q
"""

from __future__ import annotations

import io
import json
import logging
import math
import urllib.request

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from node.logs import setup_logging
from node.metrics import NodeMetrics, start_metrics_server


def _scrape(url: str) -> dict[str, float]:
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    return {
        sample.name + (str(sorted(sample.labels.items())) if sample.labels else ""): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def test_scrape_shows_what_the_node_reported() -> None:
    metrics = NodeMetrics()
    server = start_metrics_server(metrics.registry, port=0)
    try:
        assert server.url.startswith("http://127.0.0.1:")
        before = _scrape(server.url)
        assert math.isnan(before["swarmtune_loss"])  # no round yet: NaN, not a perfect 0
        metrics.set_identity("swarm-abc", "12D3KooWTiny")
        metrics.set_state("syncing")
        metrics.on_round(round=3, loss=1.25, samples=64, tokens=8192, duration_s=2.0, peers=2)
        metrics.on_round(round=4, loss=1.0, samples=32, tokens=4096, duration_s=1.0)
        assert metrics.registry.get_sample_value("swarmtune_samples_per_second") == 32
        metrics.on_round(round=5, loss=None, samples=0, tokens=0, samples_per_s=40.0, tokens_per_s=5000.0)
        metrics.on_averaging(0.3)
        metrics.on_averaging(9.0, ok=False)
        metrics.on_state_sync()
        metrics.on_record()
        metrics.on_network(sent_bytes=1000, received_bytes=2500)
        metrics.set_memory(rss_bytes=300 << 20)
        got = _scrape(server.url)
    finally:
        server.stop()
    assert got["swarmtune_round"] == 5 and got["swarmtune_loss"] == 1.0  # a round without loss keeps the last
    assert got["swarmtune_samples_total"] == 96 and got["swarmtune_tokens_total"] == 12288
    assert got["swarmtune_samples_per_second"] == 40 and got["swarmtune_tokens_per_second"] == 5000
    assert got["swarmtune_round_seconds"] == 1.0
    assert got["swarmtune_peers"] == 2  # kept from the round that reported it
    assert got["swarmtune_averaging_seconds_count"] == 2 and got["swarmtune_averaging_seconds_sum"] == pytest.approx(9.3)
    assert got["swarmtune_averaging_seconds_bucket[('le', '0.5')]"] == 1
    assert got["swarmtune_averaging_failures_total"] == 1
    assert got["swarmtune_state_syncs_total"] == 1 and got["swarmtune_ledger_records_total"] == 1
    assert got["swarmtune_network_sent_bytes_total"] == 1000
    assert got["swarmtune_network_received_bytes_total"] == 2500
    assert got["swarmtune_rss_bytes"] == 300 << 20
    assert got["swarmtune_state[('swarmtune_state', 'syncing')]"] == 1
    assert got["swarmtune_state[('swarmtune_state', 'training')]"] == 0
    assert got[f"swarmtune_node_info{sorted({'peer_id': '12D3KooWTiny', 'swarm_id': 'swarm-abc', 'version': '0.1.0'}.items())}"] == 1


def test_nodes_do_not_share_metrics_or_touch_the_global_registry() -> None:
    a, b = NodeMetrics(), NodeMetrics()
    a.on_record()
    assert a.registry.get_sample_value("swarmtune_ledger_records_total") == 1
    assert b.registry.get_sample_value("swarmtune_ledger_records_total") == 0
    assert REGISTRY.get_sample_value("swarmtune_ledger_records_total") is None


def test_metrics_port_in_use_names_the_port() -> None:
    metrics = NodeMetrics()
    first = start_metrics_server(metrics.registry, port=0)
    try:
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{first.port}"):
            start_metrics_server(metrics.registry, port=first.port)
    finally:
        first.stop()


@pytest.fixture
def restore_logging(monkeypatch):
    monkeypatch.delenv("HIVEMIND_LOGLEVEL", raising=False)  # setup_logging sets it; undo after the test
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("hivemind").level)
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    logging.getLogger("hivemind").setLevel(saved[2])


def test_json_logs_one_object_per_line(restore_logging) -> None:
    out = io.StringIO()
    setup_logging("info", json=True, stream=out)
    log = logging.getLogger("node.daemon")
    log.info("round %d done", 3, extra={"loss": 1.25, "peers": 2})
    logging.getLogger("hivemind.averaging").info("matchmaking chatter")  # quieted below WARNING
    logging.getLogger("hivemind.averaging").warning("averaging failed")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("round failed")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["msg"] for line in lines] == ["round 3 done", "averaging failed", "round failed"]
    assert lines[0]["level"] == "INFO" and lines[0]["logger"] == "node.daemon"
    assert lines[0]["loss"] == 1.25 and lines[0]["peers"] == 2 and lines[0]["ts"].endswith("+00:00")
    assert lines[1]["level"] == "WARNING"
    assert "RuntimeError: boom" in lines[2]["exc"]


def test_text_logs_and_debug_lets_hivemind_through(restore_logging) -> None:
    out = io.StringIO()
    setup_logging("debug", stream=out)
    setup_logging("debug", stream=out)  # idempotent: one handler, not two
    logging.getLogger("hivemind.dht").debug("dht detail", extra={"key": "abc"})
    text = out.getvalue()
    assert text.count("dht detail") == 1
    assert "DEBUG hivemind.dht: dht detail  key=abc" in text
    with pytest.raises(ValueError, match="unknown log level"):
        setup_logging("loud")
