"""The node's local control service: gRPC over a Unix socket (the server side).

The daemon serves `protocol/control.proto` with `ControlServer(socket_path, view)`,
where `view` is any object that implements `NodeView` (read-only snapshots plus
pause/resume/drain). The CLI (`swarmtune status`, `peers`, `shards`, `pause`,
`resume`, `stop`) talks to it through `node.control_client.ControlClient`; the
errors both sides raise (`ControlError` and its subclasses) live here.

Security model: the socket is bound only to a filesystem path, never TCP, and
is chmod 0600 (its parent directory 0700 when we create it), so only the user
running the daemon can connect. A lock file next to the socket
(`<socket>.lock`, flock) makes a second daemon on the same path refuse to
start instead of stealing the socket.

    server = ControlServer(default_socket_path(), view); server.start(); ...; server.stop()
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import grpc

from node.config import default_home
from protocol import control_pb2, control_pb2_grpc

log = logging.getLogger(__name__)

SOCKET_NAME = "node.sock"
STATES = ("training", "paused", "draining", "syncing", "stopped")
_MAX_UNIX_PATH = 107  # sun_path is 108 bytes including the trailing NUL on Linux


def default_socket_path() -> Path:
    """Where the daemon serves and the CLI looks by default: `$SWARMTUNE_HOME/node.sock`."""
    return default_home() / SOCKET_NAME


class ControlError(Exception):
    """The control service could not be reached or answered with an error."""


class DaemonNotRunning(ControlError):
    """Nothing listens on the control socket."""


class ControlPermissionDenied(ControlError):
    """The socket exists but belongs to another user."""


class SocketInUse(ControlError):
    """A live daemon already serves on this socket path (raised by `ControlServer.start`)."""


class ViewContractError(Exception):
    """A `NodeView` method returned something that does not follow its documented keys."""


class NodeView(Protocol):
    """What the daemon exposes to the control service.

    Every method is called from gRPC worker threads, concurrently with training:
    return snapshots (plain dicts of plain values), never live objects. Dict keys
    are exactly those listed (missing or extra keys are a `ViewContractError`,
    answered to the client as INTERNAL); the proto field of the same name in
    `protocol/control.proto` documents each one. Values marked "or None" may be
    None; all others must be present with the given type.
    """

    def status(self) -> dict:
        """One snapshot of the node.

        round: int            the swarm round (hivemind epoch) the node is in
        loss: float or None   mean loss of the last round (None before the first)
        samples_per_s: float  local throughput over the last round
        tokens_per_s: float
        peers: int            peers seen in the swarm, this node excluded
        state: str            one of STATES: training, paused, draining, syncing, stopped
        swarm_id: str
        peer_id: str          base58
        shards: list[int]     shard indices this node trains
        adapter_hash: str     hex
        rss_bytes: int        resident memory of the daemon
        peak_rss_bytes: int
        gpu_memory_bytes: int allocated CUDA memory, 0 without a GPU
        uptime_s: float
        last_round_s: float or None   duration of the last round
        last_round_at: float or None  unix time the last round ended
        listen_maddrs: list[str]
        samples_total: int    samples trained since the daemon started
        tokens_total: int
        version: str          swarmtune version
        reachability: str     public, relayed or outbound-only (node.swarm.reach)
        reachability_fix: str what to do about it, in one sentence
        stalled: bool         no round ended for too long (node.status.StallWatch)
        stall_reason: str     why, with the figures; empty when not stalled
        """
        ...

    def peers(self) -> list[dict]:
        """Peers currently seen in the swarm, one dict each.

        peer_id: str, multiaddrs: list[str], round: int, shards: list[int],
        last_seen_s: float (seconds since last heard from), reachability: str
        """
        ...

    def shards(self) -> list[dict]:
        """The swarm's adapter shards, one dict each, in index order.

        index: int, layer_start: int, layer_end: int (exclusive),
        trainers: int (peers training it, this node included), local: bool
        """
        ...

    def records(self, from_seq: int) -> list[dict]:
        """This node's ledger records with seq >= from_seq, in seq order.

        May return only a page (the server asks again from the next seq), but
        must return at least one record when one exists. One dict each, made by
        `record_summary(blob, record)` from the ledger's entries:
        seq: int, blob: bytes (the exact signed envelope), record_hash: str,
        peer_id: str, swarm_id: str, round: int, shards: list[int], samples: int,
        tokens: int, loss_before: int, loss_after: int (fixed point, as signed),
        prev_hash: str, adapter_hash: str, start_ms: int, end_ms: int
        """
        ...

    def wait_for_record(self, after_seq: int, timeout: float) -> bool:
        """Block up to `timeout` s until a record with seq > after_seq exists; return whether one does.

        after_seq may be -1 (any record). Used by `Records(follow=true)`; e.g. a
        `threading.Condition` notified by the ledger's append.
        """
        ...

    def credit(self) -> list[dict]:
        """Credit per peer, only verified work, one dict each.

        peer_id: str, verified_rounds: int (credited), claimed_rounds: int, receipted_rounds: int,
        spot_checks_passed: int, spot_checks_failed: int, samples: int, tokens: int,
        share: float (fraction of the swarm's credited samples, 0..1)
        """
        ...

    def pause(self) -> None:
        """Start no new round after the current one (state -> paused). Return promptly."""
        ...

    def resume(self) -> None:
        """Start rounds again (state -> training). Return promptly."""
        ...

    def drain(self) -> None:
        """Begin the SIGTERM path: leave/finish the round, checkpoint, flush, exit 0. Return promptly."""
        ...


def record_summary(blob: bytes, record) -> dict:
    """The `NodeView.records` dict for one ledger entry (`record` is its parsed ContributionRecord)."""
    from protocol.record import record_hash

    return {
        "seq": record.seq, "blob": bytes(blob), "record_hash": record_hash(blob), "peer_id": record.peer_id,
        "swarm_id": record.swarm_id, "round": record.round, "shards": list(record.shards),
        "samples": record.samples, "tokens": record.tokens, "loss_before": record.loss_before,
        "loss_after": record.loss_after, "prev_hash": record.prev_hash, "adapter_hash": record.adapter_hash,
        "start_ms": record.start_ms, "end_ms": record.end_ms,
    }


# ---------------------------------------------------------------- dict -> message


def _to_message(cls: type, values: Any, where: str):
    """Build a proto message from a NodeView dict, strictly: exact keys, checked types."""
    if not isinstance(values, dict):
        raise ViewContractError(f"{where} must be a dict, got {type(values).__name__}")
    fields = cls.DESCRIPTOR.fields_by_name
    missing = sorted(set(fields) - set(values))
    extra = sorted(set(values) - set(fields))
    if missing or extra:
        raise ViewContractError(f"{where}: missing keys {missing}, unknown keys {extra}")
    msg = cls()
    for name, value in values.items():
        field = fields[name]
        if value is None:
            if field.has_presence and field.message_type is None:
                continue  # `optional` scalar left unset, read back as None
            raise ViewContractError(f"{where}[{name!r}] must not be None")
        try:
            if field.enum_type is not None:
                if value not in STATES:
                    raise ValueError(f"state must be one of {STATES}, got {value!r}")
                setattr(msg, name, field.enum_type.values_by_name[f"NODE_STATE_{value.upper()}"].number)
            elif field.is_repeated:
                getattr(msg, name).extend(value)
            else:
                setattr(msg, name, value)
        except (TypeError, ValueError) as e:
            raise ViewContractError(f"{where}[{name!r}] = {value!r}: {e}") from None
    return msg


# ---------------------------------------------------------------- server


class _Servicer(control_pb2_grpc.ControlServicer):
    def __init__(self, view: NodeView, stopping: threading.Event, max_followers: int, poll_s: float):
        self._view = view
        self._stopping = stopping
        self._followers = threading.BoundedSemaphore(max_followers)
        self._max_followers = max_followers
        self._poll_s = poll_s

    def followers_ended(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for every open follow stream to return (once `stopping` is set)."""
        deadline, taken = time.monotonic() + timeout, 0
        while taken < self._max_followers and self._followers.acquire(timeout=max(0.0, deadline - time.monotonic())):
            taken += 1
        for _ in range(taken):
            self._followers.release()
        return taken == self._max_followers

    def _checked(self, context, build):
        try:
            return build()
        except ViewContractError as e:
            log.error("control: NodeView broke its contract: %s", e)
            context.abort(grpc.StatusCode.INTERNAL, f"daemon bug: NodeView.{e}")

    def _list(self, context, method: str, cls, reply_cls, key: str):
        def build():
            items = getattr(self._view, method)()
            return reply_cls(**{key: [_to_message(cls, d, f"{method}()[{i}]") for i, d in enumerate(items)]})

        return self._checked(context, build)

    def _command(self, context, method: str):
        getattr(self._view, method)()
        state = self._checked(context, lambda: _to_message(control_pb2.StatusReply, self._view.status(), "status()").state)
        return control_pb2.CommandReply(state=state)

    def Status(self, request, context):
        return self._checked(context, lambda: _to_message(control_pb2.StatusReply, self._view.status(), "status()"))

    def Peers(self, request, context):
        return self._list(context, "peers", control_pb2.Peer, control_pb2.PeersReply, "peers")

    def Shards(self, request, context):
        return self._list(context, "shards", control_pb2.Shard, control_pb2.ShardsReply, "shards")

    def Credit(self, request, context):
        return self._list(context, "credit", control_pb2.PeerCredit, control_pb2.CreditReply, "peers")

    def Pause(self, request, context):
        return self._command(context, "pause")

    def Resume(self, request, context):
        return self._command(context, "resume")

    def Drain(self, request, context):
        return self._command(context, "drain")

    def Records(self, request, context):
        # Followers hold a worker thread each; cap them so Status always has a thread left.
        if request.follow and not self._followers.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many `follow` record streams open on this daemon")
        try:
            next_seq = request.from_seq
            woke = False
            while True:
                batch = self._view.records(next_seq)
                for i, values in enumerate(batch):
                    msg = self._checked(context, lambda: _to_message(control_pb2.Record, values, f"records()[{i}]"))
                    if msg.seq < next_seq:
                        continue  # the view repeated an older record; never send one twice
                    yield msg
                    next_seq = msg.seq + 1
                if batch:
                    continue
                if not request.follow:
                    return
                if woke:  # the view said a record exists but handed none: don't spin on it
                    time.sleep(self._poll_s)
                woke = False
                while not woke:
                    if self._stopping.is_set() or not context.is_active():
                        return
                    woke = self._view.wait_for_record(next_seq - 1, timeout=self._poll_s)
        finally:
            if request.follow:
                self._followers.release()


class ControlServer:
    """Serves the control API for `view` on the Unix socket `socket_path` (only there)."""

    def __init__(
        self,
        socket_path: Path | str,
        view: NodeView,
        *,
        max_workers: int = 8,
        max_followers: int = 4,
        follow_poll_s: float = 0.5,
    ):
        self.socket_path = Path(socket_path).expanduser().absolute()
        self._view = view
        self._max_workers = max_workers
        self._max_followers = min(max_followers, max_workers - 2)
        self._poll_s = follow_poll_s
        self._stopping = threading.Event()
        self._server: grpc.Server | None = None
        self._servicer: _Servicer | None = None
        self._lock_fd: int | None = None
        self._inode: int | None = None

    def start(self) -> None:
        path = self.socket_path
        if len(os.fsencode(path)) > _MAX_UNIX_PATH:
            raise ControlError(
                f"control socket path {path} is {len(os.fsencode(path))} bytes; Unix sockets allow "
                f"{_MAX_UNIX_PATH}: set a shorter SWARMTUNE_HOME or --socket"
            )
        if not path.parent.exists():
            path.parent.mkdir(parents=True, mode=0o700)
            os.chmod(path.parent, 0o700)  # mkdir's mode is filtered by the umask
        parent_mode = os.stat(path.parent).st_mode
        if parent_mode & stat.S_IWOTH and not parent_mode & stat.S_ISVTX:
            log.warning(
                "%s is writable by every user: anyone could replace the control socket; "
                "use a private directory (SWARMTUNE_HOME or --socket)", path.parent,
            )
        self._lock_fd = self._take_lock(path)
        try:
            self._remove_stale_socket(path)
            server = grpc.server(
                ThreadPoolExecutor(max_workers=self._max_workers, thread_name_prefix="swarmtune-control"),
            )
            self._servicer = _Servicer(self._view, self._stopping, self._max_followers, self._poll_s)
            control_pb2_grpc.add_ControlServicer_to_server(self._servicer, server)
            # bind() creates the socket with the umask's mode; keep it private from the
            # first instant (the umask is process-wide, but only tightened, and briefly).
            old_umask = os.umask(0o177)
            try:
                server.add_insecure_port(f"unix:{path}")
            finally:
                os.umask(old_umask)
            os.chmod(path, 0o600)
            self._inode = os.lstat(path).st_ino
            server.start()
        except BaseException:
            self._release_lock()
            raise
        self._server = server
        log.info("control service listening on unix:%s", path)

    def stop(self, grace: float = 1.0) -> None:
        """Stop serving: open follow streams end, in-flight calls get `grace` seconds."""
        self._stopping.set()
        if self._server is not None:
            # follow streams end within a poll; stopping the server first cut one off under load (UNAVAILABLE)
            self._servicer.followers_ended(grace)
            self._server.stop(grace).wait()
            self._server = None
        try:  # grpc unlinks its socket on shutdown; make sure, but only if it is still ours
            if self._inode is not None and os.lstat(self.socket_path).st_ino == self._inode:
                self.socket_path.unlink()
        except FileNotFoundError:
            pass
        self._inode = None
        self._release_lock()

    def __enter__(self) -> "ControlServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _take_lock(self, path: Path) -> int:
        lock_path = path.with_name(path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SocketInUse(
                f"another swarmtune daemon already serves {path} (it holds {lock_path}); "
                f"stop it with `swarmtune stop --socket {path}` or choose another --socket"
            ) from None
        return fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    @staticmethod
    def _remove_stale_socket(path: Path) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"{path} exists and is not a socket; remove it or choose another --socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)
            log.info("removed stale control socket %s left by a daemon that exited", path)
            return
        finally:
            probe.close()
        raise SocketInUse(
            f"a live process already listens on {path}; stop it (`swarmtune stop --socket {path}`) "
            "or choose another --socket"
        )
