"""The node daemon: the composition root. It wires the modules together and sequences them.

    swarmtune run --manifest swarm.toml [--initial-peers /ip4/.../p2p/12D3KooW...]

`Node.prepare()` checks everything that can be wrong with the input *before* anything is
written or the network is joined (node.stack: manifest, key, base fingerprint, data digest,
shards). `Node.start()` joins the swarm, then opens the ledger, the newest checkpoint, the
control socket and the metrics. `Node.run()` trains round after round:

    split guard (train / wait / resync)  ->  round (node.rounds: my slice, exact sums, step, record)
      -> resync after a failed round (node.statesync) -> untrained shards refreshed
      -> state published for late joiners -> checkpoint -> heartbeat -> status snapshot

SIGTERM/SIGINT (or `swarmtune stop`) drains: the current round finishes, a checkpoint is
written, the ledger is flushed, and the process exits 0. A restart resumes from the newest
good checkpoint and the ledger head, and catches up from peers if the swarm moved on.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import threading
import time

from node import checkpoint, spotcheck
from node.config import NodeConfig
from node.durable import StorageError, is_storage_error, repair_lines, storage_problem
from node.identity import IdentityError, load_identity, lock_identity, new_identity, save_identity
from node.ledger import Ledger, LedgerError
from node.receipts import ReceiptBook
from node.republish import for_node as republisher_for
from node.rotation import RotationError, plan_ledger, retire_ledger
from node.rounds import RoundResult, RoundRunner
from node.splitguard import LeftBehind, SplitGuard
from node.stack import StackError, load_stack
from node.statesync import StateSync, SyncError
from node.status import CreditCache, NodeControlView, StallWatch, StatusBoard, memory_bytes
from node.swarm import quorum
from node.swarm.dht import remove_stale_sockets, stop_children
from node.swarm.swarm import Swarm, record_ttl_s, start_network
from node.swarm.traffic import Traffic

logger = logging.getLogger("swarmtune.node")
LOG_RESERVE = 1 << 20  # bytes kept free for the ledger and rounds.jsonl (~1.5 KB a round)


class NodeError(RuntimeError):
    """Input or environment that stops the node before it joins; the message says what to fix."""


class Node:
    def __init__(self, cfg: NodeConfig, stop: threading.Event | None = None):
        self.cfg = cfg
        self.started_at = time.time()
        self._drain = stop if stop is not None else threading.Event()  # a stop asked before the node existed counts
        self._paused = threading.Event()
        self._record_cv = threading.Condition()
        self.metrics = None
        self.board = StatusBoard(on_change=self._feed_metrics)
        self.swarm = self._dht = self.ledger = self.control = self._metrics_server = self.credit = None
        self._dashboard = self._live_line = self.republisher = None
        self.round = 0
        self.traffic = Traffic()  # bytes on this node's p2pd sockets
        self._prev_hashes: dict[int, str] = {}  # trained shards' hashes at the start of the previous round
        self._probed_at = float("-inf")
        self.reach = None  # node.swarm.reach.Reachability, detected when the node joins
        self._alone_since: float | None = None  # outbound-only, and no peer that can be dialled in sight
        self._key_lock = None
        self.storage_failed = False  # a write was refused (disk full, read-only): no final checkpoint
        self._checkpoints = checkpoint.Writer()

    # ------------------------------------------------------------------ prepare (no side effects on failure)

    def prepare(self) -> None:
        cfg = self.cfg
        self._new_key = not cfg.key_path.exists() and cfg.create_key
        try:
            # a new key is made in memory and written in start() once the swarm accepted us: bad input writes nothing
            self.identity = new_identity() if self._new_key else load_identity(cfg.key_path)
            self._key_lock = lock_identity(self.identity, cfg.home_dir)  # one running node per key on this machine
            stack = load_stack(cfg, load_data=True)
        except (IdentityError, StackError) as e:
            self.release_key()
            raise NodeError(str(e)) from None
        self.stack = stack
        self.manifest, self.adapter, self.trainer, self.trained = stack.manifest, stack.adapter, stack.trainer, stack.trained
        self.swarm_id, self.workdir, self.peer_id = stack.manifest.swarm_id, stack.workdir, self.identity.peer_id
        try:  # the swarm's ledger is another key's: only a rotation to this key continues it (node/rotation.py)
            self._ledger_plan = plan_ledger(self.workdir, self.peer_id, cfg.key_path)
        except RotationError as e:
            self.release_key()
            raise NodeError(str(e)) from None
        # a read-only or too small home is refused now, not at the first checkpoint
        tensors = checkpoint.training_tensors(self.trainer, self.adapter, self.trained)
        later = checkpoint.later_bytes(stack.manifest, self.adapter, self.trained, tensors)
        need = checkpoint.space_needed(self.workdir / "checkpoints", tensors, later=later) + LOG_RESERVE
        problem = storage_problem(cfg.home_dir, need, "the checkpoints and the ledger")
        if problem:
            self.release_key()
            raise NodeError(problem)

    # ------------------------------------------------------------------ start (side effects begin)

    def start(self) -> None:
        # SIGINT/SIGTERM stay blocked while the children (DHT process, p2pd, averagers) are created, so they
        # inherit the block: a Ctrl-C reaches the whole process group, and a child that died first would
        # leave the drain hanging. This process gets the signal once unblocked (nothing is lost), drains,
        # and stops the children in order.
        saved = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            self._start()
        finally:
            self.install_signals()  # hivemind's averagers reset SIGINT in this process; ours again
            signal.pthread_sigmask(signal.SIG_SETMASK, saved)

    def _start(self) -> None:
        cfg, m = self.cfg, self.manifest
        # 1. join the DHT and check the swarm agrees with us; 2. only then write anything
        self._dht, self.reach = start_network(self.identity, m, initial_peers=cfg.initial_peers, host_maddrs=cfg.host_maddrs,
                                  announce_maddrs=cfg.announce_maddrs)
        if self._new_key:
            self.identity = save_identity(self.identity, cfg.key_path)
            logger.info("created identity key %s (back it up: it holds your credit)", cfg.key_path)
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            if self._ledger_plan is not None:  # a rotated key: the old key's ledger is kept as ledger-<old peer id>.jsonl
                retire_ledger(self._ledger_plan)
            self.ledger = Ledger.open(self.workdir / "ledger.jsonl")
        except (LedgerError, RotationError) as e:
            raise NodeError(str(e)) from None
        if self.ledger.torn is not None:
            logger.warning("ledger: recovered from a torn last entry (%s); that entry is not credited", self.ledger.torn.reason)
        ckpt = checkpoint.load_latest(self.workdir / "checkpoints", self.swarm_id)
        if ckpt is not None:
            checkpoint.restore_training(ckpt, self.trainer, self.adapter, self.trained)
            self.round = ckpt.round
            logger.info("resumed from checkpoint %s (round %d)", ckpt.path.name, ckpt.round)

        layouts = [[p.numel() for p in self.adapter.shard_params(k)] for k in range(self.adapter.num_shards)]
        self.swarm = swarm = Swarm(
            self._dht, swarm_id=self.swarm_id, shard_layouts=layouts, trained_shards=self.trained,
            matchmaking_time=m.averaging.matchmaking_time, allreduce_timeout=m.averaging.timeout,
            peer_ttl=m.averaging.peer_ttl, wire=m.sync.wire, clip=m.sync.clip, trim=m.sync.reducer_trim, initial_peers=cfg.initial_peers,
            reach=self.reach, spot_check_rate=self._spot_check_rate(),
        )
        # this node's records and rotation statements are stored again before the DHT forgets them
        self.republisher = republisher_for(swarm, self.workdir, self.ledger, ttl_s=record_ttl_s())
        self.republisher.start()  # on its own thread: a long round must not outlast a record's half-life
        if swarm.peer_id != self.peer_id:
            logger.warning("p2p peer id %s differs from the identity key's %s", swarm.peer_id, self.peer_id)
        maddrs = swarm.visible_maddrs()
        logger.info("swarm %s… peer %s", self.swarm_id[:16], self.peer_id)
        if self.reach.dialable:
            join = "To join this swarm, start other nodes with:\n  --initial-peers " + " ".join(maddrs)
        else:
            join = (f"This node is {self.reach.kind}: peers cannot dial it, so newcomers must use a public node's address "
                    "as --initial-peers.")
        if cfg.log_format == "json":  # every line JSON
            logger.info(join.replace("\n ", ""), extra={"maddrs": maddrs})
        else:
            print(join, flush=True)
        self._write_status_file(maddrs)

        set_state = self._set_state
        self.statesync = StateSync(swarm=swarm, trainer=self.trainer, adapter=self.adapter, trained=self.trained,
                                   swarm_id=self.swarm_id, peer_id=self.peer_id, matchmaking_time=m.averaging.matchmaking_time,
                                   stop=self._drain, on_synced=self._on_synced, set_state=set_state)
        if cfg.metrics_port:
            from node.metrics import NodeMetrics, start_metrics_server

            self.metrics = NodeMetrics()
            self.metrics.set_identity(self.swarm_id, self.peer_id)
            self.metrics.set_shards(len(self.trained))
            self.metrics.set_reachability(self.reach.kind)
            self.metrics.watch_memory(memory_bytes)
            self._feed_metrics(self.board.snapshot())
            self._metrics_server = start_metrics_server(self.metrics.registry, port=cfg.metrics_port)
        self.guard = SplitGuard(swarm=swarm, statesync=self.statesync, peer_id=self.peer_id, on_split=m.averaging.on_split,
                                peer_ttl=m.averaging.peer_ttl, stop=self._drain, metrics=self.metrics, set_state=set_state,
                                last_round=m.rounds.max_rounds)
        self.receipts = ReceiptBook(self.workdir / "receipts.jsonl", swarm=swarm, swarm_id=self.swarm_id,
                                    private_key=self.identity.private_key, rate=self._spot_check_rate(),
                                    tolerance=m.credit.spot_check_tolerance, exclude_after=m.credit.exclude_after)
        self.rounds = RoundRunner(manifest=m, swarm=swarm, trainer=self.trainer, adapter=self.adapter, trained=self.trained,
                                  examples=self.stack.examples, data_digest=self.stack.data_digest, peer_id=self.peer_id,
                                  ledger=self.ledger, private_key=self.identity.private_key, on_record=self._on_record,
                                  receipts=self.receipts)
        self.credit = CreditCache(ledger=self.ledger, read_dht_bucket=swarm.read_record_bucket, swarm_id=self.swarm_id,
                                  max_samples_per_round=m.credit_cap, max_tokens_per_sample=m.token_cap,
                                  read_dht_rounds=swarm.read_rounds,
                                  exclude_after=m.credit.exclude_after,
                                  evidence_files=[self.workdir / "receipts.jsonl", self.workdir / "rotations.jsonl",
                                                  *sorted(self.workdir.glob("ledger-*.jsonl"))])  # retired keys' ledgers
        self.board.update(round=self.round, adapter_hash=self.adapter.state_hash(), coverage=self._coverage({}))
        from node.control import ControlServer

        view = NodeControlView(board=self.board, ledger=self.ledger, record_cv=self._record_cv, credit=self.credit,
                               swarm_id=self.swarm_id, peer_id=self.peer_id, trained=self.trained, plan=self.adapter.plan,
                               peer_ttl=m.averaging.peer_ttl, listen_maddrs=maddrs, started_at=self.started_at,
                               heartbeat_age=swarm.heartbeat_age, reach=self.reach,
                               commands={"pause": self._paused.set, "resume": self._paused.clear, "drain": self.request_drain},
                               stall=StallWatch(factor=cfg.stall_factor, min_s=cfg.stall_min_s))
        self.control = ControlServer(cfg.socket_path, view)
        self.control.start()
        self._start_operator_views(view)

    def _start_operator_views(self, view) -> None:
        """What a person watches: stall in the metrics, the web dashboard, the live line on a terminal."""
        from node.console import start_live_line

        if self.metrics:
            self.metrics.watch_stall(lambda: bool(view.stall_reason()))
        if self.cfg.dashboard_port:
            from node.dashboard import start_dashboard

            try:
                self._dashboard = start_dashboard(view, progress=self.workdir / "rounds.jsonl", port=self.cfg.dashboard_port)
            except OSError as e:
                raise NodeError(str(e)) from None
            logger.info("dashboard: %s", self._dashboard.url)
        self._live_line = start_live_line(view, json_logs=self.cfg.log_format == "json",
                                          last_round=self.manifest.rounds.max_rounds)

    def _write_status_file(self, maddrs) -> None:
        info = {"peer_id": self.peer_id, "swarm_id": self.swarm_id, "maddrs": maddrs, "pid": os.getpid(),
                "reachability": self.reach.kind}
        tmp = self.workdir / "node.json.tmp"
        tmp.write_text(json.dumps(info))
        os.replace(tmp, self.workdir / "node.json")

    # ------------------------------------------------------------------ hooks the parts call

    def _set_state(self, state: str) -> None:
        if self.board.snapshot().state != state:
            self.board.update(state=state)

    def _feed_metrics(self, snap) -> None:
        if self.metrics:
            self.metrics.set_state(snap.state)

    def _on_synced(self) -> None:
        if self.metrics:
            self.metrics.on_state_sync()

    def _on_record(self) -> None:
        with self._record_cv:
            self._record_cv.notify_all()
        if self.metrics:
            self.metrics.on_record()
        if self.credit:
            self.credit.refresh_soon()

    def save_checkpoint(self, background: bool = False) -> None:
        """A checkpoint of this round; `background`: written beside the next round (checkpoint.Writer), a failed
        write raised by the next one or by the end of the run."""
        args = dict(round=self.round, opt_step=self.trainer.opt_step, ledger_seq=self.ledger.next_seq - 1,
                    swarm_id=self.swarm_id, tensors=checkpoint.training_tensors(self.trainer, self.adapter, self.trained),
                    shard_steps={k: self.trainer.shard_step(k) for k in self.trained})
        if background:
            self._checkpoints.submit(self.workdir / "checkpoints", **args)
            return
        self._checkpoints.wait()
        checkpoint.save(self.workdir / "checkpoints", **args)

    # ------------------------------------------------------------------ main loop

    def install_signals(self) -> None:
        def handler(signum, _frame):
            logger.info("received %s: draining (finishing the current round, then checkpoint and exit)", signal.Signals(signum).name)
            self.request_drain()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)  # hivemind's averagers set SIGINT to ignored; Ctrl-C must drain

    def request_drain(self) -> None:
        self._drain.set()
        if self.board.snapshot().state not in ("stopped",):
            self._set_state("draining")

    def _should_stop(self, trained_here: int) -> bool:
        """The swarm's last round (manifest max_rounds) is done, or this run trained --max-rounds rounds."""
        last = self.manifest.rounds.max_rounds
        if last and self.round >= last:
            logger.info("reached round %d, the swarm's last: stopping", self.round)
            self._serve_last_round(last)
            return True
        if self.cfg.max_rounds and trained_here >= self.cfg.max_rounds:
            logger.info("trained %d rounds in this run (--max-rounds): stopping at round %d", trained_here, self.round)
            return True
        return False

    def run(self) -> int:
        self.install_signals()
        swarm, sync = self.swarm, self.statesync
        if self.cfg.min_peers > 1:
            swarm.announce(round=self.round, shards=list(self.trained))
            peers = swarm.wait_for_peers(self.cfg.min_peers, self.cfg.peer_wait)
            if len(peers) < self.cfg.min_peers:
                logger.warning("only %d of %d peers visible after %.0f s; starting anyway", len(peers), self.cfg.min_peers, self.cfg.peer_wait)
        self._probe_link()
        try:
            self.round = sync.catch_up(self.round)
        except SyncError as e:
            raise NodeError(str(e)) from None
        swarm.announce(round=self.round, shards=list(self.trained), hashes=sync.publish(self.round))
        untrained = [k for k in range(self.adapter.num_shards) if k not in self.trained]
        repair_lines(self.workdir / "rounds.jsonl")  # a full disk may have cut its last line
        with open(self.workdir / "rounds.jsonl", "a", buffering=1) as progress:
            trained_here = 0
            while not self._drain.is_set() and not self._should_stop(trained_here):
                if self._paused.is_set():
                    self._set_state("paused")
                    time.sleep(0.2)
                    continue
                if not self._dialable_peer_in_sight():
                    continue
                self._set_state("training")
                if swarm.deadline.throughput is None and time.monotonic() - self._probed_at > 60:
                    self._probe_link()
                my_hashes = {k: self.adapter.shard_hash(k) for k in self.trained}
                try:
                    proceed, self.round = self.guard.before_round(self.round, my_hashes, self._prev_hashes)
                except LeftBehind as e:  # never sum the swarm's last rounds again, alone or with others as late
                    raise NodeError(str(e)) from None
                if not proceed:
                    continue
                view = swarm.last_view()  # the one the split guard just read
                # groupmates' receipts and checks of the rounds before the last one: they store them in the background
                # as their next round starts (node/swarm/stores.py), so one round of slack
                self.receipts.collect(self.round - 1)
                res = self.rounds.run(self.round, view)
                self._prev_hashes = res.shard_hashes
                if res.applied:
                    self.round += 1
                    trained_here += 1
                    if res.resync:  # some shards' sums did not come back here; their groups may have applied them
                        # after the swarm's last round no later round heals a stale shard, and the peers that hold
                        # its state stop soon: keep trying then (seen: a diloco node ending with another adapter)
                        last = self.round >= self.manifest.rounds.max_rounds
                        # when every trainer lost those sums (a groupmate killed mid all-reduce) all hold the round's
                        # start: a resync would only announce "syncing", and the groupmates that start the next round
                        # first would leave this node out of it (seen: a 3-node diloco swarm split after a kill); a
                        # heartbeat that comes later is caught by the next round's group check
                        lost = {k: self.adapter.shard_hash(k) for k in res.resync}
                        if last or quorum.applied_elsewhere(quorum.others(swarm.view(), self.peer_id), self.round, lost):
                            got = sync.resync(self.round - 1, required=last)
                            self.round = self.round if got is None else got
                        else:
                            logger.info("shard(s) %s: no peer holds another state of them at round %d; keeping ours",
                                        res.resync, self.round)
                else:
                    got = sync.resync(self.round, required=False)
                    self.round = self.round if got is None else got
                # publish and announce first: nodes that do not train our shards wait for exactly this state
                published = sync.publish(self.round)
                swarm.announce(round=self.round, shards=list(self.trained), sps=res.samples / max(res.seconds, 1e-9),
                               hashes=published, **({} if untrained else {"complete": self.round}))
                if untrained and not sync.refresh_untrained(untrained, self.round, timeout=self._refresh_timeout(untrained)):
                    swarm.announce(complete=self.round)  # every shard is at this round: its trainers may stop now
                if self.cfg.checkpoint_every and self.round % self.cfg.checkpoint_every == 0 and res.applied:
                    self.save_checkpoint(background=True)
                self._after_round(res, view, progress)
        self._checkpoints.wait()  # a failed write stops the node here as any refused write does
        if not self.storage_failed:
            # the groupmates' receipts of the last rounds; a drain (SIGTERM) does not wait on a cut link for them
            self.receipts.collect(self.round, budget_s=5.0 if self._drain.is_set() else 30.0)
        self._set_state("stopped")
        return 0

    def _spot_check_rate(self) -> float:
        """Per shard group: a node that trains every shard is checked with [credit] spot_check_rate per round."""
        m = self.manifest
        if not spotcheck.applies(m):  # not recomputable (node/spotcheck.py)
            return 0.0
        # in parts per million, as receipts carry it: the round's draw and a verifier's are the same draw
        return round(spotcheck.group_rate(m.credit.spot_check_rate, self.adapter.num_shards) * 1_000_000) / 1_000_000

    def _dialable_peer_in_sight(self) -> bool:
        """An outbound-only node can average only through a peer that can be dialled (one that holds the parts).
        With none in sight it would train alone in silence: it says so, plainly and every 30 s, and waits."""
        if self.reach.dialable:
            return True
        view = self.swarm.view()
        if quorum.dialable_peers(view, self.peer_id):
            if self._alone_since is not None:
                logger.info("a peer that can be dialled is back; training with the swarm again")
                self._alone_since = None
            return True
        now = time.monotonic()
        if self._alone_since is None or now - self._alone_since >= 30:
            others = len(quorum.others(view, self.peer_id))
            logger.warning("no node in this swarm can be dialled (%d other peer(s) visible, none of them dialable): nobody "
                           "can hold the all-reduce, so this node is not training. Fix: %s; or start one node on a "
                           "machine with a public address", others, self.reach.forward_fix())
            self._alone_since = now
        self._set_state("paused")  # the split guard's "wait" shows the same: not training, by no choice of the user
        self._drain.wait(1.0)
        return False

    def _serve_last_round(self, last: int) -> None:
        """At the swarm's end, stay (serving our shards' state) until every peer that needs them holds the
        whole adapter at the last round: a node that trains only some shards refreshes the others from
        their trainers after the last round, and would otherwise export stale ones; and until every
        groupmate finished the last round (a node that exits the moment its own sums are in cuts the
        replies its reducer still streams to slower members). Bounded by the refresh time; a peer that
        never says so is not waited for beyond it."""
        deadline = time.monotonic() + self._refresh_timeout(range(self.adapter.num_shards))
        while not self._drain.is_set() and time.monotonic() < deadline:
            # peers that lack some of our shards and have not said they hold the whole last-round adapter, and
            # groupmates still in the last round (our reducer's replies to them must not die with our p2pd)
            waiting = [p for p, i in quorum.others(self.swarm.view(), self.peer_id).items() if i.round >= last - 1 and (
                       (set(self.trained) - set(i.shards) and i.complete < last) or (set(self.trained) & set(i.shards) and i.round < last))]
            if not waiting:
                return
            time.sleep(0.2)
        logger.info("stopping without every peer confirming the last round's adapter")

    def _refresh_timeout(self, shards) -> float:
        """How long to wait for untrained shards' state: the trainers' round end (about one matchmaking
        window apart from ours) plus the downloads at the measured link speed."""
        return 2 * self.manifest.averaging.matchmaking_time + 2.0 + sum(self.swarm.download_timeout(k) for k in shards)

    def _probe_link(self) -> None:
        """Measure the link to one peer before averaging with it, so that the first all-reduce gets a
        deadline that fits the link (a too-short deadline cancels the transfer halfway)."""
        self._probed_at = time.monotonic()
        peers = quorum.others(self.swarm.view(), self.peer_id)
        others = [p for p, i in peers.items() if set(i.shards) & set(self.trained)]
        dialable = [p for p in others if peers[p].reach != "outbound-only"]  # a probe stream needs a peer we can dial
        if not dialable:
            return
        peer = random.choice(dialable)
        rate = self.swarm.measure_link(peer)
        if rate:
            planned = self.swarm.allreduce_bytes({k: len(others) + 1 for k in self.trained})
            logger.info("link to %s…: %.1f Mbit/s measured; averaging deadline %.1f s for %.1f MB each way",
                        peer[:16], rate * 8 / 1e6, self.swarm.deadline.seconds_for(planned), planned / 1e6)

    def _coverage(self, view) -> dict[int, int]:
        return quorum.coverage(view, self.peer_id, self.trained, self.adapter.num_shards)

    def _after_round(self, res: RoundResult, view, progress) -> None:
        coverage = self._coverage(view)
        uncovered = [k for k, n in coverage.items() if n == 0]
        if uncovered and self.round % 10 == 1:
            logger.warning("shard(s) %s have no trainer in the swarm: their LoRA weights stay at their initial values. "
                           "Ask a node with spare memory to run with --shards %s", uncovered, ",".join(map(str, uncovered)))
        deadline = self.swarm.deadline
        sent, received = self.traffic.sample()
        hashes = {k: self.adapter.shard_hash(k) for k in range(self.adapter.num_shards)}
        entry = {
            "round": res.round, "next_round": self.round, "start_hash": res.start_hash, "loss": res.loss, "local_loss": res.local_loss,
            "samples": res.samples, "tokens": res.tokens, "groups": {str(k): v for k, v in res.groups.items()},
            "applied": res.applied, "resync": res.resync, "hash": self.adapter.state_hash(hashes),
            "shard_hashes": {str(k): h for k, h in hashes.items()},
            "coverage": {str(k): v for k, v in coverage.items()}, "seconds": round(res.seconds, 4), "compute_s": round(res.compute_seconds, 4),
            "averaging_s": round(res.averaging_seconds, 4), "peers": len(view), "time": time.time(),
            "deadline_s": round(self.swarm.allreduce_timeout, 2),
            "link_mbit": round(deadline.throughput * 8 / 1e6, 2) if deadline.throughput else None,
            "sent_bytes": sent, "received_bytes": received, "clipped": res.clipped, "receipt_bytes": self.receipts.take_signed_bytes(),
            "spot_checks": [{"target": o.target, "shard": o.shard, "error": round(o.error, 6) if o.error != float("inf")
                             else None, "failed": o.failed, "exact": o.exact, "seconds": round(o.seconds, 4)} for o in res.checks],
        }
        progress.write(json.dumps(entry) + "\n")
        before = self.board.snapshot()
        snap = self.board.update(
            round=self.round, loss=res.loss, last_round_s=res.seconds, last_round_at=time.time(),
            samples_total=before.samples_total + res.samples, tokens_total=before.tokens_total + res.tokens,
            samples_per_s=res.samples / max(res.seconds, 1e-9), tokens_per_s=res.tokens / max(res.seconds, 1e-9),
            adapter_hash=entry["hash"], peers=dict(view), coverage=coverage,
        )
        if self.metrics:
            self.metrics.on_round(round=self.round, loss=res.loss, samples=res.samples, tokens=res.tokens,
                                  samples_per_s=snap.samples_per_s, tokens_per_s=snap.tokens_per_s, duration_s=res.seconds,
                                  peers=max(0, len(view) - 1))
            self.metrics.on_averaging(res.averaging_seconds, ok=not res.resync, deadline=self.swarm.allreduce_timeout)
            self.metrics.on_network(sent_bytes=sent, received_bytes=received)
        loss = f"{res.loss:.4f}" if res.loss is not None else "-"
        logger.info(
            "round %d: loss %s, %d samples, groups %s, %.2fs (compute %.2fs, averaging %.2fs)%s",
            res.round, loss, res.samples, res.groups or "-", res.seconds, res.compute_seconds, res.averaging_seconds,
            f", resync {res.resync}" if res.resync else "",
        )

    def shutdown(self) -> None:
        """Checkpoint, flush the ledger, leave the swarm. Safe to call after a partial start."""
        self._set_state("stopped")
        if self.ledger is not None and self.swarm is not None and not self.storage_failed:
            try:
                self.save_checkpoint()
            except (OSError, RuntimeError) as e:  # disk full or read-only; the previous checkpoint stays good
                logger.error("final checkpoint failed: %s", e)
        else:
            try:  # the write in flight ends (or removes its temp file) before the process does
                self._checkpoints.wait()
            except (OSError, RuntimeError):
                pass
        if self.credit is not None:
            self.credit.stop()
        if self.control is not None:
            self.control.stop(0.5)
        if self._metrics_server is not None:
            self._metrics_server.stop()
        for view in (self._live_line, self._dashboard):
            if view is not None:
                view.stop()
        if self.republisher is not None:
            self.republisher.stop()
        if self.swarm is not None:
            self.swarm.shutdown()
        elif self._dht is not None:
            self._dht.shutdown()
        if self.ledger is not None:
            self.ledger.close()
        stop_children(timeout=5.0)
        remove_stale_sockets()
        self.release_key()

    def release_key(self) -> None:
        if self._key_lock is not None:
            self._key_lock.release()


