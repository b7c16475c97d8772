"""Node config precedence, shipped example configs, and manifest parsing/round-trips."""

from __future__ import annotations

import dataclasses
from pathlib import Path

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
    from node.manifest import (
        AveragingSection, BaseSection, CreditSection, DataSection, LoraSection, OptimSection, RoundSection, SyncSection,
    )

    out = tmp_path / "swarm.toml"
    assert main(["swarm", "init", "--out", str(out)]) == 0
    m = load_manifest(out)
    assert (m.lora, m.optim, m.rounds, m.averaging, m.sync, m.credit) == (
        LoraSection(), OptimSection(), RoundSection(), AveragingSection(), SyncSection(), CreditSection())
    defaults = {f.name: f.default for f in dataclasses.fields(DataSection)}
    assert (m.data.max_length, m.data.packing) == (defaults["max_length"], defaults["packing"])
    defaults = {f.name: f.default for f in dataclasses.fields(BaseSection)}
    assert (m.base.dtype, m.base.quantization) == (defaults["dtype"], defaults["quantization"])


def test_swarm_init_diloco_takes_its_own_inner_steps_default(tmp_path, st_cache) -> None:
    from node.cli import main
    from node.manifest import DILOCO_INNER_STEPS

    out = tmp_path / "swarm.toml"
    assert main(["swarm", "init", "--out", str(out), "--sync", "diloco"]) == 0
    m = load_manifest(out)
    assert (m.sync.mode, m.sync.inner_steps, m.sync.wire, m.sync.overlap) == ("diloco", DILOCO_INNER_STEPS, "int8", True)
    assert m.credit_cap == m.rounds.target_batch_size * DILOCO_INNER_STEPS
    assert main(["swarm", "init", "--out", str(out), "--force", "--sync", "diloco", "--inner-steps", "5", "--no-overlap"]) == 0
    assert (load_manifest(out).sync.inner_steps, load_manifest(out).sync.overlap) == (5, False)


def test_swarm_init_decays_the_learning_rate_of_a_run_with_an_end(tmp_path, st_cache) -> None:
    from node.cli import main

    out = tmp_path / "swarm.toml"
    assert main(["swarm", "init", "--out", str(out), "--max-rounds", "200"]) == 0
    assert (load_manifest(out).optim.schedule, load_manifest(out).rounds.max_rounds) == ("cosine", 200)
    assert main(["swarm", "init", "--out", str(out), "--force", "--max-rounds", "200", "--schedule", "constant"]) == 0
    assert load_manifest(out).optim.schedule == "constant"
    assert main(["swarm", "init", "--out", str(out), "--force"]) == 0  # no end: a cosine has nothing to decay to
    assert load_manifest(out).optim.schedule == "constant"


def test_group_commands_alone_print_their_own_help(capsys) -> None:
    from node.cli import main

    for group, word in (("swarm", "init"), ("ledger", "verify")):
        assert main([group]) == 2
        out = capsys.readouterr().out
        assert f"usage: swarmtune {group}" in out and word in out


# ---------------------------------------------------------------- value ranges


def _raw(**sections):
    raw = {"swarm": {"name": "x"}, "base": {"model": "m", "fingerprint": "0" * 64}, "data": {"source": "d", "digest": "e"}}
    for name, fields in sections.items():
        raw.setdefault(name, {}).update(fields)
    return raw


OUT_OF_RANGE = [
    ("lora", "rank", 0, ">= 1"), ("lora", "alpha", 0, ">= 1"), ("lora", "dropout", 1.0, "[0, 1)"),
    ("lora", "dropout", -0.1, "[0, 1)"), ("lora", "init_seed", -1, "[0, 2**63)"), ("data", "max_length", 0, ">= 1"),
    ("data", "shuffle_seed", -1, "[0, 2**63)"),
    ("optim", "lr", -1.0, "> 0"), ("optim", "lr", 0.0, "> 0"), ("optim", "weight_decay", -0.5, ">= 0"),
    ("optim", "eps", 0.0, "> 0"), ("optim", "warmup_rounds", -1, ">= 0"), ("optim", "max_grad_norm", -1.0, ">= 0"),
    ("rounds", "target_batch_size", 0, ">= 1"), ("rounds", "microbatch_size", 0, ">= 1"), ("rounds", "max_rounds", -3, ">= 0"),
    ("averaging", "matchmaking_time", 0.0, "> 0"), ("averaging", "timeout", -1.0, "> 0"),
    ("averaging", "peer_ttl", 0.0, "> 0"), ("sync", "inner_steps", 0, "[1, 100000]"), ("sync", "outer_lr", 0.0, "> 0"),
    ("sync", "outer_momentum", 1.0, "[0, 1)"),
    ("credit", "max_samples_per_round", -1, ">= 0"),
]


