"""Hard faults and bad input from a user's side: a clear message and exit 2 every time, nothing lost.

One key run twice (same machine: the key lock; another machine: the swarm's heartbeats), storage that
is read-only or fills up (a real tmpfs), `--log-format json` with every line JSON, an internal error
reported in one line with the traceback in a file, and `ledger verify` on a torn tail. Nodes are real
`swarmtune run` processes on 127.0.0.1; each is killed by process group at teardown.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import time

import pytest

from node.cli import main
from tests.conftest import start_test_dht, verify_ledgers, write_test_manifest


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
        # when the hub's dial-back reaches the first node instead of the twin, p2pd refuses to start; the twin
        # is then looked for from a throwaway reader, with the same answer
        from node.manifest import load_manifest
        from node.swarm.dht import SwarmError
        from node.swarm.swarm import _refuse_if_twin

        with pytest.raises(SwarmError, match="is already running in this swarm"):
            _refuse_if_twin(first.info()["peer_id"], load_manifest(manifest), peers)
        _refuse_if_twin("12D3KooWBdE4pJ5h5TGNsB3StCVVBWy8Mkq2AkEBF6qCCa1bNh7q", load_manifest(manifest), peers)  # nobody
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


def test_a_full_disk_anywhere_is_the_users_error_not_a_bug(tmp_path, monkeypatch, capsys):
    import node.cli.ledger

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out.csv"))

    monkeypatch.setenv("SWARMTUNE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(node.cli.ledger, "_export", full)
    assert main(["ledger", "export", "--ledger", str(tmp_path / "x.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "out.csv" in err and "free space" in err, err
    assert not (tmp_path / "home").exists()  # no crash report: nothing to report


# ---------------------------------------------------------------- storage: read-only, too small, full mid-run


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(size, ro=False) -> a folder on a fresh tmpfs of that size; unmounted at teardown."""
    mounts = []

    def mount(size: str, ro: bool = False):
        where = tmp_path / f"disk{len(mounts)}"
        where.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True).returncode:
            pytest.skip("mounting a tmpfs needs root")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.parametrize("size,ro,words", [("1m", True, "read-only file system"), ("2m", False, "free on the disk")])
def test_read_only_or_too_small_home_is_refused_before_joining(tmp_path, tiny_base, small_disk, size, ro, words, capsys):
    disk = small_disk(size, ro)
    manifest = write_test_manifest(tmp_path / "swarm.toml", tiny_base)
    assert _run(manifest, disk / "home") == 2
    err = capsys.readouterr().err
    assert words in err and "--home" in err and "Traceback" not in err, err
    assert _files(disk) == []


def _all_json(text: str) -> None:
    for line in text.splitlines():
        try:
            json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None


@pytest.mark.swarm
@pytest.mark.timeout(240)
def test_disk_full_mid_run_stops_cleanly_and_a_restart_resumes(tmp_path, tiny_base, spawn_node, small_disk):
    from node import checkpoint
    from node.manifest import load_manifest

    disk = small_disk("8m")
    manifest = write_test_manifest(tmp_path / "swarm.toml", tiny_base, rounds={"max_rounds": 1000})
    node = spawn_node(manifest, "full", "--log-format", "json", home=disk / "home")
    node.wait_round(2)
    with open(disk / "filler", "wb") as f:  # what another program on the disk does
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    assert node.wait_exit(timeout=90) == 2
    log = node.log.read_text()
    _all_json(log)  # the error too, and the libraries' warnings and progress
    assert "No space left on device" in log and "free space on the disk" in log and "resumes from that checkpoint" in log, log
    ckdir = node.workdir / "checkpoints"
    assert [p.name for p in ckdir.iterdir() if not p.name.startswith("round-")] == []  # no temp file left
    last = checkpoint.load_latest(ckdir, load_manifest(manifest).swarm_id)
    assert last is not None and last.round >= 2
    verify_ledgers(manifest, node)

    (disk / "filler").unlink()
    again = spawn_node(manifest, "again", "--max-rounds", "1", home=disk / "home")
    assert again.wait_exit(timeout=120) == 0, again.log.read_text()[-3000:]
    assert f"resumed from checkpoint round-{last.round:08d}.safetensors (round {last.round})" in again.log.read_text()
    assert again.rounds()[-1]["round"] >= last.round
    verify_ledgers(manifest, again)


