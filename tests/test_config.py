"""Node config precedence, shipped example configs, and manifest parsing/round-trips."""

from __future__ import annotations

import dataclasses

import pytest

from node.config import ConfigError, NodeConfig, load_node_config
from node.manifest import ManifestError, dump_manifest, load_manifest, parse_manifest
from tests.conftest import REPO, write_test_manifest

EXAMPLES = sorted((REPO / "node" / "builtin").glob("*.toml"))


def test_there_are_shipped_example_configs():
    assert EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_shipped_example_config_loads(path):
    cfg = load_node_config(path, env={})
    assert isinstance(cfg, NodeConfig)


def test_precedence_file_then_env_then_flags(tmp_path):
    f = tmp_path / "node.toml"
    f.write_text('[node]\nshards = "1"\nmin_peers = 3\nmetrics_port = 9000\ninitial_peers = ["/ip4/1.2.3.4/tcp/1/p2p/x"]\n')
    env = {"SWARMTUNE_MIN_PEERS": "4", "SWARMTUNE_METRICS_PORT": "9001", "SWARMTUNE_INITIAL_PEERS": "a,b"}
    cfg = load_node_config(f, env=env, overrides={"metrics_port": "9002"})
    assert cfg.shards == "1"  # file only
    assert cfg.min_peers == 4  # env beats file
    assert cfg.metrics_port == 9002  # flag beats env
    assert cfg.initial_peers == ("a", "b")
    assert load_node_config(None, env={}).min_peers == 1  # defaults


def test_config_errors_name_the_source(tmp_path):
    f = tmp_path / "node.toml"
    f.write_text("[node]\nshardz = 1\n")
    with pytest.raises(ConfigError, match="shardz"):
        load_node_config(f, env={})
    with pytest.raises(ConfigError, match="SWARMTUNE_MIN_PEERS"):
        load_node_config(None, env={"SWARMTUNE_MIN_PEERS": "many"})


def test_manifest_round_trip_keeps_the_swarm_id(tmp_path, tiny_base):
    path = write_test_manifest(tmp_path / "swarm.toml", tiny_base)
    m = load_manifest(path)
    again = tmp_path / "again.toml"
    again.write_text(dump_manifest(m))
    assert load_manifest(again).swarm_id == m.swarm_id
    # where the files live is not part of the id; what they are is
    moved = dataclasses.replace(m, base=dataclasses.replace(m.base, model="/elsewhere"))
    assert moved.swarm_id == m.swarm_id
    other = dataclasses.replace(m, optim=dataclasses.replace(m.optim, lr=m.optim.lr * 2))
    assert other.swarm_id != m.swarm_id


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"swarm": {"name": "x"}, "base": {"model": "m", "fingerprint": "0" * 64}}, "missing \\[data\\]"),
        ({"swarm": {"name": "x"}, "base": {"model": "m", "fingerprint": "0" * 64}, "data": {"source": "d", "digest": "e"}, "lora": {"rank": "8"}}, "lora.*rank.*integer"),
        ({"swarm": {"name": "x"}, "base": {"model": "m", "fingerprint": "0" * 64}, "data": {"source": "d", "digest": "e"}, "extra": {}}, "unknown section"),
        ({"swarm": {"name": "x"}, "base": {"model": "m", "fingerprint": "0" * 64}, "data": {"source": "d", "digest": "e"}, "shards": {"plan": [[0, 2], [3, 4]]}}, "contiguous"),
        ({"swarm": {"name": "x", "format": 9}, "base": {"model": "m", "fingerprint": "0" * 64}, "data": {"source": "d", "digest": "e"}}, "upgrade"),
    ],
)
def test_manifest_errors_name_the_field(raw, message):
    with pytest.raises(ManifestError, match=message):
        parse_manifest(raw)


def test_missing_manifest_says_how_to_make_one(tmp_path):
    with pytest.raises(ManifestError, match="swarm init"):
        load_manifest(tmp_path / "nope.toml")


def test_swarm_init_defaults_are_the_manifests_own(tmp_path, st_cache) -> None:
    """`swarm init` takes every default from the manifest dataclasses, so the two cannot drift."""
    import dataclasses

    from node.cli import main
    from node.manifest import AveragingSection, BaseSection, CreditSection, DataSection, LoraSection, OptimSection, RoundSection

    out = tmp_path / "swarm.toml"
    assert main(["swarm", "init", "--out", str(out)]) == 0
    m = load_manifest(out)
    assert (m.lora, m.optim, m.rounds, m.averaging, m.credit) == (
        LoraSection(), OptimSection(), RoundSection(), AveragingSection(), CreditSection())
    defaults = {f.name: f.default for f in dataclasses.fields(DataSection)}
    assert (m.data.max_length, m.data.packing) == (defaults["max_length"], defaults["packing"])
    defaults = {f.name: f.default for f in dataclasses.fields(BaseSection)}
    assert (m.base.dtype, m.base.quantization) == (defaults["dtype"], defaults["quantization"])


def test_group_commands_alone_print_their_own_help(capsys) -> None:
    from node.cli import main

    for group, word in (("swarm", "init"), ("ledger", "verify")):
        assert main([group]) == 2
        out = capsys.readouterr().out
        assert f"usage: swarmtune {group}" in out and word in out
