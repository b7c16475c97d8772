"""Nodes behind home routers: network namespaces with a NAT router each (iptables MASQUERADE, and unsolicited
inbound connections dropped), built by the test (tests/conftest.py: NatNet). A node nobody can dial finds
that out at start (a peer's dial-back times out), trains in client mode through the public nodes, and says so
in its status, its heartbeat and `swarmtune doctor`."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from node.control_client import ControlClient
from tests.conftest import REPO, evidence, verify_ledgers, write_test_manifest

pytestmark = [pytest.mark.swarm, pytest.mark.netns, pytest.mark.nat]

ROUNDS = 5


def _manifest(tmp_path, tiny_base):
    return write_test_manifest(tmp_path / "swarm.toml", tiny_base, rounds={"max_rounds": ROUNDS})


def _status(node) -> dict:
    out = subprocess.run([sys.executable, "-m", "node", "status", "--socket", str(node.home / "node.sock"), "--json"],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


def _trained_together(nodes, size: int) -> None:
    """Every node applied every round 0..ROUNDS-1 in one group of `size`, and all hold the same adapter after each."""
    per_node = [n.applied() for n in nodes]
    for n, rows in zip(nodes, per_node):
        assert sorted(rows) == list(range(ROUNDS)), (sorted(rows), n.log.read_text()[-3000:])
        assert all(set(r["groups"].values()) == {size} for r in rows.values()), [r["groups"] for r in rows.values()]
    for r in range(ROUNDS):
        assert len({rows[r]["hash"] for rows in per_node}) == 1, f"adapters differ after round {r}"
        assert len({rows[r]["start_hash"] for rows in per_node}) == 1, f"adapters differ before round {r}"


def _credited(manifest, nodes) -> dict:
    verify_ledgers(manifest, *nodes)
    out = subprocess.run([sys.executable, "-m", "node", "credit", "--json", "--manifest", str(manifest), "--ledger",
                          *evidence(*nodes)], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    return {row["peer_id"]: row for row in map(json.loads, out.stdout.splitlines()) if "peer_id" in row}


@pytest.mark.timeout(240)
def test_node_behind_nat_trains_with_two_public_hosts(tmp_path, tiny_base, spawn_node, nat_net):
    net = nat_net(2, 1)
    manifest = _manifest(tmp_path, tiny_base)
    p0 = spawn_node(manifest, "p0", "--min-peers", "3", prefix=net.prefix(0), host=net.ip(0))
    first = p0.wait_info()["maddrs"]
    p1 = spawn_node(manifest, "p1", "--min-peers", "3", "--initial-peers", *first, prefix=net.prefix(1), host=net.ip(1))
    home = spawn_node(manifest, "home", "--min-peers", "3", "--initial-peers", *first, prefix=net.prefix(2), host=net.ip(2))
    nodes = (p0, p1, home)
    assert [n.wait_info()["reachability"] for n in nodes] == ["public", "public", "outbound-only"]
    for n in nodes:
        assert n.wait_exit(timeout=150) == 0, n.log.read_text()[-3000:]
    _trained_together(nodes, 3)
    credit = _credited(manifest, nodes)
    assert credit[home.info()["peer_id"]]["rounds"] == ROUNDS, credit
    # its bytes went out through the router (masqueraded), over connections the home node opened
    assert net.masqueraded(0) > 0


@pytest.mark.timeout(240)
def test_two_nodes_behind_two_nats_train_through_one_public_host(tmp_path, tiny_base, spawn_node, nat_net):
    """Neither home node can dial the other: both send their parts to the public node, which holds the whole
    all-reduce (the home nodes' peer fractions are 0) and sends each the sums back on the same connection."""
    net = nat_net(1, 2)
    manifest = _manifest(tmp_path, tiny_base)
    pub = spawn_node(manifest, "pub", "--min-peers", "3", prefix=net.prefix(0), host=net.ip(0))
    first = pub.wait_info()["maddrs"]
    homes = [spawn_node(manifest, f"home{j}", "--min-peers", "3", "--initial-peers", *first, prefix=net.prefix(1 + j),
                        host=net.ip(1 + j)) for j in range(2)]
    nodes = (pub, *homes)
    assert [n.wait_info()["reachability"] for n in nodes] == ["public", "outbound-only", "outbound-only"]
    for n in nodes:
        assert n.wait_exit(timeout=200) == 0, n.log.read_text()[-3000:]
    _trained_together(nodes, 3)
    credit = _credited(manifest, nodes)
    assert all(credit[h.info()["peer_id"]]["rounds"] == ROUNDS for h in homes), credit
    # the path: each home node -> its router (masquerade) -> the public node; never home to home
    assert net.masqueraded(0) > 0 and net.masqueraded(1) > 0
    # each home node's traffic is what it sends the reducer and gets back: a public node's traffic is larger
    sent = {n.home.name: sum(r["sent_bytes"] for r in n.rounds()) for n in nodes}
    assert sent["pub"] > max(sent["home0"], sent["home1"]), sent


@pytest.mark.timeout(240)
def test_status_and_doctor_report_reachability_on_each_host(tmp_path, tiny_base, spawn_node, nat_net):
    """A public node and a home node train; `status` on each says what the dial-back found, the public node
    sees the home node as outbound-only in its heartbeat, and `doctor` on a second public host and on the home
    host gives each its reachability and fix."""
    net = nat_net(2, 1)
    manifest = write_test_manifest(tmp_path / "swarm.toml", tiny_base, rounds={"max_rounds": 100000})
    p0 = spawn_node(manifest, "p0", "--min-peers", "2", prefix=net.prefix(0), host=net.ip(0))
    first = p0.wait_info()["maddrs"]
    home = spawn_node(manifest, "home", "--min-peers", "2", "--initial-peers", *first, prefix=net.prefix(2), host=net.ip(2))
    home.wait_round(2, timeout=150)
    st = _status(home)
    assert st["reachability"] == "outbound-only" and "forward TCP port" in st["reachability_fix"], st
    st0 = _status(p0)
    assert st0["reachability"] == "public" and st0["peers"] == 1, st0
    peers = subprocess.run([sys.executable, "-m", "node", "peers", "--socket", str(p0.home / "node.sock"), "--json"],
                           capture_output=True, text=True, cwd=REPO, timeout=60)
    seen = {p["peer_id"]: p["reachability"] for p in json.loads(peers.stdout)}
    assert seen == {home.info()["peer_id"]: "outbound-only"}, seen
    reports = {}
    for i, name in ((1, "public host"), (2, "home host")):
        out = subprocess.run([*net.prefix(i), sys.executable, "-m", "node", "doctor", "--json", "--home", str(tmp_path / f"doc{i}"),
                              "--host-maddrs", f"/ip4/{net.ip(i)}/tcp/0", "--initial-peers", *first],
                             capture_output=True, text=True, cwd=REPO, timeout=150)
        assert out.returncode in (0, 1), out.stderr[-3000:]
        reports[name] = json.loads(out.stdout)
    check = {name: next(c for c in r["checks"] if c["name"] == "reachability") for name, r in reports.items()}
    assert reports["public host"]["reachability"] == "public", check
    assert check["public host"]["status"] == "pass" and "nothing to do" in check["public host"]["detail"]
    assert reports["home host"]["reachability"] == "outbound-only", check
    assert check["home host"]["status"] == "warn" and "forward TCP port" in check["home host"]["fix"], check
    # the home node kept training with p0 all along: same adapter after the same rounds
    both = [{r["round"]: r["hash"] for r in n.rounds() if r["applied"]} for n in (p0, home)]
    common = set(both[0]) & set(both[1])
    assert len(common) >= 2 and all(both[0][r] == both[1][r] for r in common)


@pytest.mark.timeout(300)
def test_node_behind_nat_killed_mid_round_and_restarted(tmp_path, tiny_base, spawn_node, nat_net):
    """As in the churn tests: the home node is SIGKILLed (with its p2pd and averagers) inside a round; the public
    nodes finish or retry that round without it and never disagree; restarted from its home folder, it finds it
    is still outbound-only, catches up from the public nodes and trains with them again, adapters identical."""
    import os
    import signal

    rounds = 40
    net = nat_net(2, 1)
    manifest = write_test_manifest(tmp_path / "swarm.toml", tiny_base, rounds={"max_rounds": rounds})
    p0 = spawn_node(manifest, "p0", "--min-peers", "3", prefix=net.prefix(0), host=net.ip(0))
    first = p0.wait_info()["maddrs"]
    p1 = spawn_node(manifest, "p1", "--min-peers", "3", "--initial-peers", *first, prefix=net.prefix(1), host=net.ip(1))
    home_args = ("--initial-peers", *first)
    home = spawn_node(manifest, "home", "--min-peers", "3", *home_args, prefix=net.prefix(2), host=net.ip(2))
    home.wait_round(4, timeout=150)
    time.sleep(0.3)  # inside round 4 or 5: compute or all-reduce
    os.killpg(home.popen.pid, signal.SIGKILL)
    home.popen.wait(timeout=30)
    killed_at = time.time()
    before = {r["round"] for r in home.rounds() if r["applied"]}
    deadline = killed_at + 60
    while not any(r["time"] > killed_at for r in p0.applied().values()) and time.time() < deadline:
        time.sleep(0.2)  # the public pair goes on without it ...
    for n in (p0, p1):  # ... and then waits: its 0.3-s rounds would end all 40 before a restart on a busy box
        with ControlClient(n.home / "node.sock") as client:  # (seen: 22 s from kill to the restarted node's dial)
            client.pause()
    again = spawn_node(manifest, "home", *home_args, home=home.home, prefix=net.prefix(2), host=net.ip(2))
    assert again.wait_info()["reachability"] == "outbound-only"
    for n in (p0, p1):
        with ControlClient(n.home / "node.sock") as client:
            client.resume()
    for n in (p0, p1, again):
        assert n.wait_exit(timeout=200) == 0, n.log.read_text()[-3000:]
    r0, r1 = (n.applied() for n in (p0, p1))
    assert all(r0[r]["hash"] == r1[r]["hash"] for r in set(r0) & set(r1)), "the public nodes disagreed"
    assert len(set(range(rounds)) - set(r0)) <= 2, sorted(set(range(rounds)) - set(r0))
    assert min(r["time"] for r in r0.values() if r["time"] > killed_at) - killed_at < 40
    rejoined = [r for r in again.rounds() if r["applied"] and r["time"] > killed_at and r["groups"] == {"0": 3, "1": 3}]
    assert len(rejoined) >= 3, (sorted(before), again.log.read_text()[-3000:])
    assert all(r["hash"] == r0[r["round"]]["hash"] for r in rejoined if r["round"] in r0)
    assert again.rounds()[-1]["hash"] == p0.rounds()[-1]["hash"] == p1.rounds()[-1]["hash"]
    verify_ledgers(manifest, p0, p1, again)


@pytest.mark.timeout(180)
def test_with_no_dialable_node_left_the_home_node_says_so(tmp_path, tiny_base, spawn_node, nat_net):
    """The only public node dies: the home node cannot average with anyone (nobody can hold the parts), so instead
    of training alone in silence it says why and what would fix it, and stops training."""
    import os
    import signal

    net = nat_net(1, 1)
    manifest = write_test_manifest(tmp_path / "swarm.toml", tiny_base, rounds={"max_rounds": 100000})
    pub = spawn_node(manifest, "pub", "--min-peers", "2", prefix=net.prefix(0), host=net.ip(0))
    home = spawn_node(manifest, "home", "--min-peers", "2", "--initial-peers", *pub.wait_info()["maddrs"],
                      prefix=net.prefix(1), host=net.ip(1))
    home.wait_round(2, timeout=150)
    os.killpg(pub.popen.pid, signal.SIGKILL)
    pub.popen.wait(timeout=30)
    killed_at = time.time()
    home.wait_log("no node in this swarm can be dialled", timeout=60)
    said_at = time.time()
    text = home.log.read_text()
    assert "forward TCP port" in text[text.index("no node in this swarm can be dialled"):]
    time.sleep(5)
    alone = [r for r in home.rounds() if r["applied"] and r["time"] > said_at]
    assert not alone, alone  # no round trained alone after it said so
    assert _status(home)["state"] == "paused"
    print(f"the home node said so {said_at - killed_at:.1f} s after the public node died")
