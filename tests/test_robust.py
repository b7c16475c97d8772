"""A poisoner in a real 3-node swarm (127.0.0.1, real p2pd, the tiny Llama): instead of its gradient it
sends noise 10^6 times its norm (SWARMTUNE_FAULT_POISON, node/rounds.py, as a modified client would).

Two defences keep the swarm training: the group's grid is at most 8x coarser than its median member needs
(node/swarm/exact.group_exponents), so the poisoner cannot round the others' values away; and every
reducer scales a part above [sync] clip x the median part norm down to that bound before the exact sum
(exact.robust_sum), and the node flags the sender. With [sync] robust = "trimmed" each value of the sum
then also drops the senders' largest and smallest value (of 3: 3 x the median). Every member still gets the
same sum: adapters stay bit-identical, the loss still falls.
"""

from __future__ import annotations

import pytest

from tests.conftest import write_test_manifest

pytestmark = pytest.mark.swarm


@pytest.mark.timeout(300)
@pytest.mark.parametrize("robust", ["clip", "trimmed"])
def test_a_poisoner_is_clipped_and_flagged_and_the_loss_still_falls(tmp_path, tiny_base, spawn_node, robust):
    rounds = 12
    # spot-checks off: this test is about clipping (tests/test_cheaters.py has the poisoner caught and left out)
    manifest = write_test_manifest(tmp_path / "swarm.toml", tiny_base, rounds={"max_rounds": rounds},
                                   credit={"spot_check_rate": 0.0}, sync={"robust": robust})
    a = spawn_node(manifest, "a", "--min-peers", "3")
    peers = a.wait_info()["maddrs"]
    b = spawn_node(manifest, "b", "--min-peers", "3", "--initial-peers", *peers)
    p = spawn_node(manifest, "poisoner", "--min-peers", "3", "--initial-peers", *peers, env={"SWARMTUNE_FAULT_POISON": "1e6"})
    for node in (a, b, p):
        assert node.wait_exit(timeout=240) == 0, node.log.read_text()[-3000:]
    poisoner = p.info()["peer_id"]
    # rounds a node applied whole (a shard whose sum missed it is resynced: that row holds the later state)
    rows = {n.home.name: n.applied() for n in (a, b, p)}
    together = [r for r in range(rounds) if all(r in row for row in rows.values())]
    # a node that comes up late on a busy 2-core box joins as a late joiner a few rounds in
    assert len(together) >= rounds // 2, {n: sorted(r) for n, r in rows.items()}
    for r in together:
        assert len({rows[n][r]["hash"] for n in rows}) == 1, f"round {r}: adapters differ"
    # flagged: whichever reducers summed the poisoner's parts clipped them, every round (hivemind's load
    # balancing may give a shard's whole vector to one reducer, the poisoner's own included), and only its parts
    for r in together:
        assert any(poisoner in rows[n][r]["clipped"] for n in rows), (r, [rows[n][r]["clipped"] for n in rows])
    flagged = [r for r in together if poisoner in rows["a"][r]["clipped"] or poisoner in rows["b"][r]["clipped"]]
    assert len(flagged) >= len(together) // 2, [rows["a"][r]["clipped"] for r in together]
    honest = {a.info()["peer_id"], b.info()["peer_id"]}
    assert not any(set(rows[n][r]["clipped"]) & honest for n in rows for r in together)
    assert f"peer {poisoner} sent a gradient part" in a.log.read_text()
    assert ("per value a trimmed mean" in a.log.read_text()) == (robust == "trimmed")
    # the swarm still learns
    first, last = rows["a"][together[0]]["loss"], rows["a"][together[-1]]["loss"]
    assert last < 0.8 * first, [rows["a"][r]["loss"] for r in together]