@pytest.mark.parametrize("section,name,value,allowed", OUT_OF_RANGE, ids=lambda x: str(x))
def test_every_bounded_value_is_checked_and_the_error_names_file_field_value_and_range(section, name, value, allowed):
    with pytest.raises(ManifestError) as err:
        parse_manifest(_raw(**{section: {name: value}}), where="my.toml")
    msg = str(err.value)
    assert msg.startswith("my.toml: ") and f"[{section}] {name} = {value!r}" in msg and f"(allowed: {allowed}" in msg, msg
    assert err.value.field == f"{section}.{name}"


@pytest.mark.parametrize("betas", [[0.9], [0.9, 1.0], [-0.1, 0.9], [0.9, "x"]])
def test_betas_are_two_numbers_in_the_unit_interval(betas):
    with pytest.raises(ManifestError, match=r"\[optim\] betas = .*two numbers, each in \[0, 1\)"):
        parse_manifest(_raw(optim={"betas": betas}))


def test_sync_modes_and_the_removed_fixed_point_bits():
    m = parse_manifest(_raw(sync={"mode": "diloco", "inner_steps": 20, "wire": "int32"}))
    assert (m.sync.mode, m.sync.inner_steps, m.sync.wire) == ("diloco", 20, "int32")
    with pytest.raises(ManifestError, match=r"\[sync\] wire = 'int4' must be one of int8, int32"):
        parse_manifest(_raw(sync={"wire": "int4"}))
    with pytest.raises(ManifestError, match=r"inner_steps = 5 needs mode = \"diloco\""):
        parse_manifest(_raw(sync={"inner_steps": 5}))
    assert parse_manifest(_raw(sync={"mode": "diloco", "inner_steps": 20, "overlap": True})).sync.overlap
    with pytest.raises(ManifestError, match=r"overlap = true needs mode = \"diloco\"") as err:
        parse_manifest(_raw(sync={"overlap": True}))
    assert err.value.field == "sync.overlap"
    with pytest.raises(ManifestError, match=r"expected true/false"):
        parse_manifest(_raw(sync={"mode": "diloco", "overlap": "yes"}))
    # a manifest from before the wire grids names the line to delete instead of listing allowed keys
    with pytest.raises(ManifestError, match=r"'fixed_point_bits' is no longer used: .*\[sync\] wire.*delete the line"):
        parse_manifest(_raw(averaging={"fixed_point_bits": 30}))


def test_choices_name_the_allowed_values():
    with pytest.raises(ManifestError, match=r"\[base\] dtype = 'float16' must be one of float32, bfloat16"):
        parse_manifest(_raw(base={"dtype": "float16"}))
    with pytest.raises(ManifestError, match="timeout = 2.0 must be greater than matchmaking_time = 5.0"):
        parse_manifest(_raw(averaging={"matchmaking_time": 5.0, "timeout": 2.0}))


# ---------------------------------------------------------------- hub ids and revisions


def test_revision_is_optional_left_out_when_empty_and_not_part_of_the_swarm_id(tmp_path, tiny_base):
    path = write_test_manifest(tmp_path / "swarm.toml", tiny_base)
    m = load_manifest(path)
    assert m.base.revision == "" and "revision" not in m.to_dict()["base"] and "revision" not in path.read_text()
    hub = dataclasses.replace(m, base=dataclasses.replace(m.base, model="myorg/tiny", revision="a" * 40))
    assert hub.swarm_id == m.swarm_id  # where and at which name the base is fetched; the fingerprint pins it
    again = tmp_path / "hub.toml"
    again.write_text(dump_manifest(hub))
    loaded = load_manifest(again)
    assert (loaded.base.model, loaded.base.revision) == ("myorg/tiny", "a" * 40) and loaded.swarm_id == m.swarm_id
    from node.manifest import manifest_diff

    assert manifest_diff(hub.to_dict(), m.to_dict()) == []
    with pytest.raises(ManifestError, match="revision = 'main' applies only to a hub id"):
        parse_manifest(_raw(base={"model": "builtin:tiny", "revision": "main"}))
    with pytest.raises(ManifestError, match="revision = 'a b' is not a commit"):
        parse_manifest(_raw(base={"model": "org/name", "revision": "a b"}))


