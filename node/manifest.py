"""The swarm manifest: one small TOML file that every node of a swarm holds.

It fixes everything peers must agree on to average together: the base model and its
fingerprint, the LoRA config, the shard plan, the data, the optimizer and schedule,
the round size, averaging settings and the credit caps. Its hash is the `swarm_id`;
nodes whose manifests hash differently never average together (the id is part of
every hivemind key the node uses).

    swarmtune swarm init --base ./my-model --data train.jsonl --out swarm.toml

Hashing is over a canonical JSON rendering of the parsed manifest (sorted keys, no
whitespace), so comments and formatting do not change the id, while any value does.

Where things live: `[base] model` is a local folder or a Hugging Face hub id. A value
that is an existing path (beside the manifest, else from the current folder) is a
path; one that is not and looks like `org/name` is a hub id and stays one (never
joined to the manifest's folder); `[base] revision` pins its commit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file, the field and the fix.
    `field` is "section.name" when one value is at fault (so `swarm init` can name its flag)."""

    def __init__(self, message: str, field: str = ""):
        super().__init__(message)
        self.field = field


# a Hugging Face repo id: "org/name", letters, digits, "_", "-", "."; no "--" or ".." (the Hub's own rules)
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def looks_like_hub_id(value: str) -> bool:
    """`org/name` in the Hub's syntax. Whether it *is* one also needs it not to be an existing path."""
    return bool(_HUB_ID.fullmatch(value)) and "--" not in value and ".." not in value and not value.endswith((".", "-"))


@dataclass(frozen=True)
class BaseSection:
    model: str  # hub id (org/name) or local folder of a Hugging Face causal LM
    fingerprint: str  # sha256 over config + weights (node.model.base_fingerprint)
    revision: str = ""  # commit (or tag/branch) pinning a hub id base; default "": whatever the cache or the Hub resolves
    dtype: str = "float32"  # float32 | bfloat16: compute dtype of the frozen base
    quantization: str = "none"  # none | nf4 | int8 (bitsandbytes; nf4 also runs on CPU, slowly)


@dataclass(frozen=True)
class LoraSection:
    rank: int = 8  # LoRA rank r
    alpha: int = 16  # LoRA scaling numerator (scale = alpha / rank)
    dropout: float = 0.0  # dropout on the LoRA input; 0 keeps peers bit-identical
    target_modules: tuple[str, ...] = ("all-linear",)  # module names, or "all-linear"
    init_seed: int = 0  # seed of the LoRA A init: every node starts from the same adapter


@dataclass(frozen=True)
class ShardSection:
    plan: tuple[tuple[int, int], ...] = ()  # contiguous layer ranges [a, b); empty = default for the depth


@dataclass(frozen=True)
class DataSection:
    source: str  # local JSONL path, "builtin:task", or "hf:<dataset id>[:split]"
    digest: str  # sha256 of the data (node.data.dataset_digest)
    max_length: int = 128  # tokens per example after truncation
    packing: bool = False  # pack several examples into one max_length window
    # 0: the order in which the swarm visits the examples follows from the swarm id (every manifest its own
    # order); another value orders them by this seed alone, so swarms that differ only in, say, [sync] train on
    # the same batches in the same order (a paired comparison of sync modes: scripts/bench_comm.py B5)
    shuffle_seed: int = 0


@dataclass(frozen=True)
class OptimSection:
    lr: float = 2e-3  # peak learning rate of AdamW
    weight_decay: float = 0.0  # decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    warmup_rounds: int = 0  # linear warmup length in rounds
    schedule: str = "constant"  # constant | cosine (over max_rounds)
    max_grad_norm: float = 1.0  # clip the averaged gradient's norm; 0 disables


@dataclass(frozen=True)
class RoundSection:
    target_batch_size: int = 48  # samples per round for the whole swarm
    microbatch_size: int = 8  # samples per local forward/backward
    max_rounds: int = 0  # stop after this many rounds; 0 = run until stopped


