"""The swarm manifest: one small TOML file that every node of a swarm holds.

It fixes everything peers must agree on to average together: the base model and its
fingerprint, the LoRA config, the shard plan, the data, the optimizer and schedule,
the round size, averaging settings and the credit caps. Its hash is the `swarm_id`;
nodes whose manifests hash differently never average together (the id is part of
every hivemind key the node uses).

    swarmtune swarm init --base ./my-model --data train.jsonl --out swarm.toml

Hashing is over a canonical JSON rendering of the parsed manifest (sorted keys, no
whitespace), so comments and formatting do not change the id, while any value does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file, the field and the fix."""


@dataclass(frozen=True)
class BaseSection:
    model: str  # hub id or local folder of a Hugging Face causal LM
    fingerprint: str  # sha256 over config + weights (node.model.base_fingerprint)
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
    timeout: float = 30.0  # all-reduce deadline before the link is measured, and its floor (node/swarm/deadline.py)
    fixed_point_bits: int = 30  # gradients are summed as exact integers scaled by 2**bits (bit-identical peers)
    peer_ttl: float = 30.0  # seconds a peer stays listed in the DHT after its last heartbeat
    on_split: str = "train"  # when this node sees under half the peers it recently saw: train (with whoever is visible) | wait


@dataclass(frozen=True)
class CreditSection:
    max_samples_per_round: int = 48  # most samples one peer is credited for in one round (the default target batch)


@dataclass(frozen=True)
class Manifest:
    name: str
    base: BaseSection
    data: DataSection
    lora: LoraSection = field(default_factory=LoraSection)
    shards: ShardSection = field(default_factory=ShardSection)
    objective: str = "sft"  # sft (dpo is planned)
    optim: OptimSection = field(default_factory=OptimSection)
    rounds: RoundSection = field(default_factory=RoundSection)
    averaging: AveragingSection = field(default_factory=AveragingSection)
    credit: CreditSection = field(default_factory=CreditSection)
    format: int = FORMAT_VERSION
    source_path: Path | None = field(default=None, compare=False)

    @property
    def swarm_id(self) -> str:
        """sha256 hex of the canonical manifest: the swarm's identity on the network.

        Where the base model and the data *live* (base.model, data.source) is left out:
        peers keep them in different folders, and the fingerprint and digest already
        pin their content.
        """
        d = self.to_dict()
        del d["base"]["model"], d["data"]["source"]
        return hashlib.sha256(canonical_json(d).encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source_path")
        return _lists(d)

    def resolve_path(self, value: str) -> str:
        """Relative local paths in a manifest are relative to the manifest's folder."""
        if self.source_path is None or value.startswith(("builtin:", "hf:")) or os.path.isabs(value):
            return value
        candidate = self.source_path.parent / value
        return str(candidate) if candidate.exists() or not Path(value).exists() else value


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
    "credit": CreditSection,
}


def _build(cls, raw: Any, where: str):
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: expected a table, got {type(raw).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known))
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
    m = Manifest(name=str(swarm["name"]), objective=str(swarm.get("objective", "sft")), format=fmt, **sections)
    validate(m, where)
    return m


def validate(m: Manifest, where: str = "manifest") -> None:
    def bad(msg: str):
        raise ManifestError(f"{where}: {msg}")

    if m.objective != "sft":
        bad(f"objective '{m.objective}' is not supported yet; use 'sft'")
    if m.base.dtype not in ("float32", "bfloat16"):
        bad(f"[base] dtype '{m.base.dtype}' must be float32 or bfloat16")
    if m.base.quantization not in ("none", "nf4", "int8"):
        bad(f"[base] quantization '{m.base.quantization}' must be none, nf4 or int8")
    if len(m.base.fingerprint) != 64:
        bad("[base] fingerprint must be 64 hex chars; compute it with `swarmtune swarm init`")
    if m.lora.rank < 1 or m.lora.alpha < 1 or not 0.0 <= m.lora.dropout < 1.0:
        bad("[lora] rank and alpha must be >= 1 and dropout in [0, 1)")
    if not m.lora.target_modules:
        bad("[lora] target_modules must name at least one module (or 'all-linear')")
    if m.rounds.target_batch_size < 1 or m.rounds.microbatch_size < 1:
        bad("[rounds] target_batch_size and microbatch_size must be >= 1")
    if m.optim.schedule not in ("constant", "cosine"):
        bad(f"[optim] schedule '{m.optim.schedule}' must be constant or cosine")
    if m.optim.schedule == "cosine" and m.rounds.max_rounds < 1:
        bad("[optim] schedule = 'cosine' needs [rounds] max_rounds >= 1")
    if not 8 <= m.averaging.fixed_point_bits <= 36:
        bad("[averaging] fixed_point_bits must be between 8 and 36")
    if m.averaging.matchmaking_time <= 0 or m.averaging.timeout <= m.averaging.matchmaking_time:
        bad("[averaging] needs 0 < matchmaking_time < timeout")
    if m.averaging.on_split not in ("wait", "train"):
        bad(f"[averaging] on_split '{m.averaging.on_split}' must be wait or train")
    if m.credit.max_samples_per_round < 1:
        bad("[credit] max_samples_per_round must be >= 1")
    prev_end = 0
    for i, (a, b) in enumerate(m.shards.plan):
        if a != prev_end or b <= a:
            bad(f"[shards] plan entry {i} = [{a}, {b}] must start at {prev_end} and be non-empty (contiguous layer ranges from 0)")
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
    leaving out where the base model and the data live locally (fingerprint and digest compare them)."""
    out = []
    for key in sorted(set(theirs) | set(mine)):
        if key in ("model", "source") and prefix in ("base.", "data."):
            continue
        a, b = theirs.get(key), mine.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += manifest_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out