def test_a_checkpoint_written_in_the_background_holds_the_round_it_was_taken_at_and_a_full_disk_is_raised_after(tmp_path, small_disk):
    """checkpoint.Writer: the next round changes the tensors while the write runs; the file holds them as they were
    at submit. A write the disk refuses is raised by the next submit, with no temp file and the older ones intact."""
    import torch
    from node import checkpoint
    from node.durable import StorageError

    disk = small_disk("3m")
    writer = checkpoint.Writer()
    x = torch.arange(2**18, dtype=torch.float32)  # 1 MiB
    writer.submit(disk / "ck", round=1, opt_step=1, ledger_seq=0, swarm_id="s", tensors={"param/x": x})
    x.add_(1.0)  # what the next round does to the live tensor
    writer.wait()
    got = checkpoint.load_latest(disk / "ck", "s")
    assert got.round == 1 and torch.equal(got.tensors["param/x"], torch.arange(2**18, dtype=torch.float32))
    big = torch.zeros(2**19)  # 2 MiB: does not fit beside the first
    writer.submit(disk / "ck", round=2, opt_step=2, ledger_seq=1, swarm_id="s", tensors={"param/x": big})
    with pytest.raises(StorageError, match="No space left"):
        writer.submit(disk / "ck", round=3, opt_step=3, ledger_seq=2, swarm_id="s", tensors={"param/x": x})
    writer.wait()  # nothing in flight: the refused submit started nothing
    assert [p.name for p in (disk / "ck").iterdir()] == ["round-00000001.safetensors"]
    assert checkpoint.load_latest(disk / "ck", "s").round == 1


# ---------------------------------------------------------------- ledger verify on a torn tail


def test_ledger_verify_fails_on_a_torn_tail_unless_allowed(tmp_path, capsys):
    from node.identity import new_identity
    from node.ledger import Ledger

    swarm_id = "ab" * 32
    key = new_identity().private_key
    path = tmp_path / "ledger.jsonl"
    with Ledger.open(path) as ledger:
        for r in range(2):
            ledger.append_new(key, swarm_id=swarm_id, round=r, shards=(0,), samples=8, tokens=64, loss_before=0,
                              loss_after=0, adapter_hash="0" * 64, data_commitment="0" * 64, grad_commitment="0" * 64,
                              start_ms=r, end_ms=r + 1)
    whole = path.read_bytes()
    path.write_bytes(whole + whole.splitlines()[-1][:50])  # a crash mid-write of a third record
    args = ["ledger", "verify", "--ledger", str(path), "--swarm-id", swarm_id, "--max-samples", "100"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "torn" in err and "--allow-torn-tail" in err and "verification FAILED" in err, err
    assert main([*args, "--allow-torn-tail"]) == 0
    path.write_bytes(whole)
    assert main(args) == 0


# ---------------------------------------------------------------- bad input: one table, every row exit 2 and nothing written


def _manifest_text(path, old, new):
    path.write_text(path.read_text().replace(old, new, 1))


def _bad_key(home, mode, text=None):
    from node.identity import generate_identity

    generate_identity(home / "identity.key")
    if text is not None:
        (home / "identity.key").write_text(text)
    (home / "identity.key").chmod(mode)


# name: (edit(tmp_path, manifest, home) -> extra args, words in the message)
BAD_INPUT = {
    "negative lr": (lambda t, m, h: _manifest_text(m, "lr = 0.003", "lr = -0.003"), ["[optim] lr = -0.003", "allowed: > 0"]),
    "zero rank": (lambda t, m, h: _manifest_text(m, "rank = 8", "rank = 0"), ["[lora] rank = 0", ">= 1"]),
    "beta of 1": (lambda t, m, h: _manifest_text(m, "0.999,", "1.0,"), ["betas", "[0, 1)"]),
    "log level": (lambda t, m, h: ["--log-level", "shouty"], ["--log-level", "shouty", "debug, info, warning, error"]),
    "toml syntax": (lambda t, m, h: _manifest_text(m, "[optim]", "[optim\n"), ["not valid TOML", "line", "col"]),
    "unknown key": (lambda t, m, h: _manifest_text(m, "[optim]", "[optim]\nlearning_rate = 1.0"), ["learning_rate", "allowed"]),
    "bad multiaddr": (lambda t, m, h: ["--initial-peers", "/ip4/127.0.0.1/tcp/notaport"], ["notaport"]),
    "key 0644": (lambda t, m, h: _bad_key(h, 0o644), ["permissions 0644", "chmod 600"]),
    "corrupt key": (lambda t, m, h: _bad_key(h, 0o600, "not a key"), ["corrupt", "backup"]),
    "shard 7": (lambda t, m, h: ["--shards", "7"], ["shards 0..1"]),
    "cuda without gpu": (lambda t, m, h: ["--device", "cuda"], ["cuda", "--device cpu"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_refused_with_the_fix_and_nothing_written(tmp_path, tiny_base, case, capsys):
    if case == "cuda without gpu":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    edit, words = BAD_INPUT[case]
    manifest = write_test_manifest(tmp_path / "swarm.toml", tiny_base)
    home = tmp_path / "home"
    home.mkdir()
    extra = edit(tmp_path, manifest, home) or []
    before = _files(home)
    assert _run(manifest, home, *extra) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words) and "Traceback" not in err, (case, err)
    assert _files(home) == before
