"""`swarmtune doctor`: real DHTs on 127.0.0.1, real key, model and data files."""

from __future__ import annotations

import json
import os
import re
import socket

import psutil
import pytest

from node.cli import main
from node.doctor import (
    FAIL, PASS, SKIP, WARN, check_base_model, check_data, check_disk, check_identity, check_initial_peers,
    check_p2p_daemon, serve_bandwidth_probe,
)
from node.identity import generate_identity
from node.manifest import load_manifest
from tests.conftest import write_test_manifest

LOCAL = "/ip4/127.0.0.1/tcp/0"


def _live_children() -> list[str]:
    """Our descendant processes that are still running (torch's shm manager is torch's own singleton)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and p.name() != "torch_shm_manager":
                out.append(f"{p.pid} {p.name()} {p.status()}")
            elif p.status() == psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} zombie")
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.fixture
def setup(tmp_path, tiny_base):
    """A good node: key in its home, manifest for the tiny base and the built-in data."""
    home = tmp_path / "home"
    home.mkdir()
    generate_identity(home / "identity.key")
    manifest = write_test_manifest(tmp_path / "swarm.toml", tiny_base)
    before = _live_children()
    yield home, manifest
    assert _live_children() == before, "doctor left processes behind"


def _doctor(capsys, monkeypatch, *argv) -> tuple[int, str]:
    monkeypatch.setenv("COLUMNS", "400")  # one table row per line, so a message is never split
    rc = main(["doctor", *argv])
    return rc, capsys.readouterr().out


def test_all_pass_json(setup, capsys, monkeypatch):
    home, manifest = setup
    rc, out = _doctor(capsys, monkeypatch, "--manifest", str(manifest), "--home", str(home), "--host-maddrs", LOCAL, "--json")
    report = json.loads(out)
    by_name = {c["name"]: c for c in report["checks"]}
    assert rc == 0 and report["ok"] is True, out
    for name in ("p2p daemon starts", "address reachable from a peer", "bandwidth to a peer", "GPU", "RAM",
                 "disk space", "identity key", "base model", "data"):
        assert by_name[name]["status"] in (PASS, WARN), by_name[name]
    for name in ("p2p daemon starts", "address reachable from a peer", "identity key", "base model", "data"):
        assert by_name[name]["status"] == PASS
    assert re.search(r"round trip [\d.]+ ms", by_name["address reachable from a peer"]["detail"])
    assert re.search(r"[\d.]+ MB/s", by_name["bandwidth to a peer"]["detail"])
    assert "peer id 12D3KooW" in by_name["identity key"]["detail"]
    assert all(c["fix"] for c in report["checks"] if c["status"] in (FAIL, WARN))


def test_port_taken_fails_with_the_daemons_error(setup, capsys, monkeypatch):
    home, manifest = setup
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        check, dht = check_p2p_daemon([f"/ip4/127.0.0.1/tcp/{port}"])
        assert dht is None and check.status == FAIL
        assert str(port) in check.detail and "already in use" in check.detail
        assert "--host-maddrs" in check.fix

        rc, out = _doctor(capsys, monkeypatch, "--home", str(home), "--host-maddrs", f"/ip4/127.0.0.1/tcp/{port}")
    assert rc == 1
    row = next(line for line in out.splitlines() if "p2p daemon starts" in line)
    assert "FAIL" in row and str(port) in row and "already in use" in row and "pick another" in row
    assert "Traceback" not in out
    assert "1 check(s) failed" in out


def test_malformed_multiaddr_is_a_readable_failure():
    check, dht = check_p2p_daemon(["/ip4/127.0.0.1/tpc/x"])
    assert dht is None and check.status == FAIL
    assert "/ip4/127.0.0.1/tpc/x" in check.detail and "unknown protocol" in check.detail
    assert "malformed" in check.fix


def test_initial_peers_reachable_and_unreachable(setup):
    from node.swarm.dht import start_dht

    dht = start_dht(host_maddrs=[LOCAL])
    try:
        maddr = str(dht.get_visible_maddrs()[0])
        ok = check_initial_peers([maddr])
        assert ok.status == PASS and re.search(r"[\d.]+ ms", ok.detail), ok
        assert "not measured (it serves no doctor bandwidth probe)" in ok.detail
        serve_bandwidth_probe(dht)
        measured = check_initial_peers([maddr])
        assert measured.status == PASS and re.search(r"bandwidth from .*: [\d.]+ MB/s", measured.detail), measured
        dead = "/ip4/127.0.0.1/tcp/9/p2p/" + maddr.rsplit("/p2p/", 1)[1]
        bad = check_initial_peers([dead])
        assert bad.status == FAIL and "bootstrap" in bad.detail and "initial peers" in bad.fix
        assert check_initial_peers(["/ip4/127.0.0.1/tcp/9"]).status == FAIL  # no /p2p/ part
    finally:
        dht.shutdown()


def test_identity_missing_open_and_corrupt(tmp_path):
    key = tmp_path / "identity.key"
    missing = check_identity(key)
    assert missing.status == FAIL and "no identity key" in missing.detail and "swarmtune keygen" in missing.fix
    generate_identity(key)
    assert check_identity(key).status == PASS
    os.chmod(key, 0o644)
    too_open = check_identity(key)
    assert too_open.status == FAIL and too_open.fix == f"chmod 600 {key}"
    os.chmod(key, 0o600)
    key.write_text("not a key")
    assert check_identity(key).status == FAIL


def test_missing_key_exits_1(tmp_path, capsys, monkeypatch):
    rc, out = _doctor(capsys, monkeypatch, "--home", str(tmp_path), "--no-network", "--json")
    report = json.loads(out)
    key = next(c for c in report["checks"] if c["name"] == "identity key")
    assert rc == 1 and report["ok"] is False
    assert key["status"] == FAIL and "swarmtune keygen" in key["fix"]
    assert next(c for c in report["checks"] if c["name"] == "base model")["status"] == SKIP


def test_base_model_fingerprint_mismatch_and_missing(tmp_path, tiny_base):
    good = write_test_manifest(tmp_path / "swarm.toml", tiny_base)
    text = good.read_text()
    fp = load_manifest(good).base.fingerprint
    other = tmp_path / "other.toml"
    other.write_text(text.replace(fp, "ab" * 32))
    check = check_base_model(load_manifest(other))
    assert check.status == FAIL
    assert fp in check.detail and "ab" * 32 in check.detail and "--base-model" in check.fix

    missing = check_base_model(load_manifest(good), base_model=str(tmp_path / "nowhere"))
    assert missing.status == FAIL and "not found" in missing.detail and "--base-model" in missing.fix
    assert check_base_model(load_manifest(good)).status == PASS


def test_data_digest_mismatch(tmp_path, tiny_base):
    m = load_manifest(write_test_manifest(tmp_path / "swarm.toml", tiny_base))
    other = tmp_path / "other.jsonl"
    other.write_text('{"prompt": "1", "completion": "odd"}\n')
    check = check_data(m, data=str(other))
    assert check.status == FAIL and m.data.digest in check.detail and "--data" in check.fix
    assert check_data(m, data=str(tmp_path / "none.jsonl")).status == FAIL
    assert check_data(m).status == PASS


def test_fingerprint_mismatch_exits_1_in_the_table(setup, tmp_path, capsys, monkeypatch):
    home, manifest = setup
    fp = load_manifest(manifest).base.fingerprint
    bad = tmp_path / "bad.toml"
    bad.write_text(manifest.read_text().replace(fp, "cd" * 32))
    rc, out = _doctor(capsys, monkeypatch, "--manifest", str(bad), "--home", str(home), "--no-network")
    assert rc == 1
    row = next(line for line in out.splitlines() if "base model" in line)
    assert "FAIL" in row and fp in row and "cd" * 32 in row


def test_disk_below_minimum_fails(tmp_path):
    check = check_disk(tmp_path / "not-yet", min_free=1 << 60)
    assert check.status == FAIL and "--home" in check.fix
    assert check_disk(tmp_path).status == PASS


def test_gpu_reports_name_and_vram(monkeypatch):
    import torch

    from node.doctor import check_gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check_gpu().status == WARN and "CPU only" in check_gpu().detail
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Test GPU")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (6 * 1024**3, 8 * 1024**3))
    check = check_gpu()
    assert check.status == PASS and check.detail == "cuda:0 Test GPU, 8.0 GiB VRAM (6.0 GiB free)"