@dataclass(frozen=True)
class AveragingSection:
    matchmaking_time: float = 2.0  # seconds a leader waits for groupmates (hivemind default 15 s is for big swarms)
    timeout: float = 30.0  # all-reduce deadline before the link is measured (then it follows the link: node/swarm/deadline.py)
    peer_ttl: float = 30.0  # seconds a peer stays listed in the DHT after its last heartbeat
    on_split: str = "train"  # when this node sees under half the peers it recently saw: train (with whoever is visible) | wait


DILOCO_INNER_STEPS = 20  # what `swarm init --sync diloco` takes when --inner-steps is not given


@dataclass(frozen=True)
class SyncSection:
    mode: str = "per-step"  # per-step: each round sums the round's gradients, one AdamW step | diloco: inner_steps local AdamW steps, then one exact outer step
    wire: str = "int8"  # int8 | int32: the grid contributions are summed on, exactly (int8: ~1/4 of fp32's bytes, with error feedback)
    inner_steps: int = 1  # diloco: local AdamW steps per round (each on this node's share of one global batch)
    outer_lr: float = 0.7  # diloco: outer Nesterov SGD learning rate (OpenDiLoCo / INTELLECT-1: 0.7)
    # OpenDiLoCo / INTELLECT-1 pretrain with momentum 0.9 over thousands of outer steps; a LoRA fine-tune over tens of
    # outer rounds overshot with it (README "What crosses the wire": held-out loss +127 %, with overlap it diverged)
    outer_momentum: float = 0.5  # diloco: outer Nesterov momentum (0 = plain SGD; 0.9 is for pretraining runs)
    overlap: bool = False  # diloco: sum round r's pseudo-gradient while round r+1's inner steps run (the outer step lands one round late)
    clip: float = 4.0  # a peer's part more than clip x the group's median part norm is scaled down to that, and the peer flagged (0 = off; needs 3+ senders)
    robust: str = "clip"  # clip: each part clipped, then summed | trimmed: clipped, then per value the trim share of senders dropped at each end
    trim: float = 0.1  # robust = "trimmed": share of senders dropped at EACH end of every value (at least 1 of >= 3 senders)

    @property
    def reducer_trim(self) -> float:
        """What a reducer trims off each end of each value (node.swarm.exact.trim_count): 0 unless robust = "trimmed"."""
        return self.trim if self.robust == "trimmed" else 0.0


ROBUST = ("clip", "trimmed")  # [sync] robust: how a reducer sums the senders' parts (node/swarm/exact.robust_sum)
OBJECTIVES = ("sft", "dpo")
DPO_LOSSES = ("sigmoid", "hinge", "ipo")  # TRL's DPOConfig.loss_type names (trl/trainer/dpo_trainer.py)


@dataclass(frozen=True)
class DpoSection:
    beta: float = 0.1  # DPO temperature: how far the policy may move from the reference (TRL's default 0.1)
    loss: str = "sigmoid"  # sigmoid (DPO) | hinge (SLiC) | ipo (IPO, log-ratios averaged over completion tokens)


@dataclass(frozen=True)
class StartSection:
    adapter: str = ""  # PEFT adapter folder every node starts from (where it lives: not part of the swarm_id)
    hash: str = ""  # the adapter state hash of its bits on this base (node.model.Adapter.state_hash); "" = fresh LoRA


@dataclass(frozen=True)
class CreditSection:
    max_samples_per_round: int = 0  # most samples one peer is credited for in one round; 0 = the round's whole batch (target_batch_size x inner_steps)
    spot_check_rate: float = 0.21  # chance each member is spot-checked each round (0.21: a constant cheater is caught within 20 rounds at 99 %)
    spot_check_tolerance: float = 0.5  # relative L2 error of a recomputed part above which it failed
    exclude_after: int = 3  # failed spot-checks after which a peer is left out of groups


