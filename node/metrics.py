"""Prometheus metrics of a node: what the daemon reports, what `/metrics` serves.

Everything lives in a registry of its own (never prometheus-client's global
one), so two nodes in one process, or a test, never share counters.

    metrics = NodeMetrics()
    server = start_metrics_server(metrics.registry, port=9400)   # http://127.0.0.1:9400/metrics
    metrics.on_round(round=3, loss=1.25, samples=64, tokens=8192, duration_s=2.0, peers=2)
    server.stop()

Metric names start with `swarmtune_`; counters get prometheus' `_total` suffix.
The server binds 127.0.0.1 unless told otherwise: metrics show peer counts and
throughput, which is nobody else's business by default.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, Info, start_http_server

from node import __version__

# Averaging is dominated by matchmaking (0.5-15 s) on home links; the tail shows stuck groups.
AVERAGING_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
NODE_STATES = ("training", "paused", "draining", "syncing", "stopped")


class NodeMetrics:
    """The node's metrics; the daemon calls the `on_*` / `set_*` methods as things happen."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.round = Gauge("swarmtune_round", "Swarm round (hivemind epoch) this node is in.", registry=r)
        self.loss = Gauge("swarmtune_loss", "Mean training loss of the last round.", registry=r)
        self.loss.set(float("nan"))  # no round yet: NaN, not a perfect 0.0
        self.samples = Counter("swarmtune_samples", "Samples trained by this node.", registry=r)
        self.tokens = Counter("swarmtune_tokens", "Tokens trained by this node.", registry=r)
        self.samples_per_s = Gauge("swarmtune_samples_per_second", "Local throughput over the last round.", registry=r)
        self.tokens_per_s = Gauge("swarmtune_tokens_per_second", "Local throughput over the last round.", registry=r)
        self.round_seconds = Gauge("swarmtune_round_seconds", "Duration of the last round.", registry=r)
        self.peers = Gauge("swarmtune_peers", "Peers seen in the swarm, this node excluded.", registry=r)
        self.missing_peers = Gauge(
            "swarmtune_peers_missing", "Peers seen recently that are not visible now (a partition or crashed peers).", registry=r
        )
        self.shards = Gauge("swarmtune_shards_trained", "Adapter shards this node trains.", registry=r)
        self.averaging_seconds = Histogram(
            "swarmtune_averaging_seconds", "Time of one gradient averaging step (matchmaking + all-reduce).",
            buckets=AVERAGING_BUCKETS, registry=r,
        )
        self.averaging_deadline = Gauge(
            "swarmtune_averaging_deadline_seconds", "Current all-reduce deadline (from measured link throughput and adapter size).",
            registry=r,
        )
        self.averaging_failures = Counter(
            "swarmtune_averaging_failures", "Averaging steps that failed or timed out.", registry=r
        )
        self.state_syncs = Counter(
            "swarmtune_state_syncs", "Adapter state downloads from peers (late join, falling behind).", registry=r
        )
        self.splits = Counter(
            "swarmtune_swarm_splits", "Times peers at this node's round held another adapter (split detected and healed).", registry=r
        )
        self.ledger_records = Counter("swarmtune_ledger_records", "Contribution records written.", registry=r)
        self.bytes_sent = Counter("swarmtune_network_sent_bytes", "Bytes sent to peers.", registry=r)
        self.bytes_received = Counter("swarmtune_network_received_bytes", "Bytes received from peers.", registry=r)
        self.rss_bytes = Gauge("swarmtune_rss_bytes", "Resident memory of the daemon.", registry=r)
        self.gpu_memory_bytes = Gauge("swarmtune_gpu_memory_bytes", "Allocated CUDA memory.", registry=r)
        self.stalled = Gauge(
            "swarmtune_stalled", "1 when no round ended for stall_factor x the last round's time (`swarmtune status` says why).",
            registry=r,
        )
        self.state = Enum("swarmtune_state", "Node state.", states=list(NODE_STATES), registry=r)
        self.reachability = Enum("swarmtune_reachability", "Whether peers can dial this node (dial-back at start): "
                                 "public, relayed or outbound-only.", states=["public", "relayed", "outbound-only"],
                                 registry=r)
        self.info = Info("swarmtune_node", "Identity of this node.", registry=r)
        self.info.info({"version": __version__, "swarm_id": "", "peer_id": ""})

    def set_identity(self, swarm_id: str, peer_id: str) -> None:
        self.info.info({"version": __version__, "swarm_id": swarm_id, "peer_id": peer_id})

    def set_state(self, state: str) -> None:
        self.state.state(state)

    def set_reachability(self, kind: str) -> None:
        self.reachability.state(kind)

    def on_round(
        self,
        round: int,
        loss: float | None,
        samples: int,
        tokens: int,
        duration_s: float | None = None,
        peers: int | None = None,
        samples_per_s: float | None = None,
        tokens_per_s: float | None = None,
    ) -> None:
        """One finished local round: its samples/tokens are added to the totals.

        Throughput is taken from `samples_per_s`/`tokens_per_s` when given, else
        derived from `duration_s`. A `loss` of None (no local batch this round)
        leaves the loss gauge as it was.
        """
        self.round.set(round)
        if loss is not None:
            self.loss.set(loss)
        self.samples.inc(samples)
        self.tokens.inc(tokens)
        if duration_s is not None:
            self.round_seconds.set(duration_s)
            if duration_s > 0:
                samples_per_s = samples / duration_s if samples_per_s is None else samples_per_s
                tokens_per_s = tokens / duration_s if tokens_per_s is None else tokens_per_s
        if samples_per_s is not None:
            self.samples_per_s.set(samples_per_s)
        if tokens_per_s is not None:
            self.tokens_per_s.set(tokens_per_s)
        if peers is not None:
            self.peers.set(peers)

    def on_averaging(self, seconds: float, ok: bool = True, deadline: float | None = None) -> None:
        self.averaging_seconds.observe(seconds)
        if deadline is not None:
            self.averaging_deadline.set(deadline)
        if not ok:
            self.averaging_failures.inc()

    def on_state_sync(self) -> None:
        self.state_syncs.inc()

    def on_split(self) -> None:
        self.splits.inc()

    def on_record(self) -> None:
        self.ledger_records.inc()

    def on_network(self, sent_bytes: int = 0, received_bytes: int = 0) -> None:
        """Add bytes moved since the last call (increments, not totals)."""
        self.bytes_sent.inc(sent_bytes)
        self.bytes_received.inc(received_bytes)

    def set_peers(self, peers: int) -> None:
        self.peers.set(peers)

    def set_missing_peers(self, count: int) -> None:
        self.missing_peers.set(count)

    def set_shards(self, count: int) -> None:
        self.shards.set(count)

    def watch_memory(self, read) -> None:
        """Read memory at every scrape: `read()` -> (rss, peak rss, gpu bytes)."""
        self.rss_bytes.set_function(lambda: read()[0])
        self.gpu_memory_bytes.set_function(lambda: read()[2])

    def watch_stall(self, stalled) -> None:
        """Read at every scrape: `stalled()` -> bool."""
        self.stalled.set_function(lambda: 1.0 if stalled() else 0.0)

    def set_memory(self, rss_bytes: int, gpu_memory_bytes: int = 0) -> None:
        self.rss_bytes.set(rss_bytes)
        self.gpu_memory_bytes.set(gpu_memory_bytes)


@dataclass
class MetricsServer:
    """A running `/metrics` HTTP endpoint; `port` is the bound one (useful with port=0)."""

    host: str
    port: int
    _server: object
    _thread: threading.Thread

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 9400) -> MetricsServer:
    """Serve `registry` at http://host:port/metrics from a daemon thread; port=0 picks a free port."""
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise OSError(
            f"cannot serve metrics on {host}:{port}: {e.strerror or e}; "
            "choose another metrics port or stop the process that holds it"
        ) from e
    return MetricsServer(host=host, port=server.server_address[1], _server=server, _thread=thread)
