"""The live status line of `swarmtune run`: drawn on a terminal (a real pty), absent from files, pipes and
JSON logs.

Run: python -m pytest tests/test_console.py -q
"""

from __future__ import annotations

import io
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.console import start_live_line, status_line
from tests.conftest import write_test_manifest

REPO = Path(__file__).resolve().parents[1]


def _status(**kw) -> dict:
    st = {"state": "training", "round": 40, "loss": 0.51234, "peers": 2, "samples_per_s": 12.34, "last_round_s": 2.0,
          "stalled": False, "stall_reason": ""}
    st.update(kw)
    return st


def test_status_line_text() -> None:
    line = status_line(_status(), last_round=100, credit_rounds=7)
    assert "● training" in line and "round 40/100 (ETA 2m00s)" in line and "loss 0.5123" in line
    assert "2 peers" in line and "12.3 samples/s" in line and "credit 7 verified rounds" in line
    stalled = status_line(_status(state="syncing", loss=None, peers=1, stalled=True, stall_reason="no round ended for 400 s"))
    assert "loss -" in stalled and "1 peer ·" in stalled and "STALLED: no round ended for 400 s" in stalled


def test_no_live_line_for_files_pipes_and_json_logs() -> None:
    assert start_live_line(object(), json_logs=False, stream=io.StringIO()) is None  # not a terminal
    _, slave = os.openpty()
    with os.fdopen(slave, "w") as tty:
        assert start_live_line(object(), json_logs=True, stream=tty) is None  # a terminal, but JSON logs


@pytest.mark.swarm
@pytest.mark.timeout(240)
def test_live_line_on_a_terminal(tmp_path, tiny_base, st_cache):
    manifest = write_test_manifest(tmp_path / "swarm.toml", tiny_base, rounds={"max_rounds": 8})
    master, slave = pty.openpty()
    cmd = [sys.executable, "-m", "node", "run", "--manifest", str(manifest), "--home", str(tmp_path / "home"), "--create-key",
           "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, cwd=REPO, start_new_session=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200"))
    os.close(slave)
    out = b""
    try:
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(master, 1 << 16)
                except OSError:  # EIO: the node exited and closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=60) == 0, out.decode(errors="replace")[-3000:]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
        os.close(master)
    text = out.decode(errors="replace")
    assert "● training" in text and "round " in text and "/8" in text, text[-3000:]  # the live line, with the last round
    assert "\x1b[" in text  # drawn with cursor moves, redrawn in place
    assert "round 3: loss" in text  # the log still scrolls above it
