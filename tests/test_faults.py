"""Hard faults and bad input from a user's side: a clear message and exit 2 every time, nothing lost.

One key run twice (same machine: the key lock; another machine: the swarm's heartbeats), storage that
is read-only or fills up (a real tmpfs), `--log-format json` with every line JSON, an internal error
reported in one line with the traceback in a file, and `ledger verify` on a torn tail. Nodes are real
`swarmtune run` processes on 127.0.0.1; each is killed by process group at teardown.
"""

from __future__ import annotations

import shutil
import time

import pytest

from node.cli import main
from tests.conftest import start_test_dht, write_test_manifest


def _run(manifest, home, *extra):
    return main(["run", "--manifest", str(manifest), "--home", str(home), "--create-key",
                 "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--threads", "1", *extra])


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# ---------------------------------------------------------------- one key, two nodes


@pytest.mark.swarm
@pytest.mark.timeout(180)
def test_same_key_in_a_second_home_on_this_machine_is_refused(tmp_path, tiny_base, spawn_node, capsys):
    manifest = write_test_manifest(tmp_path / "swarm.toml", tiny_base, rounds={"max_rounds": 1000})
    first = spawn_node(manifest, "first")
    first.wait_info()
    second = tmp_path / "second"
    second.mkdir()
    shutil.copy2(first.home / "identity.key", second / "identity.key")
    t0 = time.monotonic()
    assert _run(manifest, second) == 2
    took = time.monotonic() - t0
    err = capsys.readouterr().err
    assert "already in use by another swarmtune node on this machine" in err and str(first.home) in err, err
    assert "--home" in err and "--create-key" in err, err  # how to run a second node
    assert took < 10, f"refused only after {took:.1f}s (the key lock is taken before the model loads)"
    assert _files(second) == ["identity.key"]
    assert first.popen.poll() is None  # the first node is untouched


@pytest.mark.swarm
@pytest.mark.timeout(240)
def test_same_key_on_another_machine_is_refused_within_a_heartbeat(tmp_path, tiny_base, spawn_node):
    """'Another machine': the second node's key lock lives in another TMPDIR, so only the swarm can tell."""
    manifest = write_test_manifest(tmp_path / "swarm.toml", tiny_base, rounds={"max_rounds": 1000})
    hub = start_test_dht(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        peers = [str(a) for a in hub.get_visible_maddrs()]
        first = spawn_node(manifest, "first", "--initial-peers", *peers)
        first.wait_round(1)  # it trains, so its heartbeat is in the DHT and refreshed every peer_ttl/4
        second = tmp_path / "second"
        second.mkdir()
        shutil.copy2(first.home / "identity.key", second / "identity.key")
        other_tmp = tmp_path / "machine-b"
        other_tmp.mkdir()
        twin = spawn_node(manifest, "twin", "--initial-peers", *peers, home=second, env={"TMPDIR": str(other_tmp)})
        assert twin.wait_exit(timeout=120) == 2
        log = twin.log.read_text()
        assert "is already running in this swarm" in log and "another machine" in log and "--home" in log, log
        assert "Traceback" not in log, log
        assert _files(second) == ["identity.key"]  # refused before it wrote anything
        assert first.popen.poll() is None
    finally:
        hub.shutdown()


# ---------------------------------------------------------------- no raw traceback


def test_internal_error_is_one_line_with_the_traceback_in_a_file(tmp_path, monkeypatch, capsys):
    import node.cli.ledger

    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setenv("SWARMTUNE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(node.cli.ledger, "_show", broken)  # a bug in a command handler
    assert main(["ledger", "show", "--ledger", str(tmp_path / "x.jsonl")]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "internal error in `swarmtune ledger`" in err and "KeyError" in err, err
    (crash,) = (tmp_path / "home").glob("crash-*.log")
    assert str(crash) in err
    assert "Traceback" in crash.read_text() and "a bug" in crash.read_text()
