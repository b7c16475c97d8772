"""Every private hivemind hook in one place: the shard averager and what it changes inside hivemind.

hivemind 1.1.12's public API cannot do five things swarmtune needs, so this module reaches in,
and nothing else does:
- the all-reduce must sum integers exactly and send the sums back in the few bits they need, not
  hivemind's float32 difference from each peer's own part (`_ExactSumRunner`, `_ExactPartReducer`,
  over the grid and wire format of node/swarm/exact.py); a part summed without every sender comes
  back INCOMPLETE to every sender, so the whole group retries and nobody applies a partial sum;
- the all-reduce must report the values it gave up on and how long it took
  (`_run_allreduce_inplace_`, `_aggregate_with_group`), and take its parts from the node's codec (`put_parts`);
- the deadline and the group size change per round, inside the running averager process
  (`_set_deadline`, `_set_target_group_size`, and moshpit re-keying switched off);
- state downloads go to donors the node chose, in its order (`_download_state_from`, and
  `first_state_in_dht` for a process that follows a swarm without averaging: `serve --swarm`);
- a peer lost in a partition is dialled again through the p2pd client (`dial_and_ping`);
- requests to the DHT process go over one pipe that hivemind writes from any thread unlocked and
  reads from a non-blocking fd (`guard_request_pipe`).
When hivemind changes, this is the file to read.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import multiprocessing
import os
import threading
import time
from typing import Any, AsyncIterator, Sequence

import torch

from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer
from hivemind.compression import deserialize_torch_tensor
from hivemind.p2p import PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError, P2PHandlerError
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils import MPFuture
from hivemind.utils.asyncio import aiter_with_timeout, attach_event_on_finished
from hivemind.utils.multiaddr import Multiaddr
from hivemind.utils.streaming import combine_from_streaming

from protocol.receipt import spot_checks

from node.swarm.exact import (
    Grid, Layout, ReducerView, check_part, decode_sum, encode_sum, group_exponents, quantize, robust_sum,
)

logger = logging.getLogger(__name__)

FAILED_KEY = "__swarmtune_failed_values__"  # values a reducer never sent back (this peer alone may miss them)
INCOMPLETE_KEY = "__swarmtune_incomplete_values__"  # values summed without every sender (the whole group saw it)
ELAPSED_KEY = "__swarmtune_allreduce_seconds__"
CLIPPED_KEY = "__swarmtune_clipped__"  # {peer id: its part's norm / the median} for parts this node's reducer clipped
RECEIPT_KEY = "__swarmtune_receipt__"  # what this node's reducer saw: ReducerView.to_wire()
EXPONENTS_KEY = "e"  # in each member's gathered metadata: its block exponents for this shard
STEP_KEY = "n"  # and the node's count of its steps on this averager (ties an ask for parts to its step)
SUM_DTYPE = "swarmtune-sum"  # marks a reducer's reply (node.swarm.exact.encode_sum) on the wire
PARTS_TIMEOUT_S = 10.0  # the node answers an ask for parts within milliseconds; this bounds a node that stopped
CONNECT_TIMEOUT_S = 5.0  # opening a connection or a stream to a peer (latency-bound, not size-bound)
KEY_BITS = 16  # matchmaking key bits: the round's low ROUND_BITS, then the attempt within the round
ATTEMPT_BITS = 2
ROUND_BITS = KEY_BITS - ATTEMPT_BITS
# Fault injection for the tests: SWARMTUNE_FAULT_CUT_STREAM=R makes each averager process of this node cut
# its first stream to a reducer in the first attempt of round R before any data went through, as a
# connection lost mid all-reduce would (read when the process starts).
_CUT_STREAM_ROUND = int(os.environ.get("SWARMTUNE_FAULT_CUT_STREAM", "-1") or -1)


def group_key(round_: int, attempt: int) -> str:
    """The matchmaking key bits of a round's attempt: peers in another round or attempt never meet."""
    key = ((round_ % (1 << ROUND_BITS)) << ATTEMPT_BITS) | (attempt % (1 << ATTEMPT_BITS))
    return format(key, f"0{KEY_BITS}b")


