"""The control plane end to end: a real gRPC server on a real Unix socket, a small real NodeView.

Run: python -m pytest tests/test_control.py -q
Covers the RPCs (incl. record streaming with follow), the socket's privacy
(mode 0600; another user is refused by the kernel), stale/live socket handling,
the "no daemon" error, and the `swarmtune status/peers/shards/pause/resume/stop`
commands (tables and --json).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node.cli import main
from node.control import (
    ControlError,
    ControlServer,
    DaemonNotRunning,
    SocketInUse,
    record_summary,
)
from node.control_client import ControlClient
from protocol.peerid import peer_id_from_public_key
from protocol.record import (
    RECORD_VERSION,
    ZERO_HASH,
    ContributionRecord,
    public_bytes,
    sign_record,
    to_fixed,
    verify_signed,
)

ROOT = Path(__file__).resolve().parent.parent


class TinyNode:
    """A NodeView with plain counters: what a daemon would expose, minus the training."""

    def __init__(self) -> None:
        self.state = "training"
        self.round = 7
        self.loss: float | None = None
        self.calls: Counter[str] = Counter()
        self._records: list[dict] = []
        self._appended = threading.Condition()
        self.on_drain = None  # called by drain(), e.g. to stop the server like the daemon would
        self.key = Ed25519PrivateKey.generate()
        self.peer_id = peer_id_from_public_key(public_bytes(self.key))

    def status(self) -> dict:
        self.calls["status"] += 1
        return {
            "round": self.round, "loss": self.loss, "samples_per_s": 12.5, "tokens_per_s": 1600.0,
            "peers": 2, "state": self.state, "swarm_id": "swarm-abc", "peer_id": "12D3KooWTiny",
            "shards": [0, 2], "adapter_hash": "ab" * 16, "rss_bytes": 300 << 20, "peak_rss_bytes": 400 << 20,
            "gpu_memory_bytes": 0, "uptime_s": 3725.0, "last_round_s": 1.5, "last_round_at": time.time() - 3,
            "listen_maddrs": ["/ip4/127.0.0.1/tcp/4001"], "samples_total": 640, "tokens_total": 81920,
            "version": "0.1.0", "reachability": "outbound-only", "reachability_fix": "forward TCP port 4001",
            "stalled": False, "stall_reason": "",
        }

    def peers(self) -> list[dict]:
        return [
            {"peer_id": "12D3KooWPeerA", "multiaddrs": ["/ip4/10.0.0.2/tcp/4001"], "round": 7, "shards": [0, 1],
             "last_seen_s": 2.0, "reachability": "public"},
            {"peer_id": "12D3KooWPeerB", "multiaddrs": [], "round": 6, "shards": [2], "last_seen_s": 31.0,
             "reachability": "outbound-only"},
        ]

    def shards(self) -> list[dict]:
        return [
            {"index": 0, "layer_start": 0, "layer_end": 4, "trainers": 2, "local": True},
            {"index": 1, "layer_start": 4, "layer_end": 8, "trainers": 0, "local": False},
        ]

    def credit(self) -> list[dict]:
        return [{"peer_id": "12D3KooWTiny", "verified_rounds": 5, "claimed_rounds": 7, "receipted_rounds": 6,
                 "spot_checks_passed": 2, "spot_checks_failed": 1, "samples": 640, "tokens": 81920, "share": 0.5}]

    def append_record(self) -> dict:
        """Sign a real contribution record, as the daemon's ledger would, and announce it."""
        with self._appended:
            seq = len(self._records)
            prev = self._records[-1]["record_hash"] if self._records else ZERO_HASH
            record = ContributionRecord(
                version=RECORD_VERSION, swarm_id="ab" * 32, peer_id=self.peer_id, seq=seq, prev_hash=prev,
                round=100 + seq, shards=(0,), samples=64, tokens=8192, loss_before=to_fixed(2.5),
                loss_after=to_fixed(2.25), adapter_hash="cd" * 32, data_commitment="ef" * 32,
                grad_commitment="01" * 32, start_ms=1_700_000_000_000 + seq, end_ms=1_700_000_002_000 + seq,
            )
            rec = record_summary(sign_record(record, self.key), record)
            self._records.append(rec)
            self._appended.notify_all()
            return rec

    def records(self, from_seq: int) -> list[dict]:
        with self._appended:
            return self._records[from_seq:from_seq + 2]  # pages of 2: the server must ask again

    def wait_for_record(self, after_seq: int, timeout: float) -> bool:
        with self._appended:
            return self._appended.wait_for(lambda: len(self._records) > after_seq + 1, timeout)

    def pause(self) -> None:
        self.calls["pause"] += 1
        self.state = "paused"

    def resume(self) -> None:
        self.calls["resume"] += 1
        self.state = "training"

    def drain(self) -> None:
        self.calls["drain"] += 1
        self.state = "draining"
        if self.on_drain:
            self.on_drain()


@pytest.fixture
def node() -> TinyNode:
    return TinyNode()


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    return tmp_path / "home" / "node.sock"  # "home" does not exist yet: the server creates it


