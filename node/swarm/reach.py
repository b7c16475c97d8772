"""Can peers dial this node? Detected at start by a dial-back, not configured by hand.

    serve_dialback(dht)                        # every node answers peers' dial-back requests
    reach = detect_reachability(dht, peers)    # ask a peer to open TCP connections to our addresses

The answer is one of:
- `public`: a peer opened a TCP connection to one of the addresses we announce; we can hold a
  part of the all-reduce and serve state;
- `relayed`: reachable only through a libp2p circuit relay (p2pd's /p2p-circuit addresses);
- `outbound-only`: nobody can dial us (a home router with no port forwarded). Such a node runs its
  DHT and averagers in hivemind's client mode: it sends its parts to the reducers and gets the sums
  back over connections it opened itself, and it is never asked to reduce a part or serve state.

Why our own dial-back and not p2pd's AutoNAT: the AutoNAT server in hivemind 1.1.12's p2pd only
dials public IP addresses and needs several servers to agree, so on a LAN, in a lab or in the
network namespaces of the tests it never leaves "unknown". Why a fresh TCP connection: a libp2p
dial to a peer we are already connected to reuses that connection and proves nothing.

The dial-back is bounded: at most MAX_ADDRS addresses per request, plain TCP connects (nothing sent;
the answer must be a libp2p listener's multistream header) with a short timeout, ip4/ip6 + tcp only.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from functools import partial
from typing import Sequence

logger = logging.getLogger(__name__)

PUBLIC, RELAYED, OUTBOUND_ONLY = "public", "relayed", "outbound-only"
KINDS = (PUBLIC, RELAYED, OUTBOUND_ONLY)
DIALBACK_HANDLER = "swarmtune.reach.dialback"
MAX_ADDRS = 8  # addresses dialled per request at most
DIAL_TIMEOUT_S = 3.0  # one TCP connect; a NAT that drops unsolicited SYNs makes it time out
ASK_PEERS = 3  # peers asked in turn until one answers
MULTISTREAM = b"/multistream/1.0.0"  # what a libp2p TCP listener sends first


@dataclass(frozen=True)
class Reachability:
    kind: str  # public | relayed | outbound-only
    detail: str  # what was measured, in words
    port: int | None = None  # the TCP port peers would have to reach (for the fix)
    checked: bool = True  # False: no peer could be asked (the first node of a swarm)

    @property
    def dialable(self) -> bool:
        return self.kind != OUTBOUND_ONLY

    def fix(self) -> str:
        """What the user can do about it, in one sentence."""
        if self.kind == OUTBOUND_ONLY:
            return ("nothing is needed to train (this node sends its parts over connections it opens); to also hold "
                    "parts and serve state, " + self.forward_fix())
        if self.kind == RELAYED:
            return "nothing to do: you are relayed; forwarding a port would make your traffic direct"
        return "nothing to do" if self.checked else "nothing to do (unverified: no peer was there to dial us back)"

    def forward_fix(self) -> str:
        """How to become dialable: port forwarding on the home router."""
        port = f"TCP port {self.port}" if self.port else "the TCP port of --host-maddrs"
        return (f"forward {port} on your router to this machine (or enable UPnP), start with a fixed port "
                f"(--host-maddrs /ip4/0.0.0.0/tcp/<port>) and announce it with --announce-maddrs /ip4/<public ip>/tcp/<port>")

    def to_dict(self) -> dict:
        return {"reachability": self.kind, "detail": self.detail, "port": self.port, "checked": self.checked,
                "fix": self.fix()}


def _dialable_endpoints(maddrs: Sequence[str]) -> list[tuple[str, int, str]]:
    """(host, port, maddr) for each ip4/ip6 + tcp address (circuit and other transports are skipped)."""
    out = []
    for m in maddrs:
        parts = str(m).split("/")
        if len(parts) >= 5 and parts[1] in ("ip4", "ip6") and parts[3] == "tcp" and "p2p-circuit" not in parts:
            try:
                out.append((parts[2], int(parts[4]), str(m)))
            except ValueError:
                continue
    return out[:MAX_ADDRS]


async def _tcp_dial(host: str, port: int) -> bool:
    """A TCP connection to host:port that a libp2p listener answers: p2pd's TCP transport sends the
    multistream-select header ("\\x13/multistream/1.0.0\\n") as soon as it accepts, so another program that
    happens to hold that port (on the dialler's own LAN, say) does not pass for us."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), DIAL_TIMEOUT_S)
    except (OSError, asyncio.TimeoutError, ValueError):
        return False
    try:
        header = await asyncio.wait_for(reader.read(32), DIAL_TIMEOUT_S)
    except (OSError, asyncio.TimeoutError):
        header = b""
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return MULTISTREAM in header


async def _dialback(request, _context):
    """Runs in the serving DHT process: TCP-connect to each address the requester sent; reply with those that answered."""
    from hivemind.proto import runtime_pb2

    try:
        maddrs = json.loads(bytes(request.buffer).decode())
        assert isinstance(maddrs, list)
    except (ValueError, AssertionError, UnicodeDecodeError):
        maddrs = []
    ends = _dialable_endpoints([str(m) for m in maddrs])
    ok = await asyncio.gather(*(_tcp_dial(h, p) for h, p, _ in ends))
    reached = [m for (_, _, m), good in zip(ends, ok) if good]
    return runtime_pb2.Tensor(buffer=json.dumps(reached).encode())


async def _serve(_dht, node) -> None:
    from hivemind.proto import runtime_pb2

    await node.p2p.add_protobuf_handler(DIALBACK_HANDLER, _dialback, runtime_pb2.Tensor)


def serve_dialback(dht, timeout: float = 10.0) -> bool:
    """Answer peers' dial-back requests from this DHT's p2pd. Returns whether it is served."""
    try:
        dht.run_coroutine(_serve, return_future=True).result(timeout=timeout)
        return True
    except Exception as e:  # a timeout, or the DHT process is gone: newcomers ask another peer
        logger.warning("not serving the reachability dial-back to peers (%s: %s)", type(e).__name__, e)
        return False


async def _ask(_dht, node, peer_id: str, maddrs: list[str], timeout: float):
    """Runs in the asking DHT process: the addresses `peer_id` reached, or an error text."""
    from hivemind.p2p import PeerID
    from hivemind.proto import runtime_pb2

    try:
        reply = await asyncio.wait_for(node.p2p.call_protobuf_handler(
            PeerID.from_base58(peer_id), DIALBACK_HANDLER, runtime_pb2.Tensor(buffer=json.dumps(maddrs).encode()),
            runtime_pb2.Tensor), timeout)
        return [str(m) for m in json.loads(bytes(reply.buffer).decode())], None
    except Exception as e:  # returned, not raised: an old peer without the handler, a peer gone
        return None, f"{type(e).__name__}: {e}"


def _is_loopback(maddr: str) -> bool:
    return str(maddr).startswith(("/ip4/127.", "/ip6/::1/"))


def detect_reachability(dht, peer_ids: Sequence[str], *, maddrs: Sequence[str] | None = None,
                        peer_maddrs: Sequence[str] = ()) -> Reachability:
    """Ask up to ASK_PEERS of `peer_ids` in turn to dial our announced addresses back.

    Loopback addresses are sent only when the peers are on loopback too (`peer_maddrs`, their addresses):
    elsewhere a peer dialling 127.0.0.1 would reach its own machine and prove nothing."""
    mine = [str(a) for a in (maddrs if maddrs is not None else dht.get_visible_maddrs())]
    if not any(_is_loopback(m) for m in peer_maddrs):
        mine = [m for m in mine if not _is_loopback(m)]
    ends = _dialable_endpoints(mine)
    port = ends[0][1] if ends else None
    circuit = [m for m in mine if "p2p-circuit" in m]
    me = str(dht.peer_id)
    asked = [p for p in dict.fromkeys(peer_ids) if p and p != me][:ASK_PEERS]
    errors = []
    for pid in asked:
        try:
            reached, error = dht.run_coroutine(partial(_ask, peer_id=pid, maddrs=[e[2] for e in ends],
                                                       timeout=DIAL_TIMEOUT_S + 5), return_future=True).result(DIAL_TIMEOUT_S + 10)
        except Exception as e:  # the DHT process is gone or its pipe broke
            reached, error = None, f"{type(e).__name__}: {e}"
        if reached is None:
            errors.append(f"{pid[:12]}…: {error}")
            continue
        if reached:
            return Reachability(PUBLIC, f"peer {pid[:12]}… dialled us back at {', '.join(reached)}", port)
        if circuit:
            return Reachability(RELAYED, f"peer {pid[:12]}… could not dial {', '.join(e[2] for e in ends)}; "
                                         f"reachable through the relay at {circuit[0]}", port)
        tried = ", ".join(e[2] for e in ends) or "(no TCP address)"
        return Reachability(OUTBOUND_ONLY, f"peer {pid[:12]}… could not open a connection to {tried} "
                                           f"(no route, refused, or no answer in {DIAL_TIMEOUT_S:.0f} s)", port)
    if not asked:
        return Reachability(PUBLIC, "not checked: no other peer to dial us back (the first node of a swarm is "
                                    "reached at the addresses it prints)", port, checked=False)
    return Reachability(PUBLIC, "not checked: no peer answered the dial-back request (" + "; ".join(errors) + ")",
                        port, checked=False)
