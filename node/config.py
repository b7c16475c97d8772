"""Node configuration: what *this* node does (the manifest says what the swarm does).

Precedence, lowest to highest, documented once here and in README:
    defaults  <  node TOML (--config FILE)  <  SWARMTUNE_<FIELD> environment  <  CLI flags

Every field below is settable in all three places under the same name
(`initial_peers` -> `initial_peers = [...]`, `SWARMTUNE_INITIAL_PEERS=a,b`, `--initial-peers a b`).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping


class ConfigError(ValueError):
    """A node config value that cannot be used; names the source (file, variable or flag)."""


def default_home() -> Path:
    """The node's state folder when none is configured: $SWARMTUNE_HOME, else ~/.swarmtune.
    The one place SWARMTUNE_HOME is read."""
    return Path(os.environ.get("SWARMTUNE_HOME") or "~/.swarmtune").expanduser()


@dataclass(frozen=True)
class NodeConfig:
    manifest: str = ""  # path of the swarm manifest (TOML) to join
    home: str = ""  # state folder: key, ledgers, checkpoints, control socket; default $SWARMTUNE_HOME or ~/.swarmtune
    key: str = ""  # identity key file; default <home>/identity.key (created on first run only with --create-key / create_key = true)
    create_key: bool = False  # create the identity key when it is missing (never overwrites)
    initial_peers: tuple[str, ...] = ()  # multiaddrs of any running peers; empty = this node starts the swarm
    host_maddrs: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)  # where p2pd listens
    announce_maddrs: tuple[str, ...] = ()  # addresses peers should dial, when behind port forwarding
    shards: str = "all"  # which adapter shards to train: all | auto | comma list like 2,3
    max_memory: str = ""  # memory budget for --shards auto, e.g. 6GiB; default: free GPU memory or RAM
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    base_model: str = ""  # local folder overriding the manifest's base.model (fingerprint still checked)
    data: str = ""  # local dataset overriding the manifest's data.source (digest still checked)
    gradient_checkpointing: bool = False  # trade compute for activation memory
    min_peers: int = 1  # wait until this many peers (self included) are visible before the first round
    peer_wait: float = 60.0  # seconds to wait for min_peers
    max_rounds: int = 0  # stop after this node trained this many rounds in this run (0 = no limit; the manifest's max_rounds still ends the swarm)
    checkpoint_every: int = 1  # rounds between checkpoints
    metrics_port: int = 0  # Prometheus endpoint on 127.0.0.1:<port>; 0 disables
    dashboard_port: int = 0  # live web dashboard on 127.0.0.1:<port>; 0 disables
    stall_factor: float = 10.0  # stalled (status, metrics, healthcheck) when no round ended for this many times the last round's duration
    stall_min_s: float = 300.0  # ... and for at least this many seconds (also the limit before the first round)
    socket: str = ""  # control socket; default <home>/node.sock
    log_format: str = "human"  # human | json
    log_level: str = "info"  # debug | info | warning | error
    threads: int = 0  # torch CPU threads; 0 = torch default

    @property
    def home_dir(self) -> Path:
        return Path(self.home).expanduser() if self.home else default_home()

    @property
    def key_path(self) -> Path:
        return Path(self.key).expanduser() if self.key else self.home_dir / "identity.key"

    @property
    def socket_path(self) -> Path:
        return Path(self.socket).expanduser() if self.socket else self.home_dir / "node.sock"

    def swarm_dir(self, swarm_id: str) -> Path:
        """Where this node keeps one swarm's ledger, checkpoints and progress."""
        return self.home_dir / "swarms" / swarm_id[:16]


FIELDS = {f.name: f for f in dataclasses.fields(NodeConfig)}


def _coerce(name: str, value: Any, source: str) -> Any:
    f = FIELDS[name]
    default = f.default
    try:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return value.lower() in ("1", "true", "yes", "on")
            raise ValueError("expected true/false")
        if isinstance(default, int):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError("expected an integer")
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, tuple):
            if isinstance(value, str):
                return tuple(v for v in (x.strip() for x in value.split(",")) if v)
            if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                return tuple(value)
            raise ValueError("expected a list of strings")
        if not isinstance(value, str):
            raise ValueError("expected a string")
        return value
    except ValueError as e:
        raise ConfigError(f"{source}: bad value {value!r} for '{name}': {e}") from None


def load_node_config(path: str | os.PathLike | None = None, *, env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None) -> NodeConfig:
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}  # field -> where its value came from (file, variable or flag), for errors
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(f"node config {p} not found")
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
        raw = raw.get("node", raw)
        unknown = sorted(set(raw) - set(FIELDS))
        if unknown:
            raise ConfigError(f"{p}: unknown key(s) {unknown}; allowed: {sorted(FIELDS)}")
        values.update({k: _coerce(k, v, str(p)) for k, v in raw.items()})
        sources.update(dict.fromkeys(raw, str(p)))
    env = os.environ if env is None else env
    for name in FIELDS:
        var = f"SWARMTUNE_{name.upper()}"
        if var in env and env[var] != "":
            sources[name] = f"environment {var}"
            values[name] = _coerce(name, env[var], sources[name])
    for name, v in (overrides or {}).items():
        if v is not None:
            sources[name] = f"--{name.replace('_', '-')}"
            values[name] = _coerce(name, v, sources[name])
    for name, value in values.items():
        values[name] = _check(name, value, sources[name])
    return NodeConfig(**values)


# Allowed values of the fields a typo would break later (deep in a run, or as a traceback);
# checked where the config is read, so the error names where the bad value came from.
CHOICES = {"log_level": ("debug", "info", "warning", "error"), "log_format": ("human", "json")}
RANGES = {  # field: (lowest, highest or None)
    "min_peers": (1, None), "peer_wait": (0, None), "checkpoint_every": (0, None), "max_rounds": (0, None),
    "metrics_port": (0, 65535), "threads": (0, None), "dashboard_port": (0, 65535), "stall_factor": (1, None),
    "stall_min_s": (0, None),
}


def _check(name: str, value: Any, source: str) -> Any:
    if name in CHOICES:
        allowed = CHOICES[name]
        if value.lower() not in allowed:
            raise ConfigError(f"{source}: {name} = {value!r} is not allowed (allowed: {', '.join(allowed)})")
        return value.lower()
    if name in RANGES:
        low, high = RANGES[name]
        if value < low or (high is not None and value > high) or value != value:  # value != value: NaN
            allowed = f"{low}..{high}" if high is not None else f">= {low}"
            raise ConfigError(f"{source}: {name} = {value!r} is out of range (allowed: {allowed})")
    return value
