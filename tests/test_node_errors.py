"""Bad input stops a node before it joins, with the cause and the fix, and writes nothing.

Each case runs the real `swarmtune run` entry point in-process and checks the exit code,
the message, and that the node's home folder holds no key, ledger or checkpoint.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from node.cli import main
from node.manifest import load_manifest, write_manifest
from tests.conftest import write_test_manifest


def _run(manifest, home, *extra):
    return main(["run", "--manifest", str(manifest), "--home", str(home), "--create-key",
                 "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--threads", "1", *extra])


def _assert_nothing_written(home):
    written = [p for p in home.rglob("*")] if home.exists() else []
    assert written == [], f"a failed start wrote {written}"


def _edit(manifest, section, **fields):
    m = load_manifest(manifest)
    m = dataclasses.replace(m, **{section: dataclasses.replace(getattr(m, section), **fields)})
    write_manifest(m, manifest)
    return manifest


def test_malformed_jsonl_line_names_file_and_line(tmp_path, tiny_base, capsys):
    data = tmp_path / "train.jsonl"
    good = json.dumps({"prompt": "1+1=", "completion": "2"})
    data.write_text("\n".join([good, good, '{"prompt": "2+2=", "completion": ', good]) + "\n")
    manifest = write_test_manifest(tmp_path / "swarm.toml", tiny_base, data=str(data))
    assert _run(manifest, tmp_path / "home") == 2
    err = capsys.readouterr().err
    assert f"{data}:3" in err and "JSON" in err, err
    _assert_nothing_written(tmp_path / "home")


def test_missing_model_folder(tmp_path, tiny_base, capsys):
    manifest = _edit(write_test_manifest(tmp_path / "swarm.toml", tiny_base), "base", model=str(tmp_path / "no-such-model"))
    assert _run(manifest, tmp_path / "home") == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and "not found" in err, err
    _assert_nothing_written(tmp_path / "home")


def test_mismatched_base_fingerprint(tmp_path, tiny_base, capsys):
    manifest = _edit(write_test_manifest(tmp_path / "swarm.toml", tiny_base), "base", fingerprint="ab" * 32)
    assert _run(manifest, tmp_path / "home") == 2
    err = capsys.readouterr().err
    assert "fingerprint" in err and "different model" in err, err
    _assert_nothing_written(tmp_path / "home")


def test_unknown_target_module(tmp_path, tiny_base, capsys):
    manifest = _edit(write_test_manifest(tmp_path / "swarm.toml", tiny_base), "lora", target_modules=("attn_qkv",))
    assert _run(manifest, tmp_path / "home") == 2
    err = capsys.readouterr().err
    assert "attn_qkv" in err and "q_proj" in err, err  # names the bad module and lists real ones
    _assert_nothing_written(tmp_path / "home")


def test_shards_not_in_plan(tmp_path, tiny_base, capsys):
    manifest = write_test_manifest(tmp_path / "swarm.toml", tiny_base)
    assert _run(manifest, tmp_path / "home", "--shards", "1,7") == 2
    assert "shards 0..1" in capsys.readouterr().err
    _assert_nothing_written(tmp_path / "home")


def test_shard_plan_that_does_not_fit_the_model(tmp_path, tiny_base, capsys):
    manifest = _edit(write_test_manifest(tmp_path / "swarm.toml", tiny_base), "shards", plan=((0, 3), (3, 6)))
    assert _run(manifest, tmp_path / "home") == 2
    assert "4 layers" in capsys.readouterr().err
    _assert_nothing_written(tmp_path / "home")


@pytest.mark.swarm
@pytest.mark.timeout(240)
def test_peer_with_another_manifest_is_refused(tmp_path, tiny_base, spawn_node, capsys):
    theirs = write_test_manifest(tmp_path / "theirs.toml", tiny_base, rounds={"max_rounds": 1000})
    first = spawn_node(theirs, "first")
    peers = first.wait_info()["maddrs"]
    mine = write_test_manifest(tmp_path / "mine.toml", tiny_base, optim={"lr": 0.01}, rounds={"max_rounds": 1000})
    assert _run(mine, tmp_path / "home", "--initial-peers", *peers) == 2
    err = capsys.readouterr().err
    assert "optim.lr" in err and "manifests differ" in err, err
    _assert_nothing_written(tmp_path / "home")


def test_out_of_range_manifest_value_names_file_field_value_and_range(tmp_path, tiny_base, capsys):
    manifest = write_test_manifest(tmp_path / "swarm.toml", tiny_base)
    manifest.write_text(manifest.read_text().replace("lr = 0.003", "lr = -0.5"))
    assert _run(manifest, tmp_path / "home") == 2
    err = capsys.readouterr().err
    assert str(manifest) in err and "[optim] lr = -0.5" in err and "allowed: > 0" in err, err
    _assert_nothing_written(tmp_path / "home")
