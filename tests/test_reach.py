"""The dial-back's pieces without a swarm: which addresses are dialled, what counts as an answer, the fixes."""

from __future__ import annotations

import asyncio

from node.swarm.reach import OUTBOUND_ONLY, PUBLIC, RELAYED, Reachability, _dialable_endpoints, _tcp_dial


def test_only_ip_tcp_addresses_are_dialled_and_at_most_eight():
    addrs = ["/ip4/10.0.0.2/tcp/4001/p2p/12D3KooWX", "/ip6/::1/tcp/4002", "/ip4/10.0.0.2/udp/4001/quic",
             "/ip4/10.0.0.9/tcp/4001/p2p/12D3KooWR/p2p-circuit/p2p/12D3KooWX", "/dns4/example.org/tcp/1", "garbage",
             "/ip4/10.0.0.3/tcp/notaport"]
    assert [(h, p) for h, p, _ in _dialable_endpoints(addrs)] == [("10.0.0.2", 4001), ("::1", 4002)]
    assert len(_dialable_endpoints([f"/ip4/10.0.0.1/tcp/{p}" for p in range(1, 20)])) == 8


def _serve(greeting: bytes):
    async def handle(reader, writer):
        writer.write(greeting)
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()

    return handle


def test_a_dial_counts_only_when_a_libp2p_listener_answers():
    async def main():
        libp2p = await asyncio.start_server(_serve(b"\x13/multistream/1.0.0\n"), "127.0.0.1", 0)
        other = await asyncio.start_server(_serve(b"SSH-2.0-OpenSSH\r\n"), "127.0.0.1", 0)
        ports = [s.sockets[0].getsockname()[1] for s in (libp2p, other)]
        got = [await _tcp_dial("127.0.0.1", p) for p in ports]
        for s in (libp2p, other):
            s.close()
        closed = await _tcp_dial("127.0.0.1", ports[0])  # nothing listens any more: refused
        return got, closed

    (libp2p_ok, other_ok), closed_ok = asyncio.run(main())
    assert libp2p_ok and not other_ok and not closed_ok


def test_each_reachability_names_its_fix():
    nat = Reachability(OUTBOUND_ONLY, "peer X could not dial", port=31337)
    assert not nat.dialable and "forward TCP port 31337" in nat.fix() and "UPnP" in nat.fix()
    assert "you are relayed" in Reachability(RELAYED, "via relay").fix()
    assert Reachability(PUBLIC, "dialled back").fix() == "nothing to do"
    assert "unverified" in Reachability(PUBLIC, "first node", checked=False).fix()
    assert Reachability(OUTBOUND_ONLY, "x", port=1).to_dict()["reachability"] == "outbound-only"
