"""A bounded bandwidth probe between two peers' p2p daemons.

Every node serves it. `swarmtune doctor` uses it to tell a newcomer how fast its link to the
swarm is, and a node uses it before its first all-reduce with peers to set its averaging
deadline from a measurement rather than a guess (see node/swarm/deadline.py).
"""

from __future__ import annotations

import asyncio
import time

BW_HANDLER = "swarmtune.doctor.bandwidth"  # the name peers already serve; kept for compatibility


async def _bw_stream(request, _context):
    """Runs in the serving DHT process: stream `size[0]` zero bytes in chunks of `size[1]`."""
    from hivemind.proto import runtime_pb2

    total, chunk = int(request.size[0]), max(1, min(int(request.size[1]), 1 << 20))
    payload = bytes(chunk)
    sent = 0
    while sent < total:
        n = min(chunk, total - sent)
        yield runtime_pb2.Tensor(buffer=payload if n == chunk else payload[:n])
        sent += n


async def _serve_bandwidth(_dht, node) -> None:
    from hivemind.proto import runtime_pb2

    await node.p2p.add_protobuf_handler(BW_HANDLER, _bw_stream, runtime_pb2.Tensor, stream_output=True)


async def pull_bandwidth(_dht, node, peer_id: str, total: int, chunk: int, time_limit: float):
    """Runs in the pulling DHT process: (bytes received, seconds, error text or None); never raises."""
    from hivemind.p2p import PeerID
    from hivemind.proto import runtime_pb2

    got = 0
    t0 = time.perf_counter()

    async def consume(stream) -> None:
        nonlocal got
        async for msg in stream:
            got += len(msg.buffer)

    try:
        stream = await node.p2p.iterate_protobuf_handler(
            PeerID.from_base58(peer_id), BW_HANDLER, runtime_pb2.Tensor(size=[total, chunk]), runtime_pb2.Tensor
        )
        # stop at the time limit by cancelling the reader: breaking out of the loop and closing hivemind's
        # stream generator from outside raced with it ("aclose(): asynchronous generator is already running")
        # and left the caller's future unresolved
        await asyncio.wait_for(consume(stream), timeout=time_limit)
    except asyncio.TimeoutError:
        pass  # what arrived in time is the measurement
    except Exception as e:  # returned, not raised: hivemind would log a traceback from the DHT process
        return got, time.perf_counter() - t0, f"{type(e).__name__}: {e}"
    return got, time.perf_counter() - t0, None


def serve_bandwidth_probe(dht, timeout: float = 10.0) -> bool:
    """Let `swarmtune doctor` on other machines measure their bandwidth from this DHT's peer (bounded streams).

    Bounded: a coroutine hivemind's DHT process drops (seen under load: "Task was destroyed but it is
    pending") would otherwise leave this call, and the node's start, waiting forever. Returns whether
    the probe is served."""
    import logging

    try:
        dht.run_coroutine(_serve_bandwidth, return_future=True).result(timeout=timeout)
        return True
    except Exception as e:  # a timeout, or the DHT process is gone: the probe is optional
        logging.getLogger(__name__).warning("not serving the bandwidth probe to peers' `swarmtune doctor` (%s: %s)",
                                            type(e).__name__, e)
        return False


def measure_bandwidth(dht, peer_id: str, *, total: int, chunk: int, time_limit: float) -> tuple[int, float, str | None]:
    """Pull up to `total` bytes (or `time_limit` seconds) from a peer's probe: (bytes, seconds, error or None).
    Never raises: a peer that is gone or a DHT process that died is an error text."""
    from functools import partial

    try:
        return dht.run_coroutine(partial(pull_bandwidth, peer_id=peer_id, total=total, chunk=chunk, time_limit=time_limit),
                                 return_future=True).result(timeout=time_limit + 10)
    except Exception as e:  # a timeout, or the DHT process is gone
        return 0, 0.0, f"{type(e).__name__}: {e}"
