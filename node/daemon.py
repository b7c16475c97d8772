"""The node daemon: the composition root that wires every module together.

    swarmtune run --manifest swarm.toml [--initial-peers /ip4/.../p2p/12D3KooW...]

`Node.prepare()` checks everything that can be wrong with the input *before* anything is
written or the network is joined (manifest, key, base fingerprint, data digest, shards).
`Node.run()` then joins the swarm and trains round after round:

    peers (DHT) -> my slice of the round's global batch -> local fwd/bwd (trainer)
      -> exact per-shard gradient sum with the shard's trainers (swarm)
      -> the same AdamW step on every trainer -> ledger record (signed, appended, published)
      -> state published for late joiners -> checkpoint -> untrained shards refreshed

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
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from node import __version__
from node.config import NodeConfig
from node.manifest import Manifest, load_manifest

logger = logging.getLogger("swarmtune.node")

BUILTIN_BASE = "builtin:tiny"
BUILTIN_DATA = "builtin:task"
DISTRUST_S = 600.0  # seconds a donor whose state failed a check is not asked again


class NodeError(RuntimeError):
    """Input or environment that stops the node before it joins; the message says what to fix."""


def builtin_data_path(split: str = "train") -> Path:
    return Path(__file__).parent / "builtin" / f"task_{split}.jsonl"


def resolve_base(spec: str) -> Path:
    from node.model import resolve_model_dir

    if spec == BUILTIN_BASE:
        from node.tiny import build_tiny_base, default_tiny_dir

        return build_tiny_base(default_tiny_dir())
    return resolve_model_dir(spec)


def resolve_data(spec: str) -> str:
    if spec == BUILTIN_DATA:
        return str(builtin_data_path("train"))
    return spec


def parse_shards(spec: str, num_shards: int) -> tuple[int, ...]:
    if spec in ("", "all"):
        return tuple(range(num_shards))
    try:
        shards = tuple(sorted({int(s) for s in spec.split(",") if s.strip()}))
    except ValueError:
        raise NodeError(f"--shards {spec!r}: expected 'all', 'auto' or a comma list of shard indices like 2,3") from None
    bad = [s for s in shards if not 0 <= s < num_shards]
    if bad or not shards:
        raise NodeError(f"--shards {spec!r}: the manifest's shard plan has shards 0..{num_shards - 1}; {bad or 'none given'} not among them")
    return shards


def my_slice(total: int, n: int, rank: int) -> tuple[int, int]:
    """[start, end) of peer `rank`'s share when `total` samples are split among `n` peers."""
    base, extra = divmod(total, n)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@dataclass
class RoundResult:
    round: int
    start_hash: str  # adapter state the round started from
    loss: float | None  # swarm loss of the round (mean token CE over every group member's samples)
    local_loss: float | None
    samples: int
    tokens: int
    groups: dict[int, int]  # shard -> group size (1 = trained alone)
    applied: list[int]  # shards updated this round
    resync: list[int]  # shards that must be downloaded from peers
    seconds: float
    compute_seconds: float
    averaging_seconds: float


@dataclass
class _Live:
    """What the control service and metrics read, updated by the training thread."""

    state: str = "syncing"
    loss: float | None = None
    samples_per_s: float = 0.0
    tokens_per_s: float = 0.0
    last_round_s: float | None = None
    last_round_at: float | None = None
    samples_total: int = 0
    tokens_total: int = 0
    peers: dict = field(default_factory=dict)