async def _held_open(messages, until: asyncio.Event):
    """A sender's parts, then nothing until `until` is set: the stream's end (the reducer's cue to finish and
    close) waits until every sum came back. A reducer that closes right after its last reply races the
    reply: p2pd resets a stream whose other direction is still open (doStreamPipe), and the reset can
    overtake the reply's bytes, so the sender read one part short (seen under load on 2 cores)."""
    async for message in messages:
        yield message
    await until.wait()


async def _cut(messages):
    """A stream to a reducer that ends before any of its messages went through."""
    return
    yield


class _SenderParts:
    """Stands in for hivemind's accumulator tensor: keeps each sender's part (hivemind's reducer calls
    `accumulator.add_(part)`; we pass it (sender, part)), so the sum can clip a part far above the others."""

    def __init__(self):
        self.by_sender: dict[int, torch.Tensor] = {}

    def add_(self, item, alpha=1):
        sender, part = item
        self.by_sender[sender] = part


class _ExactPartReducer(TensorPartReducer):
    """hivemind's reducer, summing integers exactly (int64) instead of averaging floats, each sender's part
    first clipped to `clip` x the median part norm, then, with `trim` > 0, summed as a per-value trimmed mean
    (exact.robust_sum). A part's result is its sum, or None when some sender's piece is missing: hivemind
    would quietly divide by the weight that did arrive (with two peers, one peer's own gradient passing for
    the group's). `clipped`: {sender index: largest norm / median} of the senders whose parts were clipped."""

    def __init__(self, part_shapes, num_senders: int, clip: float = 0.0, trim: float = 0.0):
        self.clip, self.trim = clip, trim
        self.clipped: dict[int, float] = {}
        # per sender: sha256 over its parts as received (its commitment in this node's receipt), and the parts
        # themselves (a drawn spot-check compares them with a recomputation)
        self.hashes: dict[int, Any] = {}
        self.kept: dict[int, list[torch.Tensor]] = {}
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self):
        assert self.current_part_accumulated_from == self.num_current_senders or self.current_part_index == -1
        if self.current_part_index >= self.num_parts - 1:
            self.finalize()
            return
        self.current_part_index += 1
        self.current_part_accumulated_from = 0
        self.current_part_future = asyncio.Future()
        self.num_current_senders = sum(self.current_part_index < failed for failed in self.sender_failed_after)
        self.accumulator = _SenderParts()
        self.denominator = 0.0

    async def accumulate_part(self, sender_index: int, part_index: int, tensor_part: torch.Tensor, weight: float = 1.0):
        return await super().accumulate_part(sender_index, part_index, (sender_index, tensor_part), weight=1)  # a sum: no weights

    def check_current_part_finished(self):
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from == self.num_current_senders:
            complete = self.current_part_accumulated_from == self.num_senders
            total = None
            if complete:
                senders = sorted(self.accumulator.by_sender)
                for i in senders:
                    part = self.accumulator.by_sender[i]
                    self.hashes.setdefault(i, hashlib.sha256()).update(part.numpy().tobytes())
                    self.kept.setdefault(i, []).append(part)
                total, clipped = robust_sum([self.accumulator.by_sender[i] for i in senders], self.clip, self.trim)
                for pos, ratio in clipped.items():
                    self.clipped[senders[pos]] = max(ratio, self.clipped.get(senders[pos], 0.0))
            self.current_part_future.set_result(total)
            self.reset_accumulators()