@dataclass(frozen=True)
class Manifest:
    name: str
    base: BaseSection
    data: DataSection
    lora: LoraSection = field(default_factory=LoraSection)
    shards: ShardSection = field(default_factory=ShardSection)
    objective: str = "sft"  # sft | dpo (preference pairs; [dpo] holds beta and the loss)
    dpo: DpoSection = field(default_factory=DpoSection)
    start: StartSection = field(default_factory=StartSection)
    optim: OptimSection = field(default_factory=OptimSection)
    rounds: RoundSection = field(default_factory=RoundSection)
    averaging: AveragingSection = field(default_factory=AveragingSection)
    sync: SyncSection = field(default_factory=SyncSection)
    credit: CreditSection = field(default_factory=CreditSection)
    format: int = FORMAT_VERSION
    source_path: Path | None = field(default=None, compare=False)

    @property
    def swarm_id(self) -> str:
        """sha256 hex of the canonical manifest: the swarm's identity on the network.

        Where the base model and the data *live* (base.model, base.revision, data.source)
        is left out: peers keep them in different folders (or fetch them by another
        revision name), and the fingerprint and digest already pin their content.
        """
        d = self.to_dict()
        del d["base"]["model"], d["data"]["source"]
        d["base"].pop("revision", None)
        d.get("start", {}).pop("adapter", None)
        return hashlib.sha256(canonical_json(d).encode()).hexdigest()

    @property
    def order_key(self) -> str:
        """What seeds the examples' order (node.data.round_batch_indices): the swarm id, or [data] shuffle_seed."""
        return f"shuffle-seed:{self.data.shuffle_seed}" if self.data.shuffle_seed else self.swarm_id

    @property
    def token_cap(self) -> int:
        """Most tokens one credited sample can have taken: [data] max_length (examples are truncated to it),
        twice that for a DPO pair (chosen and rejected, each up to max_length)."""
        return self.data.max_length * (2 if self.objective == "dpo" else 1)

    @property
    def credit_cap(self) -> int:
        """Most samples one peer is credited for in one round: [credit] max_samples_per_round, or the
        round's whole batch (one global batch per step, inner_steps steps in diloco)."""
        return self.credit.max_samples_per_round or self.rounds.target_batch_size * self.sync.inner_steps

    def to_dict(self) -> dict[str, Any]:
        """The manifest as plain data. An empty `[base] revision` is left out, so manifests written
        before the field existed render (and hash, and compare on the wire) exactly as they did."""
        d = dataclasses.asdict(self)
        d.pop("source_path")
        if not d["base"]["revision"]:
            del d["base"]["revision"]
        if self.objective != "dpo":  # likewise [dpo] and [start] appear only where used: SFT swarm ids stay as they were
            del d["dpo"]
        if not self.start.hash:
            del d["start"]
        if not self.data.shuffle_seed:  # likewise the data order's seed when it is the swarm id's
            del d["data"]["shuffle_seed"]
        if self.sync.robust == "clip":  # likewise robust and trim, which only a trimmed sum uses
            del d["sync"]["robust"], d["sync"]["trim"]
        return _lists(d)

    def resolve_path(self, value: str) -> str:
        """Where a manifest value points: a relative path beside the manifest (else from the current
        folder) when it exists there; a hub id (`org/name`, not an existing path) unchanged;
        `builtin:` and `hf:` sources unchanged."""
        if value.startswith(("builtin:", "hf:")):
            return value
        if value.startswith("~"):
            return os.path.expanduser(value)
        if self.source_path is None or os.path.isabs(value):
            return value
        candidate = self.source_path.parent / value
        if candidate.exists():
            return str(candidate)
        if Path(value).exists() or looks_like_hub_id(value):
            return value
        return str(candidate)  # not found anywhere: name the place a relative path means