class Node:
    def __init__(self, cfg: NodeConfig):
        self.cfg = cfg
        self.started_at = time.time()
        self.live = _Live()
        self._lock = threading.Lock()
        self._record_cv = threading.Condition()
        self._drain = threading.Event()
        self._paused = threading.Event()
        self.swarm = None
        self._dht = None
        self.ledger = None
        self.control = None
        self.metrics = None
        self._metrics_server = None
        self.round = 0
        self._seen: dict[str, float] = {}  # peers seen recently (split detection)
        self._split_noticed = False
        self._waiting_for_split = False
        self._prev_hashes: dict[int, str] = {}  # shard hashes at the start of the previous round
        self._distrusted: dict[str, float] = {}  # donors whose state failed a check -> until when they are skipped
        self._donors: dict[int, str] = {}  # shard -> who sent the state loaded last
        self._probed_at = float("-inf")

    # ------------------------------------------------------------------ prepare (no side effects on failure)

    def prepare(self) -> None:
        """Validate every input and build model, data and trainer; raises NodeError before any write."""
        from node.identity import Identity, IdentityError, load_identity

        cfg = self.cfg
        key_path = cfg.key_path
        self._new_key = False
        try:
            if not key_path.exists() and cfg.create_key:
                # made in memory; written in start() only once the swarm accepted us, so bad input writes nothing
                from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

                self.identity = Identity(Ed25519PrivateKey.generate())
                self._new_key = True
            else:
                self.identity = load_identity(key_path)
        except IdentityError as e:
            raise NodeError(str(e)) from None
        self.prepare_model_only(load_data=True)

    def prepare_model_only(self, load_data: bool = False) -> None:
        from node.data import DataError, dataset_digest, load_examples
        from node.model import Adapter, ModelError, attach_lora, base_fingerprint, check_shard_plan, load_base, num_layers
        from node.trainer import Trainer

        cfg = self.cfg
        if not cfg.manifest:
            raise NodeError("no manifest given; pass --manifest swarm.toml (create one with `swarmtune swarm init`)")
        self.manifest: Manifest = load_manifest(cfg.manifest)
        m = self.manifest
        self.swarm_id = m.swarm_id
        if cfg.threads:
            torch.set_num_threads(cfg.threads)

        base_spec = cfg.base_model or m.resolve_path(m.base.model)
        try:
            self.model_dir = resolve_base(base_spec)
            fingerprint = base_fingerprint(self.model_dir)
        except ModelError as e:
            raise NodeError(str(e)) from None
        if fingerprint != m.base.fingerprint:
            raise NodeError(
                f"base model {self.model_dir} has fingerprint {fingerprint[:16]}…, but manifest {cfg.manifest} expects "
                f"{m.base.fingerprint[:16]}…: it is a different model or revision. Use the exact base the manifest names "
                "(--base-model PATH), or join a swarm whose manifest matches your model"
            )

        data_spec = resolve_data(cfg.data or m.resolve_path(m.data.source))
        try:
            digest = dataset_digest(data_spec) if load_data else m.data.digest
        except DataError as e:
            raise NodeError(str(e)) from None
        if digest != m.data.digest:
            raise NodeError(
                f"dataset {data_spec} has digest {digest[:16]}…, but the manifest expects {m.data.digest[:16]}…: "
                "every peer must train on the same data; get the manifest's dataset (--data PATH)"
            )
        self.data_digest = digest

        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        try:
            self.examples = load_examples(data_spec, self.tokenizer, max_length=m.data.max_length, packing=m.data.packing) if load_data else []
        except DataError as e:
            raise NodeError(str(e)) from None

        self.device = self._pick_device()
        try:
            base = load_base(self.model_dir, dtype=m.base.dtype, quantization=m.base.quantization, device=self.device)
            plan = check_shard_plan(m.shards.plan, num_layers(base))
            self.model = attach_lora(
                base, rank=m.lora.rank, alpha=m.lora.alpha, dropout=m.lora.dropout, target_modules=m.lora.target_modules,
                init_seed=m.lora.init_seed, gradient_checkpointing=cfg.gradient_checkpointing,
            )
            self.adapter = Adapter.from_model(self.model, plan)
        except ModelError as e:
            raise NodeError(str(e)) from None
        if cfg.shards == "auto":
            from node.shards import ShardChoiceError, choose_shards_auto

            try:
                self.trained = choose_shards_auto(self.model, self.adapter, m, cfg, self.device)
            except ShardChoiceError as e:
                raise NodeError(str(e)) from None
            logger.info("--shards auto: training shards %s of %d", list(self.trained), self.adapter.num_shards)
        else:
            self.trained = parse_shards(cfg.shards, self.adapter.num_shards)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.trainer = Trainer(
            self.model, self.adapter, self.trained, m.optim,
            microbatch_size=m.rounds.microbatch_size, device=self.device, pad_id=pad,
        )
        self.workdir = cfg.home_dir / "swarms" / self.swarm_id[:16]

    def _pick_device(self) -> str:
        dev = self.cfg.device
        if dev == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if dev.startswith("cuda") and not torch.cuda.is_available():
            raise NodeError(f"--device {dev}: no CUDA GPU is visible to torch; use --device cpu")
        return dev

    # ------------------------------------------------------------------ start (side effects begin)

    def start(self) -> None:
        m = self.manifest
        # 1. join the DHT (p2pd reads the key from a private temp file) and check the swarm agrees with us.
        # SIGINT/SIGTERM stay blocked while the children (DHT process, p2pd, averagers) are created, so they
        # inherit the block: a Ctrl-C reaches the whole process group, and a child that died first would
        # leave the drain hanging. This process gets the signal once unblocked (nothing is lost), drains,
        # and stops the children in order.
        self._saved_sigmask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            self._start_network(m)
        finally:
            self._install_signals()  # hivemind's averagers reset SIGINT in this process; ours again
            signal.pthread_sigmask(signal.SIG_SETMASK, self._saved_sigmask)

    def _start_network(self, m) -> None:
        from node import checkpoint
        from node.identity import write_libp2p_identity
        from node.ledger import Ledger, LedgerError
        from node.swarm.peer import Swarm, start_dht
        from node.swarm.validator import RecordsValidator

        fd, tmp_key = tempfile.mkstemp(prefix="swarmtune-p2p-", suffix=".key")
        os.close(fd)
        try:
            os.unlink(tmp_key)
            write_libp2p_identity(self.identity, tmp_key)
            self._dht = start_dht(
                initial_peers=self.cfg.initial_peers, host_maddrs=self.cfg.host_maddrs,
                announce_maddrs=self.cfg.announce_maddrs, identity_path=tmp_key,
                record_validators=[RecordsValidator(self.swarm_id)],
            )
        finally:
            if os.path.exists(tmp_key):
                os.unlink(tmp_key)
        check_membership(self._dht, self.manifest, self.cfg.initial_peers)

        # 2. only now write anything: key, ledger, checkpoints
        if self._new_key:
            from node.identity import save_identity

            self.identity = save_identity(self.identity, self.cfg.key_path)
            logger.info("created identity key %s (back it up: it holds your credit)", self.cfg.key_path)
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self.ledger = Ledger.open(self.workdir / "ledger.jsonl")
        except LedgerError as e:
            raise NodeError(str(e)) from None
        if self.ledger.torn is not None:
            logger.warning("ledger: recovered from a torn last entry (%s); that entry is not credited", self.ledger.torn.reason)

        ckpt = checkpoint.load_latest(self.workdir / "checkpoints", self.swarm_id)
        if ckpt is not None:
            self._restore_checkpoint(ckpt)
            logger.info("resumed from checkpoint %s (round %d)", ckpt.path.name, ckpt.round)

        dht = self._dht
        sizes = [self.adapter.shard_numel(k) for k in range(self.adapter.num_shards)]
        self.swarm = Swarm(
            dht, swarm_id=self.swarm_id, shard_sizes=sizes, trained_shards=self.trained,
            matchmaking_time=m.averaging.matchmaking_time, allreduce_timeout=m.averaging.timeout,
            peer_ttl=m.averaging.peer_ttl, initial_peers=self.cfg.initial_peers,
        )
        if self.swarm.peer_id != self.identity.peer_id:
            logger.warning("p2p peer id %s differs from the identity key's %s", self.swarm.peer_id, self.identity.peer_id)
        self.peer_id = self.identity.peer_id
        maddrs = self.swarm.visible_maddrs()
        logger.info("swarm %s… peer %s", self.swarm_id[:16], self.peer_id)
        print("To join this swarm, start other nodes with:\n  --initial-peers " + " ".join(maddrs), flush=True)
        self._write_status_file(maddrs)

        if self.cfg.metrics_port:
            from node.metrics import NodeMetrics, start_metrics_server

            self.metrics = NodeMetrics()
            self.metrics.set_identity(self.swarm_id, self.peer_id)
            self._metrics_server = start_metrics_server(self.metrics.registry, port=self.cfg.metrics_port)
        from node.control import ControlServer

        self.control = ControlServer(self.cfg.socket_path, NodeControlView(self))
        self.control.start()
        from node.swarm.probe import serve_bandwidth_probe

        serve_bandwidth_probe(dht)  # lets `swarmtune doctor` on a newcomer's machine measure bandwidth to us

    def _write_status_file(self, maddrs) -> None:
        info = {"peer_id": self.identity.peer_id, "swarm_id": self.swarm_id, "maddrs": maddrs, "pid": os.getpid()}
        tmp = self.workdir / "node.json.tmp"
        tmp.write_text(json.dumps(info))
        os.replace(tmp, self.workdir / "node.json")

    # ------------------------------------------------------------------ checkpoints

    def _checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for k in range(self.adapter.num_shards):
            names = self.adapter.shard_names(k)
            state = self.trainer.shard_state(k)
            n = len(names)
            for i, name in enumerate(names):
                out[f"param/{name}"] = state[i]
                if k in self.trained:
                    out[f"exp_avg/{name}"] = state[n + i]
                    out[f"exp_avg_sq/{name}"] = state[2 * n + i]
        return out

    def _restore_checkpoint(self, ckpt) -> None:
        for k in range(self.adapter.num_shards):
            names = self.adapter.shard_names(k)
            params = [ckpt.tensors[f"param/{n}"] for n in names]
            if k in self.trained and all(f"exp_avg/{n}" in ckpt.tensors for n in names):
                moments = [ckpt.tensors[f"exp_avg/{n}"] for n in names] + [ckpt.tensors[f"exp_avg_sq/{n}"] for n in names]
                self.trainer.load_shard_state(k, params + moments, ckpt.opt_step)
            else:
                self.adapter.load_shard(k, params)
        self.trainer.opt_step = ckpt.opt_step
        self.round = ckpt.round

    def save_checkpoint(self) -> None:
        from node import checkpoint

        checkpoint.save(
            self.workdir / "checkpoints", round=self.round, opt_step=self.trainer.opt_step,
            ledger_seq=self.ledger.next_seq - 1, swarm_id=self.swarm_id, tensors=self._checkpoint_tensors(),
        )

    # ------------------------------------------------------------------ state sync

    def publish_states(self) -> None:
        for k in self.trained:
            meta = {"round": self.round, "hash": self.adapter.shard_hash(k), "step": self.trainer.opt_step, "swarm": self.swarm_id}
            self.swarm.publish_state(k, meta, self.trainer.shard_state(k))

    def sync_shards(self, shards, *, require_newer: bool) -> dict[int, int]:
        """Download shards from peers; returns {shard: round} of what was loaded."""
        loaded = {}
        for k in shards:
            got = self.swarm.download_state(k, self._donors_for(k), timeout=self.swarm.download_timeout(k))
            if got is None:
                continue
            donor, meta, tensors = got
            try:
                r, h, step, sid = int(meta["round"]), str(meta["hash"]), int(meta["step"]), meta["swarm"]
            except (KeyError, TypeError, ValueError):
                logger.warning("shard %d: peer sent malformed state metadata %r; ignored", k, meta)
                continue
            if sid != self.swarm_id or (require_newer and r < self.round):
                continue
            backup = self.trainer.shard_state(k)
            old_step = self.trainer.opt_step
            try:
                self.trainer.load_shard_state(k, tensors, step)
            except (ValueError, RuntimeError) as e:
                logger.warning("shard %d: peer state does not fit (%s); ignored", k, e)
                continue
            if self.adapter.shard_hash(k) != h:
                logger.warning("shard %d: the state from %s… does not match its advertised hash; discarded, and that peer "
                               "is not asked again for %.0f s", k, donor[:16], DISTRUST_S)
                self._distrust(donor)
                self.trainer.load_shard_state(k, backup, old_step)
                continue
            if k in self.trained:
                self.trainer.opt_step = step
            loaded[k] = r
            self._donors[k] = donor
        return loaded

    def _distrust(self, donor: str) -> None:
        self._distrusted[donor] = time.monotonic() + DISTRUST_S

    def _donors_for(self, k: int) -> list[str]:
        """Who to ask for shard k's state, best first: peers holding the state most peers agree on (the
        largest group of equal (round, hash) claims, later rounds first), then the rest; shuffled within
        each group so that newcomers arriving together spread over donors. Peers whose state failed a
        check recently are left out."""
        now = time.monotonic()
        self._distrusted = {p: t for p, t in self._distrusted.items() if t > now}
        holders = {p: i for p, i in self.swarm.peers().items()
                   if p != self.peer_id and not i.syncing and k in i.shards and p not in self._distrusted}
        votes = Counter((i.round, i.shard_hashes.get(k)) for i in holders.values())
        rank = {claim: n for n, claim in enumerate(sorted(votes, key=lambda c: (votes[c], c[0]), reverse=True))}
        order = list(holders)
        random.shuffle(order)
        order.sort(key=lambda p: rank[(holders[p].round, holders[p].shard_hashes.get(k))])
        return order

    def resync(self, *, required: bool, attempts: int = 20, want_shard_hash: tuple[int, str] | None = None,
               allow_older: bool = False) -> bool:
        """Take the swarm's state for every trained shard, all from one round; True when done.

        A state is taken only when every trained shard came back at the same round, not older
        than ours, and matching its advertised hash. With `required` (a late joiner whose
        peers are ahead) it keeps trying; otherwise one pass.
        """
        self.live.state = "syncing"
        self.swarm.announce(syncing=True)
        try:
            before = self.round
            for attempt in range(attempts if required else 1):
                if self._drain.is_set():
                    return False
                snapshot = {k: (self.trainer.shard_state(k), self.trainer.opt_step) for k in range(self.adapter.num_shards)}
                loaded = self.sync_shards(range(self.adapter.num_shards), require_newer=not allow_older)
                trained = {loaded[k] for k in self.trained if k in loaded}
                consistent = len(trained) == 1 and all(k in loaded for k in self.trained)
                if consistent and not self._vouched(next(iter(trained))):
                    logger.warning("downloaded state (round %d) is not what most peers at that round hold; not trusted, retrying",
                                   next(iter(trained)))
                    consistent = False
                if consistent and (want_shard_hash is None or self.adapter.shard_hash(want_shard_hash[0]) == want_shard_hash[1]):
                    self.round = trained.pop()
                    if self.metrics:
                        self.metrics.on_state_sync()
                    logger.info("synced adapter and optimizer state from peers: round %d, hash %s…", self.round, self.adapter.state_hash()[:12])
                    if want_shard_hash is None and self.round > before:
                        # we were behind, and the peers are already computing this round without us
                        self._join_next_round()
                    return True
                for k in self.trained:  # a mix of rounds is worse than our own consistent state
                    self.trainer.load_shard_state(k, *snapshot[k])
                    self.trainer.opt_step = snapshot[k][1]
                if required:
                    time.sleep(min(0.25 * (attempt + 1), 2.0))
            return False
        finally:
            self.swarm.announce(syncing=False, round=self.round, hashes=self._shard_hashes())

    def _join_next_round(self) -> None:
        """After a download at round R the peers are already computing R, and their group would form
        without us. Announce R+1 instead (so they count us in it), take their R+1 state the moment they
        publish it, and start R+1 with them. If they do not get there in time, train R alone-late."""
        r = self.round
        others = {p: i for p, i in self.swarm.peers().items() if p != self.peer_id and not i.syncing}
        if not others or max(i.round for i in others.values()) != r:
            return
        self.swarm.announce(round=r + 1, syncing=False, hashes={})
        deadline = time.monotonic() + max(10.0, 3 * self.manifest.averaging.matchmaking_time)
        while time.monotonic() < deadline and not self._drain.is_set():
            time.sleep(0.05)
            peers = self.swarm.peers()
            if any(i.round > r and not i.syncing for p, i in peers.items() if p != self.peer_id):
                snapshot = {k: self.trainer.shard_state(k) for k in self.trained}
                step = self.trainer.opt_step
                loaded = self.sync_shards(self.trained, require_newer=True)
                if loaded and set(loaded.values()) == {r + 1} and set(loaded) == set(self.trained) and self._vouched(r + 1):
                    self.round = r + 1
                    logger.info("joined the swarm at round %d", self.round)
                    return
                for k in self.trained:
                    self.trainer.load_shard_state(k, snapshot[k], step)
                self.trainer.opt_step = step
        self.swarm.announce(round=self.round, hashes=self._shard_hashes())

    def _vouched(self, round_: int) -> bool:
        """Whether the state now loaded for our trained shards is what most peers at `round_` advertise,
        and `round_` is not beyond the round most peers are at. One peer lying about its progress or
        serving corrupted state cannot move this node (in swarms of three or more)."""
        others = {p: i for p, i in self.swarm.peers().items() if p != self.peer_id and not i.syncing}
        if round_ > max(swarm_round(others), self.round):
            return False
        at_round = [i for i in others.values() if i.round == round_ and i.shard_hashes]
        if not at_round:
            return True  # nobody advertises that round any more (they moved on); the hash check still held
        for k in self.trained:
            h = self.adapter.shard_hash(k)
            agree = sum(1 for i in at_round if i.shard_hashes.get(k) == h)
            if agree * 2 <= len([i for i in at_round if k in i.shard_hashes]):
                donor = self._donors.get(k)
                if donor:
                    logger.warning("shard %d: the state from %s… is not what most peers at round %d hold; that peer is "
                                   "not asked again for %.0f s", k, donor[:16], round_, DISTRUST_S)
                    self._distrust(donor)
                return False
        return True

    def _shard_hashes(self) -> dict[str, str]:
        return {str(k): self.adapter.shard_hash(k) for k in self.trained}

    def catch_up(self) -> None:
        """Before the first step: if peers are ahead, take their exact state (adapter, optimizer, round)."""
        others = {p: i for p, i in self.swarm.peers().items() if p != self.peer_id and not i.syncing}
        ahead = swarm_round(others)
        if ahead <= self.round:
            return
        if not self.resync(required=True):
            raise NodeError(
                f"peers are at round {ahead} but their state could not be downloaded (tried 20 times); "
                "check connectivity to them (swarmtune doctor) and restart"
            )

    # ------------------------------------------------------------------ one round

    def run_round(self) -> RoundResult:
        from node.data import round_batch_indices
        from node.swarm.peer import MAX_PEER_INT
        from node.trainer import Trainer, lr_at

        m = self.manifest
        r = self.round
        t0 = time.time()
        start_hash = self.adapter.state_hash()
        shard_hashes = {k: self.adapter.shard_hash(k) for k in self.trained}
        self._prev_hashes = dict(shard_hashes)
        peers = self.swarm.peers()
        with self._lock:
            self.live.peers = dict(peers)
        # who trains this round with me: peers that are not syncing and are at this round or just
        # finishing the previous one (their heartbeat lags by up to a round)
        active = {p: i for p, i in peers.items() if p != self.peer_id and not i.syncing and r - 1 <= i.round <= r}
        participants = sorted([*active, self.peer_id])
        rank = participants.index(self.peer_id)
        total = m.rounds.target_batch_size
        a, b = my_slice(total, len(participants), rank)
        indices = round_batch_indices(len(self.examples), self.swarm_id, r, total)[a:b]
        examples = [self.examples[i] for i in indices]

        local = self.trainer.local_gradients(examples) if examples else self._empty_local()
        t_compute = time.time() - t0
        bits = m.averaging.fixed_point_bits
        ints, clipped = {}, 0
        for k in self.trained:
            ints[k], c = Trainer.to_fixed_point(local.grad_sums[k], bits=bits, norm=total, limit=MAX_PEER_INT)
            clipped += c
        if clipped:
            logger.warning("round %d: %d gradient values exceeded the fixed-point range and were clipped; lower [averaging] fixed_point_bits", r, clipped)
        gather = {"r": r, "h": {str(k): h for k, h in shard_hashes.items()}, "s": local.samples, "t": local.tokens, "l": local.loss_sum}
        expected = {k: 1 + sum(1 for i in active.values() if k in i.shards) for k in self.trained}

        t1 = time.time()
        solo = {k: (ints[k], {self.peer_id: gather}) for k in self.trained if expected[k] <= 1}
        to_average = {k: v for k, v in ints.items() if k not in solo}
        results = dict(solo)
        if to_average:
            results.update(self.swarm.allreduce_sums(to_average, gather, expected, round_=r))
        t_avg = time.time() - t1

        grads, groups, resync, loss_num, loss_den = {}, {}, [], 0.0, 0
        for k in self.trained:
            res = results.get(k)
            if res is None:
                resync.append(k)
                continue
            total_ints, gathered = res
            groups[k] = len(gathered)
            votes = Counter((int(g["r"]), str(g["h"].get(str(k)))) for g in gathered.values())
            canonical = max(votes, key=lambda c: (votes[c], c[0], c[1]))
            if canonical != (r, shard_hashes[k]):
                logger.warning("shard %d: my state (round %d) differs from the group's (round %d); resyncing", k, r, canonical[0])
                resync.append(k)
                continue
            group_tokens = sum(int(g["t"]) for g in gathered.values())
            grads[k] = Trainer.from_fixed_point(total_ints, bits=bits, norm=total, tokens=group_tokens)
            if not loss_den:
                loss_num = sum(float(g["l"]) for g in gathered.values())
                loss_den = group_tokens
        # all or nothing: a round that failed on any shard changes nothing here (no update, no record);
        # the peers that completed it are ahead, and resync() brings this node to their state
        if grads and not resync:
            self.trainer.apply(grads, lr_at(r, m.optim, m.rounds.max_rounds))
            self.round = r + 1
        else:
            resync = sorted(self.trained)
            grads = {}
        applied = sorted(grads)
        t_end = time.time()

        result = RoundResult(
            round=r, start_hash=start_hash, loss=(loss_num / loss_den) if loss_den else None,
            local_loss=(local.loss_sum / local.tokens) if local.tokens else None,
            samples=local.samples, tokens=local.tokens, groups=groups, applied=applied, resync=resync,
            seconds=t_end - t0, compute_seconds=t_compute, averaging_seconds=t_avg,
        )
        if applied:
            self._write_record(result, start_hash, indices, ints, t0, t_end)
        return result

    def _empty_local(self):
        from node.trainer import LocalResult

        return LocalResult({k: torch.zeros(self.adapter.shard_numel(k)) for k in self.trained}, 0, 0, 0.0)

    def _write_record(self, res: RoundResult, start_hash: str, indices, ints, t0: float, t1: float) -> None:
        from hivemind.utils import get_dht_time

        from node.data import data_commitment
        from node.swarm.validator import publish_record
        from node.trainer import grad_commitment
        from protocol.record import to_fixed

        head = self.ledger.head()
        if head is not None and head.round >= res.round:
            # a restart replayed a round the ledger already holds (crash between record and checkpoint):
            # one record per round, so the replay is not recorded (nor credited) twice
            logger.info("round %d is already in the ledger (seq %d); not recording it again", res.round, head.seq)
            return

        loss_before = res.local_loss if res.local_loss is not None else 0.0
        blob = self.ledger.append_new(
            self.identity.private_key, swarm_id=self.swarm_id, round=res.round, shards=tuple(res.applied),
            samples=res.samples, tokens=res.tokens, loss_before=to_fixed(loss_before),
            loss_after=to_fixed(res.loss if res.loss is not None else loss_before),
            adapter_hash=start_hash, data_commitment=data_commitment(indices, self.data_digest),
            grad_commitment=grad_commitment(ints), start_ms=int(t0 * 1000), end_ms=int(t1 * 1000),
        )
        with self._record_cv:
            self._record_cv.notify_all()
        if self.metrics:
            self.metrics.on_record()
        try:
            publish_record(self.swarm.dht, self.swarm_id, blob, get_dht_time() + 24 * 3600)
        except Exception as e:  # publication is best effort; the local ledger is the source of truth
            logger.warning("could not publish record %d to the DHT: %s", self.ledger.next_seq - 1, e)

    # ------------------------------------------------------------------ main loop

    def _install_signals(self) -> None:
        def handler(signum, _frame):
            logger.info("received %s: draining (finishing the current round, then checkpoint and exit)", signal.Signals(signum).name)
            self._drain.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)  # hivemind's averagers set SIGINT to ignored; Ctrl-C must drain

    def stop_round(self) -> int:
        return self.cfg.max_rounds or self.manifest.rounds.max_rounds

    def run(self) -> int:
        self._install_signals()
        if self.cfg.min_peers > 1:
            self.swarm.announce(round=self.round, shards=list(self.trained))
            peers = self.swarm.wait_for_peers(self.cfg.min_peers, self.cfg.peer_wait)
            if len(peers) < self.cfg.min_peers:
                logger.warning("only %d of %d peers visible after %.0f s; starting anyway", len(peers), self.cfg.min_peers, self.cfg.peer_wait)
        self._probe_link()
        self.catch_up()
        self.publish_states()
        self.swarm.announce(round=self.round, shards=list(self.trained), hashes=self._shard_hashes())
        progress = open(self.workdir / "rounds.jsonl", "a", buffering=1)
        try:
            while not self._drain.is_set():
                stop_at = self.stop_round()
                if stop_at and self.round >= stop_at:
                    logger.info("reached round %d: stopping", self.round)
                    break
                if self._paused.is_set():
                    self.live.state = "paused"
                    time.sleep(0.2)
                    continue
                self.live.state = "training"
                if self.swarm.deadline.throughput is None and time.monotonic() - self._probed_at > 60:
                    self._probe_link()
                if self._behind_or_split():
                    continue
                res = self.run_round()
                if res.resync:
                    self.resync(required=False)
                untrained = [k for k in range(self.adapter.num_shards) if k not in self.trained]
                if untrained:
                    self.sync_shards(untrained, require_newer=False)
                self.publish_states()
                if self.cfg.checkpoint_every and self.round % self.cfg.checkpoint_every == 0 and res.applied:
                    self.save_checkpoint()
                self.swarm.announce(round=self.round, shards=list(self.trained), sps=res.samples / max(res.seconds, 1e-9), hashes=self._shard_hashes())
                self._after_round(res, progress)
        finally:
            progress.close()
        self.live.state = "stopped"
        return 0

    def _probe_link(self) -> None:
        """Measure the link to one peer before averaging with it, so that the first all-reduce gets a
        deadline that fits the link (a too-short deadline cancels the transfer halfway)."""
        self._probed_at = time.monotonic()
        others = [p for p, i in self.swarm.peers().items() if p != self.peer_id and not i.syncing
                  and set(i.shards) & set(self.trained)]
        if not others:
            return
        peer = random.choice(others)
        rate = self.swarm.measure_link(peer)
        if rate:
            planned = self.swarm.allreduce_bytes({k: len(others) + 1 for k in self.trained})
            logger.info("link to %s…: %.1f Mbit/s measured; averaging deadline %.1f s for %.1f MB each way",
                        peer[:16], rate * 8 / 1e6, self.swarm.deadline.seconds_for(planned), planned / 1e6)

    def _behind_or_split(self) -> bool:
        """Check the swarm before a round; True when this node had to resync instead of training.

        Behind: a peer is at a later round (a failed round, a slow machine): take its state,
        never train behind the swarm. Split: peers at our round hold a different adapter (two
        groups formed where one should have): the larger side wins, ties go to the larger hash,
        and the other side takes its state, so the swarm converges back to one adapter.
        """
        others = {p: i for p, i in self.swarm.peers().items() if p != self.peer_id and not i.syncing}
        minority, just_lost = self._minority(others)
        if self.manifest.averaging.on_split == "wait" and (minority or just_lost):
            # a peer missing for less than peer_ttl may be a slow DHT, not a split: with "wait", do not
            # train without it until that is clear
            if minority and not self._waiting_for_split:
                logger.warning("this node sees under half of the swarm: waiting for the others to come back "
                               "([averaging] on_split = 'wait'); it resyncs with them when the split heals")
            self._waiting_for_split = minority
            self.live.state = "paused"
            time.sleep(1.0)
            return True
        self._waiting_for_split = False
        if swarm_round(others) > self.round:
            if not self.resync(required=False):
                time.sleep(0.5)
            return True
        # compare, shard by shard, with the peers that train the same shard: after a split (two groups
        # in one round, or a partition that healed) the largest group of peers holding one state wins,
        # then the later round, then the larger hash; peers lagging one round behind us are not a split
        for k in self.trained:
            mine = (self.round, self.adapter.shard_hash(k))
            lagging = (self.round - 1, self._prev_hashes.get(k))
            votes = Counter((i.round, i.shard_hashes[k]) for i in others.values()
                            if k in i.shard_hashes and i.round <= self.round and (i.round, i.shard_hashes[k]) != lagging)
            if not votes or set(votes) == {mine}:
                continue
            votes[mine] += 1
            canonical = max(votes, key=lambda c: (votes[c], c[0], c[1]))
            if canonical == mine:
                continue
            logger.warning("swarm split detected on shard %d: %d peer(s) hold round %d %s…, %d hold ours (round %d %s…); "
                           "taking the majority state", k, votes[canonical], canonical[0], canonical[1][:12],
                           votes[mine], mine[0], mine[1][:12])
            if self.metrics:
                self.metrics.on_split()
            for _ in range(6):
                if self.resync(required=False, want_shard_hash=(k, canonical[1]), allow_older=canonical[0] < self.round):
                    return True
            time.sleep(0.5)
            return True
        return False

    def _minority(self, others: dict) -> tuple[bool, bool]:
        """(minority, just_lost): whether this node now sees less than half of the swarm it saw recently
        (a partition, not departures), and whether a peer went missing less than peer_ttl ago.

        Visible: listed by the DHT now (a peer stays listed until its heartbeat expires, whatever one
        lookup returns). Known: seen in the last max(120 s, 10 peer_ttl), or the last hour with
        on_split = "wait", and not announced gone."""
        now = time.time()
        for p in others:
            self._seen[p] = now
        # a node that waits out a split must remember whom it waits for; one that trains on only needs
        # the memory for its warning
        if self.manifest.averaging.on_split == "wait":
            from node.swarm.peer import REDIAL_FOR

            memory = REDIAL_FOR
        else:
            memory = max(120.0, 10 * self.manifest.averaging.peer_ttl)
        for p in list(self._seen):
            if p in self.swarm.left or now - self._seen[p] > memory:
                del self._seen[p]
        visible = sum(1 for p in self._seen if p in others)
        missing = len(self._seen) - visible
        if missing and not self._split_noticed:
            logger.warning("lost contact with %d of %d peers (a network split or crashed peers); %d still visible",
                           missing, len(self._seen), visible)
        elif not missing and self._split_noticed:
            logger.info("all %d known peers are visible again", len(self._seen))
        self._split_noticed = bool(missing)
        if self.metrics:
            self.metrics.set_missing_peers(missing)
        ttl = self.manifest.averaging.peer_ttl
        just_lost = any(p not in others and now - t <= ttl for p, t in self._seen.items())
        return (visible + 1) * 2 < len(self._seen) + 1, just_lost

    def coverage(self) -> dict[int, int]:
        """Trainers per shard as the DHT shows them (this node included)."""
        counts = {k: int(k in self.trained) for k in range(self.adapter.num_shards)}
        for pid, info in self.live.peers.items():
            if pid != self.peer_id and not info.syncing:
                for k in info.shards:
                    if k in counts:
                        counts[k] += 1
        return counts

    def _warn_uncovered(self) -> None:
        uncovered = [k for k, n in self.coverage().items() if n == 0]
        if uncovered and self.round % 10 == 1:
            logger.warning("shard(s) %s have no trainer in the swarm: their LoRA weights stay at their initial values. "
                           "Ask a node with spare memory to run with --shards %s", uncovered, ",".join(map(str, uncovered)))

    def _after_round(self, res: RoundResult, progress) -> None:
        entry = {
            "round": res.round, "next_round": self.round, "start_hash": res.start_hash, "loss": res.loss, "local_loss": res.local_loss,
            "samples": res.samples, "tokens": res.tokens, "groups": {str(k): v for k, v in res.groups.items()},
            "applied": res.applied, "resync": res.resync, "hash": self.adapter.state_hash(),
            "shard_hashes": {str(k): self.adapter.shard_hash(k) for k in range(self.adapter.num_shards)},
            "coverage": {str(k): v for k, v in self.coverage().items()}, "seconds": round(res.seconds, 4), "compute_s": round(res.compute_seconds, 4),
            "averaging_s": round(res.averaging_seconds, 4), "peers": len(self.live.peers), "time": time.time(),
            "deadline_s": round(self.swarm.allreduce_timeout, 2),
            "link_mbit": round(self.swarm.deadline.throughput * 8 / 1e6, 2) if self.swarm.deadline.throughput else None,
        }
        progress.write(json.dumps(entry) + "\n")
        self._warn_uncovered()
        with self._lock:
            self.live.loss = res.loss
            self.live.last_round_s = res.seconds
            self.live.last_round_at = time.time()
            self.live.samples_total += res.samples
            self.live.tokens_total += res.tokens
            self.live.samples_per_s = res.samples / max(res.seconds, 1e-9)
            self.live.tokens_per_s = res.tokens / max(res.seconds, 1e-9)
        if self.metrics:
            self.metrics.on_round(
                round=self.round, loss=res.loss, samples=res.samples, tokens=res.tokens,
                samples_per_s=self.live.samples_per_s,
            )
            self.metrics.on_averaging(res.averaging_seconds, ok=not res.resync, deadline=self.swarm.allreduce_timeout)
            self.metrics.set_peers(max(0, len(self.live.peers) - 1))
        loss = f"{res.loss:.4f}" if res.loss is not None else "-"
        logger.info(
            "round %d: loss %s, %d samples, groups %s, %.2fs (compute %.2fs, averaging %.2fs)%s",
            res.round, loss, res.samples, res.groups or "-", res.seconds, res.compute_seconds, res.averaging_seconds,
            f", resync {res.resync}" if res.resync else "",
        )

    def shutdown(self) -> None:
        """Checkpoint, flush the ledger, leave the swarm. Safe to call after a partial start."""
        self.live.state = "stopped"
        if self.ledger is not None and self.swarm is not None:
            try:
                self.save_checkpoint()
            except Exception as e:
                logger.error("final checkpoint failed: %s", e)
        if self.control is not None:
            self.control.stop(0.5)
        if self._metrics_server is not None:
            self._metrics_server.stop()
        if self.swarm is not None:
            self.swarm.shutdown()
        elif self._dht is not None:
            self._dht.shutdown()
        if self.ledger is not None:
            self.ledger.close()
        _stop_children(timeout=5.0)
        _remove_stale_sockets()

    # control hooks
    def request_drain(self) -> None:
        self._drain.set()

    def pause(self) -> None:
        self._paused.set()

    def resume(self) -> None:
        self._paused.clear()