class _ExactSumRunner(AllReduceRunner):
    """hivemind's butterfly all-reduce over integer parts on a shared grid (node/swarm/exact.py).

    Senders' parts travel as hivemind serialises them (raw int8/int32); each reducer sums them exactly
    and sends every sender the same reply: the part's sum in `sum_bits` bits, or INCOMPLETE. The runner
    yields the sums (int32), never a float average, so every member ends with the same integers."""

    def __init__(self, *, grid: Grid, clip: float = 0.0, trim: float = 0.0, cut_first_stream: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.grid = grid
        self._cut_first_stream = cut_first_stream
        self.group = len(self.sender_peer_ids)
        self.incomplete_values = 0
        self._part_sizes = [[part.numel() for part, _ in parts] for parts in self.tensor_part_container._input_parts_by_peer]
        self._replies: dict[int, bytes] = {}  # part index -> the encoded sum every sender gets
        self.tensor_part_reducer.finished.set()  # the float reducer hivemind made is never used
        self.tensor_part_reducer = _ExactPartReducer(tuple(p.shape for p in self.parts_for_local_averaging), self.group, clip, trim)

    def finalize(self, *, cancel: bool = False, exception: BaseException | None = None):
        # hivemind keeps a failed or cancelled all-reduce's error in the runner's future, which nothing awaits
        # (the error reaches the step through the iterator), so asyncio logged "Future exception was never
        # retrieved" with a traceback after every timed-out attempt; read it here, where it is set
        super().finalize(cancel=cancel, exception=exception)
        if self._future.done() and not self._future.cancelled():
            self._future.exception()

    def reducer_view(self, sums: torch.Tensor, checker_rate: float) -> "ReducerView":
        """What this node's reducer saw of a completed sum: every sender's part hash, the result's hash and,
        for each member the round's result draws for a spot-check by this node, its part (node.spotcheck)."""
        reducer = self.tensor_part_reducer
        members = sorted(p.to_base58() for p in self.ordered_peer_ids)
        result = hashlib.sha256(sums.contiguous().numpy().tobytes()).hexdigest()
        commitments = {self.sender_peer_ids[i].to_base58(): h.hexdigest() for i, h in reducer.hashes.items()}
        my_index = self.ordered_peer_ids.index(self.peer_id)
        offset = sum(sum(sizes) for sizes in self._part_sizes[:my_index])
        me = self.peer_id.to_base58()
        reducers = sorted(p.to_base58() for p, sizes in zip(self.ordered_peer_ids, self._part_sizes) if sum(sizes))
        parts = {}
        if commitments and checker_rate > 0:
            for checker, target in spot_checks(result, members, checker_rate, reducers):
                index = next((i for i, p in enumerate(self.sender_peer_ids) if p.to_base58() == target), None)
                if checker == me and index in reducer.kept:
                    parts[target] = torch.cat(reducer.kept[index])
        return ReducerView(members, result, commitments, offset, parts, reducers)

    def clipped_senders(self) -> dict[str, float]:
        """{peer id: norm / median} of the senders whose parts this reducer clipped."""
        return {self.sender_peer_ids[i].to_base58(): r for i, r in self.tensor_part_reducer.clipped.items()}

    def _register(self, peer_index: int, part_index: int, total: torch.Tensor | None) -> None:
        numel = self._part_sizes[peer_index][part_index]
        if total is None:
            self.incomplete_values += numel
            total = torch.zeros(numel, dtype=torch.int32)
        self.tensor_part_container.register_processed_part(peer_index, part_index, total.to(torch.int32))

    async def _communicate_with_peer(self, peer_id):
        """Send my parts to one reducer and take the sums it sends back (hivemind's loop, our format)."""
        peer_index = self.ordered_peer_ids.index(peer_id)
        if peer_id == self.peer_id:
            sender_index = self.sender_peer_ids.index(peer_id)
            for part_index, part in enumerate(self.parts_for_local_averaging):
                total = await self.tensor_part_reducer.accumulate_part(sender_index, part_index, part)
                self._register(peer_index, part_index, total)
            return
        done_sending, received_all = asyncio.Event(), asyncio.Event()
        try:
            inputs = attach_event_on_finished(self._generate_input_for_peer(peer_index), done_sending)
            if not self.should_delay_results(self.peer_id):
                # (a reducer sends a client-mode sender nothing before its input ended: that one cannot wait)
                inputs = _held_open(inputs, received_all)
            if self._cut_first_stream:
                self._cut_first_stream = False
                logger.warning("fault injection: cutting this all-reduce stream to %s", peer_id)
                inputs = _cut(inputs)
            stream = await self._get_peer_stub(peer_id).rpc_aggregate_part(inputs)
            if self.should_delay_results(self.peer_id):
                await done_sending.wait()
            expected = self.tensor_part_container.num_parts_by_peer[peer_index]
            part_index = 0
            async for msg in aiter_with_timeout(stream, self.reducer_timeout):
                if msg.code != averaging_pb2.AVERAGED_PART:
                    raise AllreduceException(f"{peer_id} sent {averaging_pb2.MessageCode.Name(msg.code)}")
                if part_index >= expected or msg.tensor_part.dtype != SUM_DTYPE:
                    raise AllreduceException(f"{peer_id} sent an unexpected part")
                total = decode_sum(msg.tensor_part.buffer, self.grid, self.group, self._part_sizes[peer_index][part_index])
                self._register(peer_index, part_index, total)
                part_index += 1
                if part_index == expected:
                    received_all.set()  # now the stream may end (_held_open)
            if part_index != expected:
                raise AllreduceException(f"peer {peer_id} sent {part_index} parts, but we expected {expected}")
        except BaseException as e:
            received_all.set()
            if isinstance(e, Exception):
                logger.debug("all-reduce with %s failed: %r", peer_id, e)
            self.tensor_part_container.register_failed_reducer(peer_index)
            raise

    async def _accumulate_parts_streaming(self, stream: AsyncIterator[averaging_pb2.AveragingData], sender_index: int):
        """As a reducer: check and add one sender's parts, and send back each part's sum once complete."""
        part_index = 0
        my_index = self.ordered_peer_ids.index(self.peer_id)
        try:
            async for msg in stream:
                if part_index >= self.tensor_part_reducer.num_parts:
                    raise AllreduceException("a sender sent more parts than it has")
                numel = self._part_sizes[my_index][part_index]
                part = deserialize_torch_tensor(msg.tensor_part).reshape(-1)
                check_part(part, self.grid, numel)  # WireError: the sender is banned, its part is never summed
                try:
                    total = await self.tensor_part_reducer.accumulate_part(sender_index, part_index, part)
                except BannedException:
                    break
                if part_index not in self._replies:  # every sender gets the same bytes: encode once
                    self._replies[part_index] = encode_sum(total, self.grid, self.group, numel)
                reply = runtime_pb2.Tensor(buffer=self._replies[part_index], size=[numel], dtype=SUM_DTYPE)
                part_index += 1
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=reply)
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])