@pytest.fixture
def server(sock: Path, node: TinyNode):
    srv = ControlServer(sock, node, follow_poll_s=0.1)
    srv.start()
    yield srv
    srv.stop(grace=0)


@pytest.fixture
def client(server: ControlServer, sock: Path):
    with ControlClient(sock, timeout=5) as c:
        yield c


def test_status_reports_the_view(client: ControlClient, node: TinyNode) -> None:
    st = client.status()
    assert st["round"] == 7 and st["state"] == "training" and st["shards"] == [0, 2]
    assert st["loss"] is None  # unset before the first round, not 0.0
    assert st["rss_bytes"] == 300 << 20 and st["listen_maddrs"] == ["/ip4/127.0.0.1/tcp/4001"]
    node.round, node.loss = 8, 1.875
    st = client.status()
    assert (st["round"], st["loss"]) == (8, 1.875)
    assert set(st) == set(node.status())  # the client hands back exactly the view's keys


def test_peers_shards_credit(client: ControlClient, node: TinyNode) -> None:
    assert client.peers() == node.peers()
    assert client.shards() == node.shards()
    assert client.credit() == node.credit()


def test_pause_resume_drain_reach_the_view(client: ControlClient, node: TinyNode) -> None:
    assert client.pause() == "paused"
    assert client.resume() == "training"
    assert client.drain() == "draining"
    assert (node.calls["pause"], node.calls["resume"], node.calls["drain"]) == (1, 1, 1)


def test_records_from_seq_pages_and_exact_blobs(client: ControlClient, node: TinyNode) -> None:
    sent = [node.append_record() for _ in range(5)]
    got = list(client.records(from_seq=1))
    assert [r["seq"] for r in got] == [1, 2, 3, 4]  # across pages of 2
    assert got[0] == sent[1]  # blob bytes and summary fields unchanged
    assert verify_signed(got[0]["blob"]).seq == 1  # the exact signed bytes arrive, still verifiable
    assert got[1]["prev_hash"] == got[0]["record_hash"]
    assert list(client.records(from_seq=5)) == []


def test_records_follow_streams_new_records_until_server_stops(server, client, node: TinyNode) -> None:
    node.append_record()
    seen: list[int] = []
    first = threading.Event()
    errors: list[BaseException] = []

    def follow() -> None:
        try:
            for rec in client.records(from_seq=0, follow=True):
                seen.append(rec["seq"])
                first.set()
        except BaseException as e:  # surfaced by the assertion below
            errors.append(e)

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    assert first.wait(5)
    node.append_record()
    node.append_record()
    deadline = time.monotonic() + 5
    while len(seen) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert seen == [0, 1, 2]
    server.stop(grace=1)  # an open follow stream must not keep the daemon from exiting
    t.join(5)
    assert not t.is_alive()
    assert errors == []  # the stream ended cleanly, not with an error


def test_follow_streams_are_capped(sock: Path, node: TinyNode) -> None:
    with ControlServer(sock, node, max_workers=3, follow_poll_s=0.1):
        with ControlClient(sock) as a, ControlClient(sock) as b:
            held = a.records(follow=True)
            started = threading.Thread(target=lambda: next(held, None), daemon=True)
            started.start()
            time.sleep(0.3)
            with pytest.raises(ControlError, match="too many `follow`"):
                next(b.records(follow=True))
            assert b.status()["round"] == 7  # unary calls still have a worker
            held.cancel()
            started.join(5)
            assert not started.is_alive()


def test_socket_is_private(server: ControlServer, sock: Path) -> None:
    assert stat.S_ISSOCK(os.lstat(sock).st_mode)
    assert stat.S_IMODE(os.lstat(sock).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(sock.parent).st_mode) == 0o700  # created by the server
    server.stop(grace=0)
    assert not sock.exists()


def _system_python() -> str | None:
    # The test interpreter may live under /root (mode 0700), which `nobody` cannot read.
    return next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.access(p, os.X_OK)), None)


CONNECT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
    print("connected")
except OSError as e:
    print(type(e).__name__)
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not _system_python(),
                    reason="needs root, setpriv and a system python3 to act as another user")