def swarm_round(others: dict) -> int:
    """The round most other peers have reached: the lower median of their claims (-1 with none).

    A single peer claiming an epoch far ahead (hivemind's progress tracker trusts the max)
    cannot move it while at least two honest peers are visible."""
    rounds = sorted(i.round for i in others.values())
    return rounds[(len(rounds) - 1) // 2] if rounds else -1


def _stop_children(timeout: float) -> None:
    """hivemind's DHT and averager processes normally exit on shutdown(); one whose p2pd died first can
    linger, and Python would then wait for it forever at exit. Give them `timeout`, then end them."""
    import multiprocessing

    deadline = time.monotonic() + timeout
    for child in multiprocessing.active_children():
        child.join(max(0.0, deadline - time.monotonic()))
    for child in multiprocessing.active_children():
        logger.warning("child process %s (pid %s) did not stop; terminating it", child.name, child.pid)
        child.terminate()
        child.join(2)
        if child.is_alive():
            child.kill()
            child.join(1)


def _remove_stale_sockets(pattern: str = "/tmp/hivemind-*.sock") -> int:
    """hivemind's p2p clients leave their unix sockets behind when their process exits. Remove those
    nobody listens on any more (a live node's sockets accept connections and are kept)."""
    import glob
    import socket
    import stat

    removed = 0
    for path in glob.glob(pattern):
        try:
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                continue
        except OSError:
            continue
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            try:
                sock.connect(path)
                continue  # a live listener
            except ConnectionRefusedError:
                pass
            except OSError:
                continue  # not ours to judge (permissions, a path that vanished)
        try:
            os.unlink(path)
            removed += 1
        except OSError:
            pass
    return removed


MEMBERS_KEY = "swarmtune/members"


def check_membership(dht, manifest: Manifest, initial_peers) -> None:
    """Announce which swarm this node is in, and refuse to join through peers of another swarm.

    Every node stores its swarm id and canonical manifest under `swarmtune/members`. A
    newcomer whose initial peers all train a different swarm gets the exact manifest fields
    that differ, instead of silently training alone.
    """
    from hivemind.utils import get_dht_time

    me = str(dht.peer_id)
    mine = manifest.to_dict()
    dht.store(MEMBERS_KEY, subkey=me, value={"swarm_id": manifest.swarm_id, "name": manifest.name, "manifest": mine},
              expiration_time=get_dht_time() + 3600)
    wanted = {a.rsplit("/p2p/", 1)[-1] for a in initial_peers if "/p2p/" in a}
    if not wanted:
        return
    found = dht.get(MEMBERS_KEY, latest=True)
    entries = found.value if found is not None and isinstance(found.value, dict) else {}
    others = {}
    for pid, item in entries.items():
        value = getattr(item, "value", None)
        if str(pid) in wanted and isinstance(value, dict) and isinstance(value.get("swarm_id"), str):
            others[str(pid)] = value
    if not others or any(v["swarm_id"] == manifest.swarm_id for v in others.values()):
        return
    pid, theirs = next(iter(others.items()))
    diffs = _manifest_diff(theirs.get("manifest") if isinstance(theirs.get("manifest"), dict) else {}, mine)
    shown = "; ".join(f"{k}: theirs {a!r}, yours {b!r}" for k, a, b in diffs[:8]) or "(their manifest was not readable)"
    raise NodeError(
        f"the initial peer {pid[-12:]} trains swarm '{theirs.get('name')}' ({theirs['swarm_id'][:16]}…), but your manifest "
        f"hashes to {manifest.swarm_id[:16]}…: the manifests differ in {shown}. Get that swarm's manifest file and pass it "
        "with --manifest (every node of a swarm must hold the same one)"
    )


def _manifest_diff(theirs: dict, mine: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    out = []
    for key in sorted(set(theirs) | set(mine)):
        if key in ("model", "source") and prefix in ("base.", "data."):
            continue  # where files live is local; fingerprint/digest compare the content
        a, b = theirs.get(key), mine.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _manifest_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out


class NodeControlView:
    """The daemon as the control service sees it (node.control.NodeView): snapshots only."""

    def __init__(self, node: Node):
        self.node = node

    def status(self) -> dict:
        import psutil

        n = self.node
        proc = psutil.Process()
        rss = proc.memory_info().rss
        try:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        except Exception:
            peak = rss
        with n._lock:
            live = n.live
            return {
                "round": n.round, "loss": live.loss, "samples_per_s": float(live.samples_per_s),
                "tokens_per_s": float(live.tokens_per_s), "peers": max(0, len(live.peers) - 1), "state": live.state,
                "swarm_id": n.swarm_id, "peer_id": n.peer_id, "shards": list(n.trained),
                "adapter_hash": n.adapter.state_hash(), "rss_bytes": int(rss), "peak_rss_bytes": int(peak),
                "gpu_memory_bytes": int(torch.cuda.memory_allocated()) if torch.cuda.is_available() else 0,
                "uptime_s": time.time() - n.started_at, "last_round_s": live.last_round_s,
                "last_round_at": live.last_round_at, "listen_maddrs": n.swarm.visible_maddrs() if n.swarm else [],
                "samples_total": live.samples_total, "tokens_total": live.tokens_total, "version": __version__,
            }

    def peers(self) -> list[dict]:
        from hivemind.utils import get_dht_time

        now = get_dht_time()
        out = []
        for pid, info in sorted(self.node.swarm.peers().items()):
            if pid == self.node.peer_id:
                continue
            age = max(0.0, self.node.manifest.averaging.peer_ttl - (info.expires_at - now))
            out.append({"peer_id": pid, "multiaddrs": list(info.maddrs), "round": info.round, "shards": list(info.shards), "last_seen_s": age})
        return out

    def shards(self) -> list[dict]:
        n = self.node
        peers = n.swarm.peers()
        out = []
        for k, (a, b) in enumerate(n.adapter.plan):
            trainers = sum(1 for pid, i in peers.items() if k in i.shards and pid != n.peer_id) + (1 if k in n.trained else 0)
            out.append({"index": k, "layer_start": a, "layer_end": b, "trainers": trainers, "local": k in n.trained})
        return out

    def records(self, from_seq: int) -> list[dict]:
        from node.control import record_summary

        entries = list(zip(self.node.ledger.blobs(), self.node.ledger.records()))
        return [record_summary(b, r) for b, r in entries[max(0, from_seq):][:256]]

    def wait_for_record(self, after_seq: int, timeout: float) -> bool:
        with self.node._record_cv:
            return self.node._record_cv.wait_for(lambda: self.node.ledger.next_seq - 1 > after_seq, timeout=timeout)

    def credit(self) -> list[dict]:
        from node.ledger import compute_credit, verify_logs
        from node.swarm.validator import collect_records

        n = self.node
        blobs = {"local": n.ledger.blobs()}
        try:
            blobs["dht"] = collect_records(n.swarm.dht, n.swarm_id)
        except Exception as e:
            logger.warning("could not read records from the DHT: %s", e)
        report = verify_logs(blobs, n.swarm_id, n.manifest.credit.max_samples_per_round)
        return [
            {"peer_id": c.peer_id, "verified_rounds": c.rounds, "samples": c.samples, "tokens": c.tokens, "share": c.share}
            for c in compute_credit(report).values()
        ]

    def pause(self) -> None:
        self.node.pause()

    def resume(self) -> None:
        self.node.resume()

    def drain(self) -> None:
        self.node.request_drain()


def run_node(cfg: NodeConfig, export_dir: str | None = None, stop: threading.Event | None = None) -> int:
    """Entry point of `swarmtune run`: prepare (validate), start, train, drain, optionally export."""
    node = Node(cfg)
    if stop is not None:
        node._drain = stop  # a stop requested before the node existed still counts
    node._install_signals()  # a SIGTERM while the model loads stops the node before it joins
    node.prepare()
    try:
        if node._drain.is_set():
            return 0
        node.start()
        code = node.run()
        if export_dir:
            from node.export import export_peft

            export_peft(node.model, export_dir, base_name=node.manifest.base.model)
            logger.info("exported the adapter to %s", export_dir)
        return code
    finally:
        node.shutdown()
