"""Bytes this node's p2p daemon moved on the network, from the kernel's per-socket TCP counters.

Every byte a node exchanges with peers (averaging, state downloads, DHT traffic) goes through
its p2pd's TCP sockets, so their `bytes_sent` / `bytes_received` counters (tcp_info, read
with iproute2's `ss`) measure the traffic itself rather than what the code meant to send.
A socket that closes between two samples loses what it moved after the last one: sample at
round boundaries and the totals are exact for the long-lived peer connections.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess

import psutil

logger = logging.getLogger(__name__)

_USER = re.compile(r'users:\(\("p2pd",pid=(\d+)')
_COUNTERS = {name: re.compile(rf"\b{name}:(\d+)") for name in ("bytes_sent", "bytes_received")}


def p2pd_pids() -> set[int]:
    """The p2p daemons started by this process (hivemind runs one per DHT, as a grandchild)."""
    out = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if child.name() == "p2pd":
                out.add(child.pid)
        except psutil.Error:
            continue
    return out


def parse_ss(text: str, pids: set[int]) -> dict[tuple[str, str], tuple[int, int]]:
    """`ss -tinpH` output -> {(local, peer): (bytes_sent, bytes_received)} for sockets owned by `pids`."""
    out = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        user = _USER.search(line)
        if not user or int(user.group(1)) not in pids:
            continue
        fields = line.split()
        key = (fields[3], fields[4]) if len(fields) > 4 else (line, "")
        info = lines[i + 1] if i + 1 < len(lines) else ""
        sent, received = (_COUNTERS[n].search(info) for n in ("bytes_sent", "bytes_received"))
        out[key] = (int(sent.group(1)) if sent else 0, int(received.group(1)) if received else 0)
    return out


class Traffic:
    """Running totals of bytes sent and received by this node's p2pd sockets."""

    def __init__(self):
        self.available = shutil.which("ss") is not None
        if not self.available:
            logger.info("network byte counters need iproute2's `ss`; swarmtune_network_*_bytes stay at 0")
        self._last: dict[tuple[str, str], tuple[int, int]] = {}
        self.sent = self.received = 0

    def sample(self) -> tuple[int, int]:
        """Bytes (sent, received) since the previous sample."""
        if not self.available:
            return 0, 0
        pids = p2pd_pids()
        try:
            text = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True, timeout=5, check=True).stdout
        except (OSError, subprocess.SubprocessError) as e:
            logger.warning("could not read socket counters with ss: %s", e)
            return 0, 0
        now = parse_ss(text, pids)
        d_sent = d_recv = 0
        for key, (sent, received) in now.items():
            old_sent, old_recv = self._last.get(key, (0, 0))
            # a reused address pair restarts its counters
            d_sent += sent - old_sent if sent >= old_sent else sent
            d_recv += received - old_recv if received >= old_recv else received
        self._last = now
        self.sent += d_sent
        self.received += d_recv
        return d_sent, d_recv