def test_another_user_cannot_connect(node: TinyNode) -> None:
    # A directory `nobody` may traverse, so the socket's own mode is what is tested.
    home = Path(tempfile.mkdtemp(prefix="swarmtune-perm-", dir="/tmp"))
    os.chmod(home, 0o711)
    sock = home / "node.sock"
    as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", _system_python(), "-c", CONNECT]
    try:
        with ControlServer(sock, node):
            out = subprocess.run(as_nobody + [str(sock)], capture_output=True, text=True, timeout=20)
            assert out.stdout.strip() == "PermissionError", out.stderr
            os.chmod(sock, 0o666)  # control: the same user gets in when the mode allows it
            out = subprocess.run(as_nobody + [str(sock)], capture_output=True, text=True, timeout=20)
            assert out.stdout.strip() == "connected", out.stderr
            os.chmod(sock, 0o600)

            # The real CLI, as a uid that does not own the socket (root without DAC override,
            # since this interpreter is not readable by `nobody`): a clear refusal, exit 2.
            os.chown(sock, 65534, 65534)
            cli = [
                "setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all",
                sys.executable, "-c", "import sys; from node.cli import main; sys.exit(main(sys.argv[1:]))",
                "status", "--socket", str(sock),
            ]
            out = subprocess.run(cli, capture_output=True, text=True, timeout=60, cwd=ROOT,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
            assert out.returncode == 2, out
            assert "permission denied" in out.stderr and str(sock) in out.stderr
            assert node.calls["status"] == 0  # nothing got through
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_no_daemon_gives_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nothing.sock"
    with pytest.raises(DaemonNotRunning) as e:
        ControlClient(missing).status()
    assert str(missing) in str(e.value) and "swarmtune run --manifest" in str(e.value)


def _stale_socket(path: Path) -> None:
    """A socket file with nobody listening: what a SIGKILLed daemon leaves behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()


def test_stale_socket_is_reported_then_replaced(sock: Path, node: TinyNode) -> None:
    _stale_socket(sock)
    with pytest.raises(DaemonNotRunning, match="nothing answers"):
        ControlClient(sock).status()
    with ControlServer(sock, node):
        assert ControlClient(sock).status()["round"] == 7


def test_live_daemon_is_not_replaced(server: ControlServer, sock: Path, node: TinyNode) -> None:
    with pytest.raises(SocketInUse, match="already serves"):
        ControlServer(sock, TinyNode()).start()
    assert ControlClient(sock).status()["round"] == 7  # the first one still answers


def test_foreign_listener_and_regular_file_are_not_removed(tmp_path: Path, node: TinyNode) -> None:
    path = tmp_path / "other.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen()
    try:
        with pytest.raises(SocketInUse, match="a live process already listens"):
            ControlServer(path, node).start()
        assert path.exists()
    finally:
        listener.close()
    plain = tmp_path / "plain"
    plain.write_text("not a socket")
    with pytest.raises(ControlError, match="is not a socket"):
        ControlServer(plain, node).start()
    assert plain.read_text() == "not a socket"


def test_a_broken_view_is_reported_as_a_daemon_bug(sock: Path, node: TinyNode) -> None:
    node.status = lambda: {"round": 1}  # the daemon author forgot keys
    with ControlServer(sock, node):
        with pytest.raises(ControlError, match=r"INTERNAL: daemon bug: NodeView.status\(\): missing keys"):
            ControlClient(sock).status()


# ---------------------------------------------------------------- CLI


def test_cli_status_table_and_json(client, sock: Path, capsys) -> None:
    assert main(["status", "--socket", str(sock)]) == 0
    out = capsys.readouterr().out
    assert "round" in out and "training" in out and "12D3KooWTiny" in out and "300.0 MiB" in out
    assert main(["status", "--socket", str(sock), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["round"] == 7 and st["state"] == "training"
    assert st["reachability"] == "outbound-only" and "forward TCP port 4001" in st["reachability_fix"]


def test_cli_peers_and_shards(client, sock: Path, capsys) -> None:
    assert main(["peers", "--socket", str(sock)]) == 0
    out = capsys.readouterr().out
    assert "12D3KooWPeerA" in out and "12D3KooWPeerB" in out and "/ip4/10.0.0.2/tcp/4001" in out
    assert main(["peers", "--socket", str(sock), "--json"]) == 0
    assert [p["peer_id"] for p in json.loads(capsys.readouterr().out)] == ["12D3KooWPeerA", "12D3KooWPeerB"]
    assert main(["shards", "--socket", str(sock)]) == 0
    out = capsys.readouterr().out
    assert "nobody trains it" in out and "0-3" in out
    assert main(["shards", "--socket", str(sock), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[1]["trainers"] == 0


def test_cli_pause_resume(client, sock: Path, node: TinyNode, capsys) -> None:
    assert main(["pause", "--socket", str(sock)]) == 0
    assert "paused" in capsys.readouterr().out and node.state == "paused"
    assert main(["resume", "--socket", str(sock), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"state": "training"}


def test_cli_stop_waits_for_the_daemon_to_exit(sock: Path, node: TinyNode, capsys) -> None:
    server = ControlServer(sock, node)
    # Like the daemon: drain() returns at once, the process exits a little later.
    node.on_drain = lambda: threading.Timer(0.3, server.stop, kwargs={"grace": 0}).start()
    server.start()
    try:
        assert main(["stop", "--socket", str(sock), "--json", "--timeout", "10"]) == 0
        assert json.loads(capsys.readouterr().out) == {"state": "draining", "exited": True}
        assert not sock.exists()
    finally:
        server.stop(grace=0)


def test_cli_stop_times_out_when_the_daemon_stays(client, sock: Path, capsys) -> None:
    assert main(["stop", "--socket", str(sock), "--timeout", "0.5"]) == 2
    assert "still running" in capsys.readouterr().err


def test_cli_without_daemon_exits_nonzero(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("SWARMTUNE_HOME", str(tmp_path / "home"))
    assert main(["status"]) == 2  # the Docker healthcheck relies on this
    err = capsys.readouterr().err
    assert str(tmp_path / "home" / "node.sock") in err and "swarmtune run" in err