class ShardAverager(DecentralizedAverager):
    """A hivemind averager that sums one shard's contributions exactly on the group's grid.

    The codec runs in the node's process, where the contribution lives (on the GPU when the adapter does):
    once matchmaking has gathered the members' block exponents, this process puts the group's grid in `grid`
    and asks; the node quantizes on it and leaves the integers in `parts` (`put_parts`); this process sums
    them with the group into `sums`. Its state-sharing RPC serves whatever the node last published for this
    shard (adapter tensors + optimizer state + round), captured at a round boundary.
    """

    def __init__(self, sizes: Sequence[int], grid: Grid, clip: float = 0.0, trim: float = 0.0,
                 spot_check_rate: float = 0.0, **kwargs):
        self.layout = Layout(sizes)
        self.wire = grid
        self.clip = clip
        self.trim = trim  # > 0: reducers sum each value as a trimmed mean ([sync] robust = "trimmed")
        self.spot_check_rate = spot_check_rate  # members drawn for a spot-check keep their parts (ReducerView)
        self.grid = torch.zeros(self.layout.num_blocks, dtype=torch.int8).share_memory_()  # made before the fork
        self._asked = multiprocessing.Value("q", 0)  # asks for parts made: the node answers the last one ...
        self._asked_step = multiprocessing.Value("q", -1)  # ... if it came from this step (its STEP_KEY)
        self._given = multiprocessing.Value("q", 0)  # the ask whose parts the node put in `parts`
        self.parts = torch.zeros(self.layout.numel, dtype=grid.dtype)
        self.sums = torch.zeros(self.layout.numel, dtype=torch.int32)
        self._published: tuple[Any, list[torch.Tensor]] | None = None
        self._published_lock = threading.Lock()
        super().__init__([self.parts, self.sums], **kwargs)

    def put_parts(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Node process: if the group of `step` (its STEP_KEY) asked, quantize `x` on its grid where `x` lives and
        hand over the parts: (grid, q * 2**e on x's device, q on the host), else None. An earlier step's ask is
        never answered: its all-reduce times out rather than sum this step's parts."""
        with self._asked.get_lock():
            asked = self._asked.value
            if asked == self._given.value or self._asked_step.value != step:
                return None
            exps = self.grid.clone()
        q, sent = quantize(x, exps, self.layout, self.wire)
        q = q.cpu()  # the parts' bytes, on the host (one byte per value on the int8 grid): what crosses the wire
        self.parts.copy_(q)
        self._given.value = asked  # after the parts are in place: the averager process reads them once it sees this
        return exps, sent, q

    async def _parts_on(self, exps: torch.Tensor, step: int, timeout: float) -> torch.Tensor:
        """Averager process: ask for the node's parts of `step` on the group's grid; AllreduceException if late."""
        with self._asked.get_lock():
            self.grid.copy_(exps)
            self._asked_step.value = step
            ticket = self._asked.value = self._asked.value + 1
        deadline = time.monotonic() + timeout
        while self._given.value != ticket:
            if time.monotonic() > deadline:
                raise AllreduceException(f"the node put no parts on the group's grid within {timeout:.1f} s")
            await asyncio.sleep(0.001)
        return self.parts.clone()

    async def _declare_for_download_periodically(self):
        """Runs in the averager process; hivemind stores `<prefix>.all_averagers` here every declare period for
        its own load_state_from_peers. Donors come from the swarm's peer view instead (statesync, quorum), so
        nothing reads that key: it was a DHT store per shard every few seconds for nothing, and one still on its
        way to the DHT process when this process stopped made the DHT process log a traceback at every exit."""

    def _call(self, method: str, timeout: float | None, **kwargs):
        """Run `method` in the averager process (through hivemind's pipe) and wait for its result."""
        future = MPFuture()
        self._outer_pipe.send((method, [], dict(kwargs, future=future)))
        return future.result(timeout=timeout)

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
        """Runs in the averager process: get the node's parts on the group's grid, sum exactly, leave the sums."""
        _parts, sums = tensors
        group_id = group_info.group_id if group_id is None else group_id
        claims = [self.serializer.loads(self.serializer.loads(raw)[2]) for raw in group_info.gathered]
        exps = group_exponents([c.get(EXPONENTS_KEY) if isinstance(c, dict) else None for c in claims], self.layout)
        step = int(claims[group_info.peer_ids.index(self.peer_id)].get(STEP_KEY, -1))  # our own: a dict we gathered
        q = await self._parts_on(exps, step, timeout=min(PARTS_TIMEOUT_S, self._allreduce_timeout or PARTS_TIMEOUT_S))
        cut = _CUT_STREAM_ROUND >= 0 and self._matchmaking.group_key_manager.group_bits == group_key(_CUT_STREAM_ROUND, 0)
        runner = _ExactSumRunner(grid=self.wire, p2p=self._p2p, servicer_type=type(self), prefix=self.prefix,
                                 tensors=[q], group_id=group_id, ordered_peer_ids=group_info.peer_ids,
                                 clip=self.clip, trim=self.trim, cut_first_stream=cut, **kwargs)
        assert group_id in self._running_groups, "the group was not registered"
        self._running_groups[group_id].set_result(runner)
        async for total in runner:
            sums.copy_(total.view(-1))
        self._failed_values = int(runner.tensor_part_container.failed_size)
        self._incomplete_values = runner.incomplete_values
        self._clipped = runner.clipped_senders()
        if not self._failed_values and not self._incomplete_values:
            self._view = runner.reducer_view(sums, self.spot_check_rate).to_wire()

    async def _aggregate_with_group(self, group_info, min_vector_size: int, **kwargs):
        # hivemind returns success even when parts were lost; pass the counts back with the gathered data,
        # and how long the all-reduce itself took (matchmaking excluded), which measures the links
        self._failed_values = self._incomplete_values = 0
        self._clipped, self._view = {}, None
        started = time.perf_counter()
        gathered = dict(await super()._aggregate_with_group(group_info, min_vector_size, **kwargs))
        gathered[ELAPSED_KEY] = time.perf_counter() - started
        if self._failed_values:
            gathered[FAILED_KEY] = self._failed_values
        if self._incomplete_values:
            gathered[INCOMPLETE_KEY] = self._incomplete_values
        if self._clipped:
            gathered[CLIPPED_KEY] = self._clipped
        if self._view is not None:
            gathered[RECEIPT_KEY] = self._view
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
        result = None
        try:
            result = await first_state(self._p2p, self.prefix, [d for d in donors if d != str(self.peer_id)], chunk_timeout)
        finally:
            future.set_result(result)

    def download_state_from(self, donors: Sequence[str], timeout: float):
        """(donor, metadata, tensors) from the first of `donors` that sends its state, or None."""
        return self._call("_download_state_from", timeout * max(1, len(donors)) + 5, donors=list(donors), chunk_timeout=timeout)

    def publish_state(self, metadata: dict, tensors: Sequence[torch.Tensor]) -> None:
        with self._published_lock:  # the count lets a receiver tell a stream that ended early (state_incomplete)
            self._published = (dict(metadata, tensors=len(tensors)), [t.detach().cpu().clone() for t in tensors])

    def get_current_state(self):
        with self._published_lock:
            if self._published is None:
                return None, [], None
            meta, tensors = self._published
            return meta, tensors, None

    async def _set_target_group_size(self, size: int, future, min_size: int = 2, wait: float | None = None) -> None:
        """Runs in the averager process: a group assembles as soon as `size` peers joined; when the
        matchmaking time runs out (`wait` seconds, when given: what a leader declares it waits), one of at
        least `min_size` peers still runs (else it disbands)."""
        mm = self._matchmaking
        if wait is not None:
            mm.min_matchmaking_time = mm.potential_leaders.min_matchmaking_time = float(wait)
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

    async def _set_excluded(self, peers: list, future) -> None:
        """Runs in the averager process: never accept these peers into a group this node leads, and never
        join a group they lead (hivemind's matchmaking has no such filter: its two join hooks are wrapped)."""
        self._excluded = set(peers)
        mm = self._matchmaking
        if not getattr(mm, "_swarmtune_excluding", False):
            check, join = mm._check_reasons_to_reject, mm._request_join_group

            def _check_reasons_to_reject(request, context):
                if context.remote_id.to_base58() in self._excluded:
                    return averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
                return check(request, context)

            async def _request_join_group(leader):
                if leader.to_base58() in self._excluded:
                    return None
                return await join(leader)

            mm._check_reasons_to_reject, mm._request_join_group = _check_reasons_to_reject, _request_join_group
            mm._swarmtune_excluding = True
        future.set_result(None)

    def set_excluded(self, peers: Sequence[str]) -> None:
        self._call("_set_excluded", 30, peers=list(peers))

    def set_target_group_size(self, size: int, min_size: int = 2, wait: float | None = None) -> None:
        self._call("_set_target_group_size", None, size=size, min_size=min_size, wait=wait)


async def fetch_state(p2p, prefix: str, donor: str, chunk_timeout: float) -> tuple[Any, list[torch.Tensor]]:
    """The state a peer's ShardAverager under `prefix` serves: (metadata, tensors); metadata is None when
    it serves nothing. Raises whatever the p2p layer raised (an unreachable or misbehaving donor)."""
    # the handler's name includes the servicer class: the stub must be ShardAverager's
    stub = ShardAverager.get_stub(p2p, PeerID.from_base58(donor), namespace=prefix)
    # opening the stream is latency-bound: an unreachable donor must not cost the whole deadline
    stream = await asyncio.wait_for(stub.rpc_download_state(averaging_pb2.DownloadRequest()),
                                    timeout=min(chunk_timeout, CONNECT_TIMEOUT_S))
    metadata, parts, tensors = None, [], []
    async for message in aiter_with_timeout(stream, timeout=chunk_timeout):
        if message.metadata:
            metadata = ShardAverager.serializer.loads(message.metadata)
        if message.tensor_part.dtype and parts:  # a dtype starts the next tensor
            tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
            parts = []
        parts.append(message.tensor_part)
    if parts:
        try:
            tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
        except (RuntimeError, ValueError):  # cut mid-tensor (seen: a donor stopping); the count says it is short
            pass
    return metadata, tensors


def state_incomplete(metadata: Any, tensors: Sequence[torch.Tensor]) -> str:
    """Why a downloaded state is not whole ("" if it is): the donor says how many tensors it serves, and a
    stream that ended early (the donor left or its connection closed mid-transfer) brings fewer."""
    expected = metadata.get("tensors") if isinstance(metadata, dict) else None
    if isinstance(expected, int) and expected != len(tensors):
        return f"the stream ended after {len(tensors)} of {expected} tensors"
    return ""


async def first_state(p2p, prefix: str, donors: Sequence[str], chunk_timeout: float):
    """(donor, metadata, tensors) from the first of `donors` that serves a whole state under `prefix`, or None."""
    for donor in donors:
        try:
            metadata, tensors = await fetch_state(p2p, prefix, donor, chunk_timeout)
            why = state_incomplete(metadata, tensors)
            if why:
                logger.warning("state download from %s… incomplete (%s); trying the next donor", donor[:16], why)
                continue
            if metadata is not None:
                return donor, metadata, tensors
        except Exception as e:  # an unreachable or misbehaving donor (any p2p/proto error): try the next
            logger.warning("state download from %s… failed: %r", donor[:16], e)
    return None


async def first_state_in_dht(_dht, node, *, prefix: str, donors: Sequence[str], chunk_timeout: float):
    """`first_state` run in a DHT process (DHT.run_coroutine), for a process with no averager of its own."""
    return await first_state(node.p2p, prefix, donors, chunk_timeout)


async def dial_and_ping(peers: list[tuple[str, tuple[str, ...]]], timeout: float, _dht, node) -> list[str]:
    """Runs in the DHT process: connect to each peer at its last known addresses and ping it, which
    puts it back in the routing table of both sides. Returns the peers that answered."""
    try:
        connected = {str(info.peer_id) for info in await asyncio.wait_for(node.p2p.list_peers(), timeout)}
    except (asyncio.TimeoutError, P2PDaemonError, P2PHandlerError, OSError) as e:
        logger.warning("cannot list this node's p2p connections (%s); dialling every missing peer", e)
        connected = set()

    async def one(pid: str, addrs: tuple[str, ...]) -> str | None:
        peer = PeerID.from_base58(pid)
        try:
            if pid not in connected:  # a dial to a connected peer is useless, and a cancelled one backs off its dials
                # hivemind has no public "dial this address"; the p2pd client's connect is what bootstrap uses too
                await asyncio.wait_for(node.p2p._client.connect(peer, [Multiaddr(a) for a in addrs]), timeout)
            return pid if await asyncio.wait_for(node.protocol.call_ping(peer), timeout) is not None else None
        except (asyncio.TimeoutError, P2PDaemonError, P2PHandlerError, OSError, ValueError) as e:
            logger.debug("peer %s… did not answer a redial: %r", pid[:12], e)  # expected while a partition lasts
            return None

    found = await asyncio.gather(*(one(pid, addrs) for pid, addrs in peers))
    return [pid for pid in found if pid]


class _OneWriterPipe:
    """A connection whose `send` holds a lock shared by every process forked after it was made."""

    def __init__(self, conn):
        self._conn = conn
        self._lock = multiprocessing.Lock()

    def send(self, obj) -> None:
        with self._lock:
            self._conn.send(obj)

    def __getattr__(self, name):
        return getattr(self._conn, name)


class _WholeMessages:
    """A connection whose `recv` waits for the whole message, whatever mode the event loop left the fd in."""

    def __init__(self, conn):
        self._conn = conn

    def recv(self):
        fd = self._conn.fileno()
        was = os.get_blocking(fd)
        os.set_blocking(fd, True)
        try:
            return self._conn.recv()
        finally:
            os.set_blocking(fd, was)

    def __getattr__(self, name):
        return getattr(self._conn, name)


def guard_request_pipe(dht) -> None:
    """Make a hivemind.DHT's request pipe safe for a node; call before `run_in_background`. hivemind sends each
    request (a pickle) over one pipe from whichever thread calls get/store/run_coroutine, unlocked, and the DHT
    process reads it from a non-blocking fd (its event loop's reader) as soon as some bytes arrived. A node calls
    from several threads (the round loop, heartbeats, background stores, the credit view) and from its averager
    processes. A request over PIPE_BUF bytes into a full pipe is written in pieces: two of them interleaved, or
    the reader took half of one, and the DHT process died on a broken pickle (seen: "pickle data was truncated"
    while a node's credit view read the DHT and its republisher stored batches). Writers take turns (a
    multiprocessing lock, so forked averager processes take it too) and the reader waits for whole messages."""
    if not isinstance(dht._outer_pipe, _OneWriterPipe):
        dht._outer_pipe = _OneWriterPipe(dht._outer_pipe)
        dht._inner_pipe = _WholeMessages(dht._inner_pipe)
