"""The DHT process and its p2p daemon: start it (explaining failures), ask it small things, clean up.

Nothing here knows about rounds or shards: `membership` and `swarm` build on it, and
`doctor` and `swarmtune ledger --dht-peer` use it directly.
"""

from __future__ import annotations

import glob
import logging
import multiprocessing
import os
import socket
import stat
import time
from functools import partial
from typing import Any, Sequence

import hivemind
from hivemind.utils import get_dht_time

from node.swarm.averager import guard_request_pipe

logger = logging.getLogger(__name__)


class SwarmError(RuntimeError):
    """The p2p layer cannot start or reach the swarm; the message names the cause and the fix."""


def dht_time() -> float:
    """The clock DHT expiration times are measured on."""
    return get_dht_time()


def start_dht(
    *,
    initial_peers: Sequence[str] = (),
    host_maddrs: Sequence[str] | None = ("/ip4/127.0.0.1/tcp/0",),
    announce_maddrs: Sequence[str] = (),
    identity_path: str | None = None,
    record_validators: Sequence = (),
    client_mode: bool = False,
    startup_timeout: float = 30,
    retries: int = 2,
) -> hivemind.DHT:
    """Start the DHT + p2pd, turning hivemind's opaque failures into a cause and a fix (SwarmError)."""
    kwargs: dict[str, Any] = dict(
        initial_peers=list(initial_peers),
        start=False,  # started below, once its request pipe is guarded
        record_validators=list(record_validators),
        startup_timeout=startup_timeout,
        client_mode=client_mode,
    )
    if host_maddrs is not None:  # None: hivemind's default
        kwargs["host_maddrs"] = list(host_maddrs)
    if announce_maddrs:
        kwargs["announce_maddrs"] = list(announce_maddrs)
    if identity_path:
        kwargs["identity_path"] = identity_path
        kwargs["check_if_identity_free"] = False
    last: BaseException | None = None
    for attempt in range(retries + 1):
        before = set(multiprocessing.active_children())
        try:
            dht = hivemind.DHT(**kwargs)
            guard_request_pipe(dht)
            dht.run_in_background(await_ready=True)
        except Exception as e:  # hivemind raises P2PDaemonError, RuntimeError, ValueError, ... for the same situations
            last = e
            _join_new_children(before)  # hivemind leaves a DHT process that failed to start to exit alone
            text = str(e).lower()
            # only "nobody answered yet" is worth retrying (the first node may still be starting); a taken
            # port, a malformed address or a bad key fails the same way every time
            if "bootstrap" not in text or attempt == retries:
                break
            delay = min(2.0 * 2**attempt, 10.0)
            logger.warning("no initial peer answered (attempt %d of %d); retrying in %.0f s", attempt + 1, retries + 1, delay)
            time.sleep(delay)
            continue
        return dht
    raise SwarmError(_explain_dht_failure(last, initial_peers, host_maddrs)) from last


def _join_new_children(before: set) -> None:
    for proc in set(multiprocessing.active_children()) - before:
        proc.join(5)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)


def _explain_dht_failure(e: BaseException, initial_peers, host_maddrs) -> str:
    text = f"{type(e).__name__}: {e}"
    low = text.lower()
    if "address already in use" in low or "bind" in low:
        fix = f"another process holds the port in {list(host_maddrs)}; pick another with --host-maddrs or use port 0"
    elif "failed to connect to bootstrap" in low or "initial_peers" in low or "unable to connect" in low:
        fix = f"none of the initial peers {list(initial_peers)} answered; check the addresses (copy them from the first node's log) and that their ports are reachable"
    elif "multiaddr" in low or "invalid" in low or "protocol" in low:
        fix = "an address is malformed; multiaddrs look like /ip4/127.0.0.1/tcp/31337/p2p/12D3KooW..."
    elif "identity" in low or "private key" in low:
        fix = "the identity key could not be used by p2pd; check --key (swarmtune keygen --show)"
    else:
        fix = "run `swarmtune doctor` for a step-by-step check of the p2p daemon"
    return f"the p2p daemon (hivemind DHT) failed to start: {text}. Fix: {fix}"