def _lists(obj: Any) -> Any:
    if isinstance(obj, (list, tuple)):
        return [_lists(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _lists(v) for k, v in obj.items()}
    return obj


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


_SECTIONS = {
    "base": BaseSection,
    "data": DataSection,
    "lora": LoraSection,
    "shards": ShardSection,
    "optim": OptimSection,
    "rounds": RoundSection,
    "averaging": AveragingSection,
    "sync": SyncSection,
    "credit": CreditSection,
    "dpo": DpoSection,
    "start": StartSection,
}
# keys older manifests may hold, and what to do about them
_REMOVED = {
    ("averaging", "fixed_point_bits"): "gradients are now summed on a grid each round derives from the values "
                                       "([sync] wire = \"int8\" or \"int32\"); delete the line",
}


def _build(cls, raw: Any, where: str):
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: expected a table, got {type(raw).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known))
    section = where.rsplit("[", 1)[-1].rstrip("]")
    for name in unknown:
        if (section, name) in _REMOVED:
            raise ManifestError(f"{where}: '{name}' is no longer used: {_REMOVED[section, name]}", f"{section}.{name}")
    if unknown:
        raise ManifestError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(known)}")
    kwargs = {}
    for name, f in known.items():
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ManifestError(f"{where}: missing required key '{name}'")
            continue
        value = raw[name]
        default = f.default if f.default is not dataclasses.MISSING else None
        kwargs[name] = _coerce(value, default, f"{where}.{name}", name)
    return cls(**kwargs)


