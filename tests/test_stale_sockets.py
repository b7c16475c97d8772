"""Unix sockets hivemind leaves behind are removed at shutdown; live ones are kept."""

from __future__ import annotations

import socket

from node.swarm.dht import remove_stale_sockets


def test_only_sockets_nobody_listens_on_are_removed(tmp_path):
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(tmp_path / "hivemind-live.sock"))
    live.listen(1)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(tmp_path / "hivemind-dead.sock"))
    dead.close()  # the file stays, nobody listens: what a killed p2p client leaves
    other = tmp_path / "hivemind-notes.sock"
    other.write_text("not a socket")
    try:
        assert remove_stale_sockets(str(tmp_path / "hivemind-*.sock")) == 1
        assert (tmp_path / "hivemind-live.sock").exists()
        assert not (tmp_path / "hivemind-dead.sock").exists()
        assert other.exists()
    finally:
        live.close()