def peer_id_of(maddr: str) -> str | None:
    """The /p2p/ peer id a multiaddr ends in, or None when it names none (or is malformed)."""
    from hivemind.utils.multiaddr import Multiaddr
    from hivemind.utils.multiaddr.exceptions import Error as MultiaddrError

    try:
        return Multiaddr(maddr)["p2p"]
    except (MultiaddrError, ValueError, KeyError, TypeError):
        return None


async def _ping_rtts(_dht, node, peer_ids: Sequence[str], repeat: int = 3) -> dict:
    """Runs in a DHT process: best-of-`repeat` DHT ping round trip (seconds) per peer, None if it never answered."""
    from hivemind.p2p import PeerID

    out = {}
    for pid in peer_ids:
        best = None
        for _ in range(repeat):
            t0 = time.perf_counter()
            answer = await node.protocol.call_ping(PeerID.from_base58(pid))
            if answer is None:
                break
            rtt = time.perf_counter() - t0
            best = rtt if best is None else min(best, rtt)
        out[pid] = best
    return out


def ping_rtts(dht: hivemind.DHT, peer_ids: Sequence[str], repeat: int = 3) -> dict[str, float | None]:
    """Best DHT ping round trip in seconds to each peer (None: no answer)."""
    return dht.run_coroutine(partial(_ping_rtts, peer_ids=list(peer_ids), repeat=repeat))


def read_swarm_records(initial_peers: Sequence[str], swarm_id: str) -> list[bytes]:
    """Every valid contribution record of a swarm, read by a short-lived client-mode DHT node."""
    from node.swarm.validator import collect_records

    return _read_swarm(initial_peers, swarm_id, collect_records)


def read_swarm_statements(initial_peers: Sequence[str], swarm_id: str) -> dict[str, list[bytes]]:
    """Every valid signed statement of a swarm by kind ({"records", "rotations", "receipts", "checks"}:
    receipts and checks of the rounds the records name), read by a short-lived client-mode DHT node."""
    from node.swarm.validator import collect_all

    return _read_swarm(initial_peers, swarm_id, collect_all)


def _read_swarm(initial_peers: Sequence[str], swarm_id: str, read):
    """`read(dht, swarm_id)` on a short-lived client-mode DHT node that validates the swarm's values."""
    from node.swarm.validator import RecordsValidator

    dht = start_dht(initial_peers=initial_peers, host_maddrs=None, client_mode=True,
                    record_validators=[RecordsValidator(swarm_id)], retries=0)
    try:
        return read(dht, swarm_id)
    finally:
        dht.shutdown()


def stop_children(timeout: float) -> None:
    """hivemind's DHT and averager processes normally exit on shutdown(); one whose p2pd died first can
    linger, and Python would then wait for it forever at exit. Give them `timeout`, then end them."""
    deadline = time.monotonic() + timeout
    for child in multiprocessing.active_children():
        child.join(max(0.0, deadline - time.monotonic()))
    for child in multiprocessing.active_children():
        logger.warning("child process %s (pid %s) did not stop; terminating it", child.name, child.pid)
        child.terminate()
        child.join(2)
        if child.is_alive():
            child.kill()
            child.join(1)


def remove_stale_sockets(pattern: str = "/tmp/hivemind-*.sock") -> int:
    """hivemind's p2p clients leave their unix sockets behind when their process exits. Remove those
    nobody listens on any more (a live node's sockets accept connections and are kept)."""
    removed = 0
    for path in glob.glob(pattern):
        try:
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                continue
        except OSError:
            continue
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            try:
                sock.connect(path)
                continue  # a live listener
            except ConnectionRefusedError:
                pass
            except OSError:
                continue  # not ours to judge (permissions, a path that vanished)
        try:
            os.unlink(path)
            removed += 1
        except OSError:
            pass
    return removed