def test_shuffle_seed_orders_the_data_alone_and_is_left_out_when_unset(tmp_path, tiny_base):
    from node.data import round_batch_indices

    plain = load_manifest(write_test_manifest(tmp_path / "a.toml", tiny_base))
    assert "shuffle_seed" not in plain.to_dict()["data"] and plain.order_key == plain.swarm_id  # ids as before
    other_wire = load_manifest(write_test_manifest(tmp_path / "b.toml", tiny_base, sync={"wire": "int32"}))
    assert round_batch_indices(4000, plain.order_key, 3, 24) != round_batch_indices(4000, other_wire.order_key, 3, 24)
    seeded = [load_manifest(write_test_manifest(tmp_path / f"{w}.toml", tiny_base, data_fields={"shuffle_seed": 7},
                                                sync={"wire": w})) for w in ("int8", "int32")]
    assert seeded[0].order_key == "shuffle-seed:7"
    # two swarms (two ids) that differ only in their wire visit the same batches in the same order
    assert seeded[0].swarm_id != seeded[1].swarm_id and seeded[0].order_key == seeded[1].order_key
    assert seeded[0].to_dict()["data"]["shuffle_seed"] == 7 and seeded[0].swarm_id != plain.swarm_id


def test_hub_ids_stay_hub_ids_and_relative_paths_resolve_beside_the_manifest(tmp_path, tiny_base, monkeypatch):
    import shutil

    folder = tmp_path / "org"
    folder.mkdir()
    shutil.copytree(tiny_base, folder / "models" / "tiny")
    m = load_manifest(write_test_manifest(folder / "swarm.toml", tiny_base))
    monkeypatch.chdir(tmp_path)
    assert m.resolve_path("myorg/animal-llama") == "myorg/animal-llama"
    assert m.resolve_path("models/tiny") == str(folder / "models" / "tiny")  # looks like org/name, but exists here
    assert m.resolve_path("./missing") == str(folder / "missing")  # named where a relative path points
    assert m.resolve_path("data/x.jsonl") == "data/x.jsonl"  # not a path anywhere: taken as written
    assert m.resolve_path("~/x") == str(Path.home() / "x")
    assert m.resolve_path("builtin:tiny") == "builtin:tiny" and m.resolve_path("hf:org/ds") == "hf:org/ds"
    from node.manifest import looks_like_hub_id

    assert looks_like_hub_id("Qwen/Qwen2.5-0.5B") and looks_like_hub_id("myorg/tiny")
    assert not any(map(looks_like_hub_id, ["tiny", "a/b/c", "./a/b", "/a/b", "a--b/c", "a/..b", "a/b-"]))


# ---------------------------------------------------------------- swarm init checks every value before writing


def test_swarm_init_refuses_an_out_of_range_value_before_loading_anything(tmp_path, capsys):
    from node.cli import main

    out = tmp_path / "swarm.toml"
    assert main(["swarm", "init", "--out", str(out), "--lr", "-1"]) == 2
    err = capsys.readouterr().err
    assert "lr = -1.0" in err and "(allowed: > 0)" in err and "--lr" in err and str(out) in err, err
    assert not out.exists()
    assert main(["swarm", "init", "--out", str(out), "--averaging-timeout", "0"]) == 2
    assert "--averaging-timeout" in capsys.readouterr().err and not out.exists()


def test_swarm_init_refuses_target_modules_the_model_lacks(tmp_path, st_cache, capsys):
    from node.cli import main

    out = tmp_path / "swarm.toml"
    assert main(["swarm", "init", "--out", str(out), "--target-modules", "nonexistent"]) == 2
    err = capsys.readouterr().err
    assert "nonexistent" in err and "q_proj" in err and "down_proj" in err and "Traceback" not in err, err
    assert not out.exists()
    assert main(["swarm", "init", "--out", str(out), "--target-modules", "q_proj", "v_proj"]) == 0
    assert load_manifest(out).lora.target_modules == ("q_proj", "v_proj")


def test_swarm_init_revision_needs_a_hub_id(tmp_path, st_cache, capsys):
    from node.cli import main

    out = tmp_path / "swarm.toml"
    assert main(["swarm", "init", "--out", str(out), "--revision", "main"]) == 2
    assert "revision" in capsys.readouterr().err and not out.exists()


def test_help_shows_meaning_and_default_of_every_option():
    """export, demo and swarm init: a description, and every option's help says its default (or that it is required)."""
    import argparse

    from node.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    swarm_sub = next(a for a in sub["swarm"]._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, p in (("export", sub["export"]), ("demo", sub["demo"]), ("swarm init", swarm_sub["init"])):
        assert p.description and len(p.description) > 40, name
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            text = action.help or ""
            assert text and ("default" in text or (action.required and "required" in text)), (name, action.option_strings, text)


@pytest.mark.parametrize("field,value,words", [
    ("log_level", "shouty", "allowed: debug, info, warning, error"),
    ("min_peers", "0", "allowed: >= 1"),
    ("metrics_port", "70000", "allowed: 0..65535"),
    ("log_format", "xml", "allowed: human, json"),
])
def test_config_values_are_checked_where_read(field, value, words) -> None:
    with pytest.raises(ConfigError) as err:
        load_node_config(env={}, overrides={field: value})
    text = str(err.value)
    assert f"--{field.replace('_', '-')}" in text and f"{field} = " in text and value in text and words in text