def run_node(cfg: NodeConfig, export_dir: str | None = None, stop: threading.Event | None = None) -> int:
    """Entry point of `swarmtune run`: prepare (validate), start, train, drain, optionally export."""
    node = Node(cfg, stop=stop)
    node.install_signals()  # a SIGTERM while the model loads stops the node before it joins
    node.prepare()
    try:
        if node._drain.is_set():
            return 0
        node.start()
        code = node.run()
        if export_dir:
            from node.export import export_peft

            export_peft(node.stack.model, export_dir, base_name=node.manifest.base.model)
            logger.info("exported the adapter to %s", export_dir)
        return code
    except (StorageError, OSError) as e:
        if not is_storage_error(e):
            raise
        node.storage_failed = True
        raise NodeError(_storage_stop(node, e)) from None
    finally:
        node.shutdown()


def _storage_stop(node: Node, e: BaseException) -> str:
    """The message of a node stopped by a full or read-only disk: the cause, what is safe, how to resume."""
    cause = str(e) if isinstance(e, StorageError) else f"cannot write {e.filename or 'a file'}: {e.strerror}; free space there"
    ckpt = sorted((node.workdir / "checkpoints").glob("round-*.safetensors"))
    kept = f"the last good checkpoint is {ckpt[-1]}" if ckpt else "no checkpoint was written yet"
    seq = node.ledger.next_seq - 1 if node.ledger is not None else -1
    return (f"stopped: {cause}. Nothing half-written was kept: the ledger is valid up to seq {seq}, {kept}. "
            "Run the same command again once there is space: the node resumes from that checkpoint")
