"""Shared fixtures: a tiny base model built once per session, manifests, and real node processes.

Node processes run `python -m node run ...` in their own process group; every group a
test starts is killed (SIGKILL) at teardown, and the hivemind unix sockets they leave in
/tmp are removed.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """Multi-process swarm tests depend on the scheduler of a 2-core machine (matchmaking windows,
    p2p timeouts); each gets one rerun, and the rerun is reported in the summary, never hidden."""
    for item in items:
        if item.get_closest_marker("swarm") and not item.get_closest_marker("flaky"):
            item.add_marker(pytest.mark.flaky(reruns=1))


@pytest.fixture(scope="session", autouse=True)
def _no_leftover_children():
    """Tests that start hivemind in this process (a liar's DHT, a doctor's) fork children; one whose fork
    deadlocked (p2pd's exec in a child of a threaded process can) would hold multiprocessing's exit-time
    join forever and the run would never end. Whatever is left at the end of the session is killed."""
    import multiprocessing

    yield
    for child in multiprocessing.active_children():
        child.kill()
        child.join(timeout=10)


@pytest.fixture(scope="session")
def st_cache(tmp_path_factory) -> Path:
    """A private SWARMTUNE_CACHE for the session (the tiny model is built there once)."""
    cache = tmp_path_factory.mktemp("swarmtune-cache")
    old = os.environ.get("SWARMTUNE_CACHE")
    os.environ["SWARMTUNE_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("SWARMTUNE_CACHE", None)
    else:
        os.environ["SWARMTUNE_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_base(st_cache) -> Path:
    from node.tiny import build_tiny_base, default_tiny_dir

    return build_tiny_base(default_tiny_dir())


def start_test_dht(**kwargs):
    """A hivemind DHT in this (pytest) process, e.g. an adversary's. Its process is forked from a threaded
    parent, and under load that child was seen stuck for good while starting p2pd: a start that is not
    ready in 60 s is killed and tried once more."""
    import hivemind

    for attempt in range(2):
        dht = hivemind.DHT(start=False, **kwargs)
        try:
            dht.run_in_background(await_ready=True, timeout=60)
            return dht
        except TimeoutError:
            dht.kill()
            dht.join(timeout=10)
            if attempt:
                raise


def write_test_manifest(path: Path, base_dir: Path, *, data: str = "builtin:task", data_fields: dict | None = None,
                        **sections) -> Path:
    """A manifest for the tiny model; `sections` override fields, e.g. rounds={"max_rounds": 5}; `data_fields`
    those of [data] besides its source (e.g. {"shuffle_seed": 1})."""
    from node.data import resolve_data
    from node.data import dataset_digest
    from node.manifest import (
        AveragingSection, BaseSection, DataSection, Manifest, OptimSection, RoundSection, write_manifest,
    )
    from node.model import base_fingerprint

    m = Manifest(
        name="test",
        base=BaseSection(model=str(base_dir), fingerprint=base_fingerprint(base_dir)),
        data=DataSection(source=data, digest=dataset_digest(resolve_data(data)), **{"max_length": 48, **(data_fields or {})}),
        optim=OptimSection(lr=3e-3),
        rounds=RoundSection(target_batch_size=24, microbatch_size=8, max_rounds=6),
        averaging=AveragingSection(matchmaking_time=2.0, timeout=20.0, peer_ttl=10.0),
    )
    for name, fields in sections.items():
        m = dataclasses.replace(m, **{name: dataclasses.replace(getattr(m, name), **fields)})
    write_manifest(m, path)
    return path


def evidence(*nodes: "NodeProc") -> list[str]:
    """The nodes' ledgers and their receipts files (receipts and spot-checks), as `--ledger` sources."""
    return [str(n.workdir / name) for n in nodes for name in ("ledger.jsonl", "receipts.jsonl")
            if name == "ledger.jsonl" or (n.workdir / name).exists()]


def verify_ledgers(manifest: Path, *nodes: "NodeProc") -> str:
    """`swarmtune ledger verify` over the nodes' ledgers and receipts, as a user runs it; returns its output."""
    out = subprocess.run([sys.executable, "-m", "node", "ledger", "verify", "--manifest", str(manifest), "--ledger",
                          *evidence(*nodes)], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


class NodeProc:
    """One `swarmtune run` process with its own home folder."""

    def __init__(self, home: Path, popen: subprocess.Popen, log: Path):
        self.home, self.popen, self.log = home, popen, log
        self.started = time.time()

    @property
    def workdir(self) -> Path | None:
        found = list((self.home / "swarms").glob("*"))
        return found[0] if found else None

    def info(self) -> dict | None:
        """This process's node.json: one a killed earlier process left in the same home does not count (it was
        written before this one started)."""
        wd = self.workdir
        try:
            path = wd / "node.json"
            return json.loads(path.read_text()) if path.stat().st_mtime >= self.started - 1.0 else None
        except (OSError, ValueError, TypeError):
            return None

    def rounds(self) -> list[dict]:
        wd = self.workdir
        if not wd or not (wd / "rounds.jsonl").exists():
            return []
        return [json.loads(line) for line in (wd / "rounds.jsonl").read_text().splitlines() if line.strip()]

    def applied(self) -> dict[int, dict]:
        """{round: row} of the rounds this node applied whole. A row whose round some shard's sum missed
        (`resync`) holds the state the node then took from its group, a later round's, not that round's: a
        hash comparison between nodes skips it."""
        return {r["round"]: r for r in self.rounds() if r["applied"] and not r["resync"]}

    def wait_info(self, timeout: float = 120) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.info()
            if info:
                return info
            if self.popen.poll() is not None:
                raise AssertionError(f"node exited {self.popen.returncode} before starting:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.3)
        raise AssertionError(f"node did not start in {timeout}s:\n{self.log.read_text()[-3000:]}")

    def wait_round(self, n: int, timeout: float = 120) -> None:
        """Wait until this node finished round n-1 (its next round is >= n)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            rows = self.rounds()
            if rows and rows[-1]["next_round"] >= n:
                return
            if self.popen.poll() is not None:
                raise AssertionError(f"node exited {self.popen.returncode}:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"node did not reach round {n} in {timeout}s:\n{self.log.read_text()[-3000:]}")

    def wait_log(self, text: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if text in self.log.read_text(errors="replace"):
                return
            if self.popen.poll() is not None:
                raise AssertionError(f"node exited {self.popen.returncode}:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"{text!r} not in the log after {timeout}s:\n{self.log.read_text()[-3000:]}")

    def wait_exit(self, timeout: float = 180) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"node still running after {timeout}s:\n{self.log.read_text()[-3000:]}") from None

    def signal(self, sig: int) -> None:
        os.kill(self.popen.pid, sig)


@pytest.fixture
def spawn_node(tmp_path, st_cache):
    """spawn_node(manifest, name, *extra_args) -> NodeProc; all are killed (by pid group) at teardown."""
    started: list[NodeProc] = []
    socks_before = set(glob.glob("/tmp/hivemind-*"))

    def spawn(manifest: Path, name: str, *extra: str, home: Path | None = None, env: dict | None = None,
              prefix: tuple[str, ...] = (), host: str = "127.0.0.1") -> NodeProc:
        home = home or tmp_path / name
        home.mkdir(parents=True, exist_ok=True)
        log = tmp_path / f"{name}.log"
        cmd = [
            *prefix, sys.executable, "-m", "node", "run", "--manifest", str(manifest), "--home", str(home), "--create-key",
            "--host-maddrs", f"/ip4/{host}/tcp/0", "--threads", "1", *extra,
        ]
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        with open(log, "ab") as fh:
            popen = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=full_env, cwd=REPO, start_new_session=True)
        proc = NodeProc(home, popen, log)
        started.append(proc)
        return proc

    yield spawn
    for proc in started:
        try:
            os.killpg(proc.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    # p2pd and averager children live in the same process group; sockets they leave are ours to remove
    for path in set(glob.glob("/tmp/hivemind-*")) - socks_before:
        try:
            os.unlink(path)
        except OSError:
            pass


class NetnsLan:
    """Hosts in network namespaces on one bridge (10.77.0.0/24), made and removed by the test.

    `prefix(i)` runs a command on host i; `cut(i)`/`heal(i)` take host i off the LAN and back;
    `limit(i, rate)` shapes host i's link both ways with tc tbf."""

    def __init__(self, n: int):
        self.tag = f"st{os.getpid() % 100000}"
        self.hub = f"{self.tag}h"
        self.hosts = [f"{self.tag}n{i}" for i in range(n)]
        self._sh(["ip", "netns", "add", self.hub])
        self._hub(["ip", "link", "add", "br0", "type", "bridge"])
        self._hub(["ip", "link", "set", "br0", "up"])
        for i, ns in enumerate(self.hosts):
            inner, outer = f"v{self.tag}{i}", f"h{self.tag}{i}"
            self._sh(["ip", "netns", "add", ns])
            self._sh(["ip", "link", "add", inner, "type", "veth", "peer", "name", outer])
            self._sh(["ip", "link", "set", inner, "netns", ns])
            self._sh(["ip", "link", "set", outer, "netns", self.hub])
            self._hub(["ip", "link", "set", outer, "master", "br0"])
            self._hub(["ip", "link", "set", outer, "up"])
            self._ns(ns, ["ip", "addr", "add", f"{self.ip(i)}/24", "dev", inner])
            self._ns(ns, ["ip", "link", "set", inner, "up"])
            self._ns(ns, ["ip", "link", "set", "lo", "up"])

    def ip(self, i: int) -> str:
        return f"10.77.0.{i + 1}"

    def prefix(self, i: int) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.hosts[i])

    def cut(self, i: int) -> None:
        self._hub(["ip", "link", "set", f"h{self.tag}{i}", "down"])

    def heal(self, i: int) -> None:
        self._hub(["ip", "link", "set", f"h{self.tag}{i}", "up"])

    def limit(self, i: int, rate: str) -> None:
        tbf = ["tbf", "rate", rate, "burst", "64kb", "latency", "400ms"]
        self._hub(["tc", "qdisc", "add", "dev", f"h{self.tag}{i}", "root", *tbf])
        self._ns(self.hosts[i], ["tc", "qdisc", "add", "dev", f"v{self.tag}{i}", "root", *tbf])

    def close(self) -> None:
        for ns in [*self.hosts, self.hub]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def _sh(self, cmd):
        subprocess.run(cmd, check=True, capture_output=True)

    def _hub(self, cmd):
        self._sh(["ip", "netns", "exec", self.hub, *cmd])

    def _ns(self, ns, cmd):
        self._sh(["ip", "netns", "exec", ns, *cmd])


@pytest.fixture
def netns_lan():
    """netns_lan(n) -> NetnsLan; skipped where namespaces cannot be made (not root, no iproute2)."""
    import shutil

    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        pytest.skip("network namespaces need root and iproute2")
    made: list[NetnsLan] = []

    def make(n: int) -> NetnsLan:
        try:
            lan = NetnsLan(n)
        except subprocess.CalledProcessError as e:
            pytest.skip(f"cannot build network namespaces here: {e.stderr.decode(errors='replace').strip()}")
        made.append(lan)
        return lan

    yield make
    for lan in made:
        lan.close()


class NatNet:
    """Public hosts on one bridge (10.78.0.0/24, "the internet") and home hosts each behind its own NAT router.

    Host i < public is on the bridge at 10.78.0.(i+1). Home host j (index public + j) is 192.168.(j+1).2 on a
    LAN of its own; its router is a namespace with 10.78.0.(101+j) on the bridge that masquerades the LAN
    (iptables MASQUERADE) and drops whatever arrives from the bridge that the LAN did not ask for (FORWARD:
    only ESTABLISHED/RELATED pass; INPUT: new connections to the router itself are dropped, as a home router
    does). Outbound connections from a home host pass; inbound ones time out. `prefix(i)` runs a command on
    host i."""

    def __init__(self, public: int, nat: int):
        self.tag = f"sn{os.getpid() % 100000}"
        self.hub = f"{self.tag}h"
        self.public, self.nat = public, nat
        self.hosts = [f"{self.tag}p{i}" for i in range(public)] + [f"{self.tag}n{j}" for j in range(nat)]
        self.routers = [f"{self.tag}r{j}" for j in range(nat)]
        self._sh(["ip", "netns", "add", self.hub])
        self._ns(self.hub, ["ip", "link", "add", "br0", "type", "bridge"])
        self._ns(self.hub, ["ip", "link", "set", "br0", "up"])
        for i in range(public):
            self._wire_to_hub(self.hosts[i], f"{self.tag}p{i}", f"10.78.0.{i + 1}")
        for j in range(nat):
            router, home = self.routers[j], self.hosts[public + j]
            wan = self._wire_to_hub(router, f"{self.tag}r{j}", f"10.78.0.{101 + j}")
            self._sh(["ip", "netns", "add", home])
            lan, inner = f"l{self.tag}{j}", f"e{self.tag}{j}"
            self._sh(["ip", "link", "add", lan, "type", "veth", "peer", "name", inner])
            self._sh(["ip", "link", "set", lan, "netns", router])
            self._sh(["ip", "link", "set", inner, "netns", home])
            self._ns(router, ["ip", "addr", "add", f"192.168.{j + 1}.1/24", "dev", lan])
            self._ns(router, ["ip", "link", "set", lan, "up"])
            self._ns(home, ["ip", "addr", "add", f"192.168.{j + 1}.2/24", "dev", inner])
            self._ns(home, ["ip", "link", "set", inner, "up"])
            self._ns(home, ["ip", "link", "set", "lo", "up"])
            self._ns(home, ["ip", "route", "add", "default", "via", f"192.168.{j + 1}.1"])
            self._ns(router, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            ipt = ["iptables", "-w"]
            self._ns(router, [*ipt, "-t", "nat", "-A", "POSTROUTING", "-o", wan, "-j", "MASQUERADE"])
            self._ns(router, [*ipt, "-A", "FORWARD", "-i", wan, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"])
            self._ns(router, [*ipt, "-A", "FORWARD", "-i", wan, "-j", "DROP"])
            self._ns(router, [*ipt, "-A", "INPUT", "-i", wan, "-m", "conntrack", "--ctstate", "NEW", "-j", "DROP"])

    def _wire_to_hub(self, ns: str, name: str, ip: str) -> str:
        inner, outer = f"v{name}", f"h{name}"
        self._sh(["ip", "netns", "add", ns])
        self._sh(["ip", "link", "add", inner, "type", "veth", "peer", "name", outer])
        self._sh(["ip", "link", "set", inner, "netns", ns])
        self._sh(["ip", "link", "set", outer, "netns", self.hub])
        self._ns(self.hub, ["ip", "link", "set", outer, "master", "br0"])
        self._ns(self.hub, ["ip", "link", "set", outer, "up"])
        self._ns(ns, ["ip", "addr", "add", f"{ip}/24", "dev", inner])
        self._ns(ns, ["ip", "link", "set", inner, "up"])
        self._ns(ns, ["ip", "link", "set", "lo", "up"])
        return inner

    def ip(self, i: int) -> str:
        return f"10.78.0.{i + 1}" if i < self.public else f"192.168.{i - self.public + 1}.2"

    def wan_ip(self, i: int) -> str:
        """The address peers see host i at (its router's, for a home host)."""
        return self.ip(i) if i < self.public else f"10.78.0.{101 + i - self.public}"

    def prefix(self, i: int) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.hosts[i])

    def limit(self, i: int, rate: str) -> None:
        """Shape host i's link to the bridge both ways with tc tbf (a home host: its router's WAN link)."""
        name = f"{self.tag}p{i}" if i < self.public else f"{self.tag}r{i - self.public}"
        ns = self.hosts[i] if i < self.public else self.routers[i - self.public]
        tbf = ["tbf", "rate", rate, "burst", "64kb", "latency", "400ms"]
        self._ns(self.hub, ["tc", "qdisc", "add", "dev", f"h{name}", "root", *tbf])
        self._ns(ns, ["tc", "qdisc", "add", "dev", f"v{name}", "root", *tbf])

    def masqueraded(self, j: int) -> int:
        """Packets router j's MASQUERADE rule rewrote (conntrack counts a connection's first packet)."""
        out = subprocess.run(["ip", "netns", "exec", self.routers[j], "iptables", "-w", "-t", "nat", "-L", "POSTROUTING",
                              "-v", "-n", "-x"], capture_output=True, text=True, check=True).stdout
        return sum(int(line.split()[0]) for line in out.splitlines() if "MASQUERADE" in line)

    def close(self) -> None:
        for ns in [*self.hosts, *self.routers, self.hub]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def _sh(self, cmd):
        subprocess.run(cmd, check=True, capture_output=True)

    def _ns(self, ns, cmd):
        self._sh(["ip", "netns", "exec", ns, *cmd])


@pytest.fixture
def nat_net():
    """nat_net(public, nat) -> NatNet; skipped where namespaces or iptables are missing (not root, no iptables)."""
    import shutil

    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("iptables"):
        pytest.skip("NAT tests need root, iproute2 and iptables (apt-get install -y iptables)")
    made: list[NatNet] = []

    def make(public: int, nat: int) -> NatNet:
        try:
            net = NatNet(public, nat)
        except subprocess.CalledProcessError as e:
            pytest.skip(f"cannot build NAT namespaces here: {e.stderr.decode(errors='replace').strip()}")
        made.append(net)
        return net

    yield make
    for net in made:
        net.close()