def _coerce(value: Any, default: Any, where: str, name: str) -> Any:
    if name == "plan":
        if not isinstance(value, list) or not all(
            isinstance(r, list) and len(r) == 2 and all(type(x) is int for x in r) for r in value
        ):
            raise ManifestError(f"{where}: expected a list of [first_layer, end_layer] integer pairs")
        return tuple((a, b) for a, b in value)
    if isinstance(default, tuple) or name in ("target_modules", "betas"):
        if not isinstance(value, list):
            raise ManifestError(f"{where}: expected a list, got {value!r}")
        return tuple(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ManifestError(f"{where}: expected true/false, got {value!r}")
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if type(value) is not int:
            raise ManifestError(f"{where}: expected an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if type(value) not in (int, float) or not math.isfinite(value):
            raise ManifestError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if default is None or isinstance(default, str):
        if not isinstance(value, str):
            raise ManifestError(f"{where}: expected a string, got {value!r}")
    return value


def parse_manifest(raw: dict[str, Any], where: str = "manifest") -> Manifest:
    raw = dict(raw)
    swarm = raw.pop("swarm", {})
    if not isinstance(swarm, dict) or "name" not in swarm:
        raise ManifestError(f"{where}: [swarm] table with a 'name' is required")
    fmt = swarm.get("format", FORMAT_VERSION)
    if fmt != FORMAT_VERSION:
        raise ManifestError(f"{where}: manifest format {fmt} is not supported by this swarmtune (expects {FORMAT_VERSION}); upgrade swarmtune")
    extra_swarm = sorted(set(swarm) - {"name", "format", "objective"})
    if extra_swarm:
        raise ManifestError(f"{where}: [swarm] has unknown key(s) {extra_swarm}")
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ManifestError(f"{where}: unknown section(s) {unknown}; allowed: {sorted(_SECTIONS)} and [swarm]")
    for required in ("base", "data"):
        if required not in raw:
            raise ManifestError(f"{where}: missing [{required}] section")
    sections = {name: _build(cls, raw[name], f"{where} [{name}]") for name, cls in _SECTIONS.items() if name in raw}
    if "dpo" in raw and swarm.get("objective", "sft") != "dpo":
        raise ManifestError(f"{where}: a [dpo] section needs [swarm] objective = \"dpo\"; set it, or remove [dpo]",
                            "swarm.objective")
    m = Manifest(name=str(swarm["name"]), objective=str(swarm.get("objective", "sft")), format=fmt, **sections)
    validate(m, where)
    return m


# (section, field, allowed range as shown to the user, predicate) for every bounded number
_RANGES: tuple[tuple[str, str, str, Any], ...] = (
    ("lora", "rank", ">= 1", lambda v: v >= 1),
    ("lora", "alpha", ">= 1", lambda v: v >= 1),
    ("lora", "dropout", "[0, 1)", lambda v: 0.0 <= v < 1.0),
    ("lora", "init_seed", "[0, 2**63)", lambda v: 0 <= v < 2**63),
    ("data", "max_length", ">= 1", lambda v: v >= 1),
    ("data", "shuffle_seed", "[0, 2**63) (0 = from the swarm id)", lambda v: 0 <= v < 2**63),
    ("optim", "lr", "> 0", lambda v: v > 0),
    ("optim", "weight_decay", ">= 0", lambda v: v >= 0),
    ("optim", "eps", "> 0", lambda v: v > 0),
    ("optim", "warmup_rounds", ">= 0", lambda v: v >= 0),
    ("optim", "max_grad_norm", ">= 0 (0 disables clipping)", lambda v: v >= 0),
    ("rounds", "target_batch_size", ">= 1", lambda v: v >= 1),
    ("rounds", "microbatch_size", ">= 1", lambda v: v >= 1),
    ("rounds", "max_rounds", ">= 0 (0 = until stopped)", lambda v: v >= 0),
    ("averaging", "matchmaking_time", "> 0 seconds", lambda v: v > 0),
    ("averaging", "timeout", "> 0 seconds", lambda v: v > 0),
    ("averaging", "peer_ttl", "> 0 seconds", lambda v: v > 0),
    ("sync", "inner_steps", "[1, 100000]", lambda v: 1 <= v <= 100000),
    ("sync", "outer_lr", "> 0", lambda v: v > 0),
    ("sync", "outer_momentum", "[0, 1)", lambda v: 0.0 <= v < 1.0),
    ("sync", "clip", "0 (off) or >= 1", lambda v: v == 0 or v >= 1),
    ("sync", "trim", "(0, 0.5): a share of senders at each end", lambda v: 0.0 < v < 0.5),
    ("credit", "max_samples_per_round", ">= 0 (0 = the round's whole batch)", lambda v: v >= 0),
    ("credit", "spot_check_rate", "[0, 1] (0 = no spot-checks)", lambda v: 0.0 <= v <= 1.0),
    ("credit", "spot_check_tolerance", "> 0", lambda v: v > 0),
    ("credit", "exclude_after", ">= 1", lambda v: v >= 1),
    ("dpo", "beta", "> 0", lambda v: v > 0),
)
# (section, field, allowed values) for every choice
_CHOICES = (
    ("base", "dtype", ("float32", "bfloat16")),
    ("base", "quantization", ("none", "nf4", "int8")),
    ("optim", "schedule", ("constant", "cosine")),
    ("averaging", "on_split", ("train", "wait")),
    ("sync", "mode", ("per-step", "diloco")),
    ("sync", "wire", ("int8", "int32")),
    ("sync", "robust", ROBUST),
    ("dpo", "loss", DPO_LOSSES),
)


def validate(m: Manifest, where: str = "manifest") -> None:
    """Every value in its allowed range; the first that is not raises ManifestError naming
    `where` (the file), the field, the bad value and the range."""

    def bad(msg: str, field: str = ""):
        raise ManifestError(f"{where}: {msg}", field)

    def out_of_range(section: str, name: str, value: Any, allowed: str):
        bad(f"[{section}] {name} = {value!r} is out of range (allowed: {allowed})", f"{section}.{name}")

    if m.objective not in OBJECTIVES:
        bad(f"objective '{m.objective}' must be one of {', '.join(OBJECTIVES)}", "swarm.objective")
    if m.objective == "dpo" and m.data.packing:
        bad("[data] packing = true does not apply to objective 'dpo' (each pair is scored whole); set packing = false",
            "data.packing")
    if m.start.hash and not re.fullmatch(r"[0-9a-f]{64}", m.start.hash):
        bad("[start] hash must be 64 lowercase hex chars; compute it with `swarmtune swarm init --adapter PATH`", "start.hash")
    if bool(m.start.hash) != bool(m.start.adapter):
        bad("[start] needs both adapter (the folder) and hash; write it with `swarmtune swarm init --adapter PATH`",
            "start.adapter")
    for section, name, allowed in _CHOICES:
        value = getattr(getattr(m, section), name)
        if value not in allowed:
            bad(f"[{section}] {name} = {value!r} must be one of {', '.join(allowed)}", f"{section}.{name}")
    if len(m.base.fingerprint) != 64:
        bad("[base] fingerprint must be 64 hex chars; compute it with `swarmtune swarm init`", "base.fingerprint")
    if m.base.revision and (m.base.model.startswith(("builtin:", ".", "/", "~")) or not looks_like_hub_id(m.base.model)):
        bad(f"[base] revision = {m.base.revision!r} applies only to a hub id (org/name), but model = {m.base.model!r}; "
            "remove revision, or set model to the hub id", "base.revision")
    if m.base.revision and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_./-]*", m.base.revision):
        bad(f"[base] revision = {m.base.revision!r} is not a commit, tag or branch name", "base.revision")
    for section, name, allowed, ok in _RANGES:
        value = getattr(getattr(m, section), name)
        if not ok(value) or (isinstance(value, float) and not math.isfinite(value)):
            out_of_range(section, name, value, allowed)
    betas = m.optim.betas
    if len(betas) != 2 or not all(type(b) in (int, float) and 0.0 <= b < 1.0 for b in betas):  # NaN fails too
        out_of_range("optim", "betas", list(betas), "two numbers, each in [0, 1)")
    targets = m.lora.target_modules
    if not targets or not all(isinstance(t, str) and t for t in targets):
        bad(f"[lora] target_modules = {list(targets)!r} must name at least one module (or 'all-linear')", "lora.target_modules")
    if m.optim.schedule == "cosine" and m.rounds.max_rounds < 1:
        bad("[optim] schedule = 'cosine' needs [rounds] max_rounds >= 1", "rounds.max_rounds")
    if m.sync.mode == "per-step" and m.sync.inner_steps != 1:
        bad(f"[sync] inner_steps = {m.sync.inner_steps} needs mode = \"diloco\" (per-step mode takes one step per round)",
            "sync.inner_steps")
    if m.sync.overlap and m.sync.mode != "diloco":
        bad("[sync] overlap = true needs mode = \"diloco\" (it overlaps the outer exchange with the next inner steps)",
            "sync.overlap")
    if m.averaging.timeout <= m.averaging.matchmaking_time:
        bad(f"[averaging] timeout = {m.averaging.timeout!r} must be greater than matchmaking_time = "
            f"{m.averaging.matchmaking_time!r} (the all-reduce starts after matchmaking)", "averaging.timeout")
    prev_end = 0
    for i, (a, b) in enumerate(m.shards.plan):
        if a != prev_end or b <= a:
            bad(f"[shards] plan entry {i} = [{a}, {b}] must start at {prev_end} and be non-empty (contiguous layer ranges from 0)",
                "shards.plan")
        prev_end = b


def load_manifest(path: str | os.PathLike) -> Manifest:
    p = Path(path)
    if not p.is_file():
        raise ManifestError(f"manifest {p} not found; create one with `swarmtune swarm init --out {p}`")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{p}: not valid TOML: {e}") from None
    m = parse_manifest(raw, where=str(p))
    return dataclasses.replace(m, source_path=p.resolve())


def dump_manifest(m: Manifest) -> str:
    """TOML text for a manifest (round-trips through load_manifest to the same swarm_id)."""
    import tomli_w

    d = m.to_dict()
    out: dict[str, Any] = {"swarm": {"name": d.pop("name"), "format": d.pop("format"), "objective": d.pop("objective")}}
    for name in _SECTIONS:
        if name in d:
            out[name] = d[name]
    header = (
        f"# swarmtune swarm manifest. swarm_id = {m.swarm_id}\n"
        "# Every node of the swarm must hold this exact content (comments aside).\n\n"
    )
    return header + tomli_w.dumps(out)


def write_manifest(m: Manifest, path: str | os.PathLike) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(dump_manifest(m), encoding="utf-8")
    os.replace(tmp, p)
    return p


def manifest_diff(theirs: dict, mine: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(field, theirs, mine) for every field where two manifests (as `Manifest.to_dict()`) differ,
    leaving out where the base model and the data live (fingerprint and digest compare them)."""
    out = []
    for key in sorted(set(theirs) | set(mine)):
        if (prefix, key) in (("base.", "model"), ("base.", "revision"), ("data.", "source"), ("start.", "adapter")):
            continue
        a, b = theirs.get(key), mine.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += manifest_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out
