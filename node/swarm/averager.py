"""Every private hivemind hook in one place: the shard averager and what it changes inside hivemind.

hivemind 1.1.12's public API cannot do four things swarmtune needs, so this module reaches in,
and nothing else does:
- a part averaged without every sender must poison the round (`_StrictPartReducer`, installed
  by `install_strict_reducer()` before the averager processes fork);
- the all-reduce must report the values it gave up on and how long it took
  (`_run_allreduce_inplace_`, `_aggregate_with_group`);
- the deadline and the group size change per round, inside the running averager process
  (`_set_deadline`, `_set_target_group_size`, and moshpit re-keying switched off);
- state downloads go to donors the node chose, in its order (`_download_state_from`);
- a peer lost in a partition is dialled again through the p2pd client (`dial_and_ping`).
When hivemind changes, this is the file to read.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Sequence

import torch

from hivemind.averaging import DecentralizedAverager
from hivemind.averaging import allreduce as hivemind_allreduce
from hivemind.averaging.partition import TensorPartReducer
from hivemind.utils import MPFuture

from node.swarm.exact import NUM_LIMBS

logger = logging.getLogger(__name__)

FAILED_KEY = "__swarmtune_failed_values__"
ELAPSED_KEY = "__swarmtune_allreduce_seconds__"
CONNECT_TIMEOUT_S = 5.0  # opening a connection or a stream to a peer (latency-bound, not size-bound)


class _StrictPartReducer(TensorPartReducer):
    """hivemind's reducer, except that a part averaged without every sender comes out as NaN.

    hivemind divides each part by the weight it actually received, so a sender that dropped out
    mid all-reduce silently turns that part into the mean of the others (with two peers: one
    peer's own gradient), and no in-band count can notice: the mean of the count sentinels is
    still exactly one. A NaN part reaches every groupmate, each discards the round, and the
    swarm retries it without the dead peer: nothing it half-sent is counted or credited."""

    def check_current_part_finished(self):
        if self.current_part_accumulated_from == self.num_current_senders < self.num_senders:
            self.accumulator.fill_(float("nan"))
            self.denominator = 1.0
        super().check_current_part_finished()


def install_strict_reducer() -> None:
    """Make hivemind's all-reduce use `_StrictPartReducer`. AllReduceRunner builds its reducer from
    this module-level name, and averager processes inherit it when they fork: call it before the
    first averager starts (`Swarm` does)."""
    hivemind_allreduce.TensorPartReducer = _StrictPartReducer


class ShardAverager(DecentralizedAverager):
    """A hivemind averager over one float32 buffer: a shard's fixed-point gradient in limbs.

    Its state-sharing RPC serves whatever the node last published for this shard
    (adapter tensors + optimizer state + round), captured at a round boundary.
    """

    def __init__(self, numel: int, **kwargs):
        self.buffer = torch.zeros(NUM_LIMBS * numel, dtype=torch.float32)
        self._published: tuple[Any, list[torch.Tensor]] | None = None
        self._published_lock = threading.Lock()
        super().__init__([self.buffer], **kwargs)

    def _call(self, method: str, timeout: float | None, **kwargs):
        """Run `method` in the averager process (through hivemind's pipe) and wait for its result."""
        future = MPFuture()
        self._outer_pipe.send((method, [], dict(kwargs, future=future)))
        return future.result(timeout=timeout)

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
        """Runs in the averager process; remembers how many values came back un-averaged."""
        gid = group_info.group_id if group_id is None else group_id
        await super()._run_allreduce_inplace_(tensors, group_info, group_id=group_id, **kwargs)
        runner = self._running_groups[gid].result()
        self._failed_values = int(runner.tensor_part_container.failed_size)

    async def _aggregate_with_group(self, group_info, min_vector_size: int, **kwargs):
        # hivemind returns success even when parts were lost; pass the count back with the gathered data,
        # and how long the all-reduce itself took (matchmaking excluded), which measures the links
        self._failed_values = 0
        started = time.perf_counter()
        gathered = dict(await super()._aggregate_with_group(group_info, min_vector_size, **kwargs))
        gathered[ELAPSED_KEY] = time.perf_counter() - started
        if self._failed_values:
            gathered[FAILED_KEY] = self._failed_values
        return gathered

    async def _set_deadline(self, seconds: float, future) -> None:
        """Runs in the averager process: the all-reduce deadline, and its per-chunk timeouts in the same
        proportions as at construction (a sender may stall half of it, a reducer all of it)."""
        self._allreduce_timeout = seconds
        self.next_chunk_timeout = seconds / 2
        self.allreduce_kwargs["sender_timeout"] = seconds / 2
        self.allreduce_kwargs["reducer_timeout"] = seconds
        future.set_result(None)

    def set_deadline(self, seconds: float) -> None:
        self._call("_set_deadline", 30, seconds=seconds)

    async def _download_state_from(self, donors: list[str], chunk_timeout: float, future) -> None:
        """Runs in the averager process: hivemind's state download, but from donors the caller chose, in
        the caller's order, and saying which donor sent it. (hivemind's load_state_from_peers orders
        donors by a priority each peer declares about itself: one peer declaring a huge priority would be
        every newcomer's first and only donor, and a corrupt one would keep them from ever syncing.)"""
        from hivemind.compression import deserialize_torch_tensor
        from hivemind.p2p import PeerID
        from hivemind.proto import averaging_pb2
        from hivemind.utils.asyncio import aiter_with_timeout
        from hivemind.utils.streaming import combine_from_streaming

        try:
            for donor in donors:
                try:
                    peer = PeerID.from_base58(donor)
                    if peer == self.peer_id:
                        continue
                    stub = self.get_stub(self._p2p, peer, namespace=self.prefix)
                    # opening the stream is latency-bound: an unreachable donor must not cost the whole deadline
                    stream = await asyncio.wait_for(stub.rpc_download_state(averaging_pb2.DownloadRequest()),
                                                    timeout=min(chunk_timeout, CONNECT_TIMEOUT_S))
                    metadata, parts, tensors = None, [], []
                    async for message in aiter_with_timeout(stream, timeout=chunk_timeout):
                        if message.metadata:
                            metadata = self.serializer.loads(message.metadata)
                        if message.tensor_part.dtype and parts:  # a dtype starts the next tensor
                            tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
                            parts = []
                        parts.append(message.tensor_part)
                    if parts:
                        tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
                    if metadata is not None:
                        future.set_result((donor, metadata, tensors))
                        return
                except Exception as e:  # an unreachable or misbehaving donor (any p2p/proto error): try the next
                    logger.warning("state download from %s… failed: %r", donor[:16], e)
        finally:
            if not future.done():
                future.set_result(None)

    def download_state_from(self, donors: Sequence[str], timeout: float):
        """(donor, metadata, tensors) from the first of `donors` that sends its state, or None."""
        return self._call("_download_state_from", timeout * max(1, len(donors)) + 5, donors=list(donors), chunk_timeout=timeout)

    def publish_state(self, metadata: dict, tensors: Sequence[torch.Tensor]) -> None:
        with self._published_lock:
            self._published = (metadata, [t.detach().cpu().clone() for t in tensors])

    def get_current_state(self):
        with self._published_lock:
            if self._published is None:
                return None, [], None
            meta, tensors = self._published
            return meta, tensors, None

    async def _set_target_group_size(self, size: int, future, min_size: int = 2) -> None:
        """Runs in the averager process: a group assembles as soon as `size` peers joined; when the
        matchmaking time runs out, one of at least `min_size` peers still runs (else it disbands)."""
        mm = self._matchmaking
        keys = mm.group_key_manager
        if not getattr(keys, "_swarmtune_fixed", False):
            # the key is set per round by set_group_bits; hivemind's moshpit re-keying would only fight
            # that, and it crashes (random.sample) when a group outgrows target_group_size
            async def _keep_key(*_args, **_kwargs):
                return None

            keys.update_key_on_group_assembled = _keep_key
            keys.update_key_on_not_enough_peers = _keep_key
            keys._swarmtune_fixed = True
        mm.target_group_size = size
        mm.min_group_size = min_size
        mm.potential_leaders.target_group_size = size
        mm.group_key_manager.target_group_size = size
        future.set_result(None)

    def set_target_group_size(self, size: int, min_size: int = 2) -> None:
        self._call("_set_target_group_size", None, size=size, min_size=min_size)


async def dial_and_ping(peers: list[tuple[str, tuple[str, ...]]], timeout: float, _dht, node) -> list[str]:
    """Runs in the DHT process: connect to each peer at its last known addresses and ping it, which
    puts it back in the routing table of both sides. Returns the peers that answered."""
    from hivemind.p2p import PeerID
    from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError, P2PHandlerError
    from hivemind.utils.multiaddr import Multiaddr

    try:
        connected = {str(info.peer_id) for info in await node.p2p.list_peers()}
    except (P2PDaemonError, P2PHandlerError, OSError) as e:
        logger.warning("cannot list this node's p2p connections (%s); dialling every missing peer", e)
        connected = set()

    async def one(pid: str, addrs: tuple[str, ...]) -> str | None:
        peer = PeerID.from_base58(pid)
        try:
            if pid not in connected:  # a dial to a connected peer is useless, and a cancelled one backs off its dials
                # hivemind has no public "dial this address"; the p2pd client's connect is what bootstrap uses too
                await asyncio.wait_for(node.p2p._client.connect(peer, [Multiaddr(a) for a in addrs]), timeout)
            return pid if await node.protocol.call_ping(peer) is not None else None
        except (asyncio.TimeoutError, P2PDaemonError, P2PHandlerError, OSError, ValueError) as e:
            logger.debug("peer %s… did not answer a redial: %r", pid[:12], e)  # expected while a partition lasts
            return None

    found = await asyncio.gather(*(one(pid, addrs) for pid, addrs in peers))
    return [pid for pid in found if pid]
