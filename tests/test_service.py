"""`swarmtune service install`: the systemd unit it writes is valid (systemd-analyze verify, where present),
runs this node's config with a drain-friendly stop and a restart policy, and bad input writes nothing.

Run: python -m pytest tests/test_service.py -q
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node", *args], capture_output=True, text=True, cwd=REPO, timeout=60)


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


def _verify(path: Path) -> str:
    """systemd-analyze's complaints about the unit ('' when none); it exits 0 even for keys it ignores."""
    out = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    return (out.stdout + out.stderr).strip() + (f" (exit {out.returncode})" if out.returncode else "")


@pytest.fixture
def node_config(tmp_path) -> Path:
    (tmp_path / "swarm.toml").write_text("# a manifest\n")
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\nmanifest = "swarm.toml"\nhome = "{tmp_path / "home"}"\n')
    return config


def test_install_writes_a_valid_unit_and_prints_how_to_enable_it(tmp_path, node_config) -> None:
    out = tmp_path / "units" / "swarmtune.service"
    got = _cli("service", "install", "--config", str(node_config), "--out", str(out))
    assert got.returncode == 0, got.stderr
    assert f"wrote {out}" in got.stdout and "systemctl daemon-reload && systemctl enable --now swarmtune" in got.stdout
    unit = _unit(out)
    svc = unit["Service"]
    exec_start = svc["ExecStart"].split()
    assert Path(exec_start[0]).is_absolute() and exec_start[-3:] == ["run", "--config", str(node_config)]
    assert f"Environment=SWARMTUNE_HOME={tmp_path / 'home'}" in out.read_text()
    # SIGTERM to the main process only (it drains and stops its children), restart after crashes only
    assert svc["KillMode"] == "mixed" and svc["KillSignal"] == "SIGTERM" and svc["Restart"] == "on-failure"
    assert svc["RestartPreventExitStatus"] == "2" and svc["User"]
    assert unit["Install"]["WantedBy"] == "multi-user.target" and not re.search(r"@[A-Z]+@", out.read_text())
    if shutil.which("systemd-analyze"):
        assert _verify(out) == ""
        broken = tmp_path / "units" / "broken.service"
        broken.write_text(out.read_text().replace("KillMode=mixed", "KillMode=sometimes"))
        assert "kill mode" in _verify(broken)  # the check can fail

    user_unit = tmp_path / "user.service"
    got = _cli("service", "install", "--config", str(node_config), "--user", "--out", str(user_unit))
    assert got.returncode == 0 and "systemctl --user" in got.stdout and "loginctl enable-linger" in got.stdout
    assert "User" not in _unit(user_unit)["Service"] and _unit(user_unit)["Install"]["WantedBy"] == "default.target"

    again = _cli("service", "install", "--config", str(node_config), "--out", str(out))
    assert again.returncode == 2 and "exists; pass --force" in again.stderr and "Traceback" not in again.stderr
    assert _cli("service", "install", "--config", str(node_config), "--out", str(out), "--force").returncode == 0


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ("[node]\nshards = 'all'\n", "names no manifest"),
    ("[node]\nmanifest = 'missing.toml'\n", "missing.toml not found"),
    ("[node]\nmanifest = \n", "not valid TOML"),
])
def test_bad_config_writes_nothing(tmp_path, content, message) -> None:
    config = tmp_path / "node.toml"
    if content is not None:
        config.write_text(content)
    out = tmp_path / "swarmtune.service"
    got = _cli("service", "install", "--config", str(config), "--out", str(out))
    assert got.returncode == 2 and message in got.stderr and "Traceback" not in got.stderr, got.stderr
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
