"""The client of the node's control service (`node.control`): gRPC over the daemon's Unix socket.

`ControlClient(socket_path)` talks to the daemon serving that socket (default
`$SWARMTUNE_HOME/node.sock`); it checks the path and opens the channel on first
use. Queries return the daemon's `NodeView` snapshots as dicts, commands the
node's state; every failure is a `ControlError` (or a subclass, from
`node.control`). `records(from_seq, follow)` returns a `RecordStream` of ledger
record dicts; with `follow` it stays open, blocking for new records, until the
daemon stops or `cancel()` is called (from any thread).

    with ControlClient(path) as client: print(client.status()["round"])
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path
from typing import Any

import grpc

from node.control import ControlError, ControlPermissionDenied, DaemonNotRunning, default_socket_path
from protocol import control_pb2, control_pb2_grpc


def _to_dict(msg) -> dict:
    """A reply message as the same dict shape the NodeView returned."""
    out: dict[str, Any] = {}
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        if field.message_type is not None:
            out[field.name] = [_to_dict(m) for m in value] if field.is_repeated else _to_dict(value)
        elif field.enum_type is not None:
            out[field.name] = _state_name(value)
        elif field.is_repeated:
            out[field.name] = list(value)
        elif field.has_presence and not msg.HasField(field.name):
            out[field.name] = None
        else:
            out[field.name] = value
    return out


def _state_name(number: int) -> str:
    name = control_pb2.NodeState.Name(number)
    return name.removeprefix("NODE_STATE_").lower()


class ControlClient:
    """Talks to a running daemon; every method raises `ControlError` (or a subclass) on failure.

    Unary calls time out after `timeout` seconds; the daemon answers them from
    snapshots, so a slow answer means a hung daemon.
    """

    def __init__(self, socket_path: Path | str | None = None, timeout: float = 5.0):
        self.socket_path = Path(socket_path).expanduser() if socket_path else default_socket_path()
        self.timeout = timeout
        self._channel: grpc.Channel | None = None
        self._stub: control_pb2_grpc.ControlStub | None = None

    def status(self) -> dict:
        return _to_dict(self._call("Status", control_pb2.StatusRequest()))

    def peers(self) -> list[dict]:
        return _to_dict(self._call("Peers", control_pb2.PeersRequest()))["peers"]

    def shards(self) -> list[dict]:
        return _to_dict(self._call("Shards", control_pb2.ShardsRequest()))["shards"]

    def credit(self) -> list[dict]:
        return _to_dict(self._call("Credit", control_pb2.CreditRequest()))["peers"]

    def pause(self) -> str:
        """Returns the node's state after the command."""
        return _state_name(self._call("Pause", control_pb2.PauseRequest()).state)

    def resume(self) -> str:
        return _state_name(self._call("Resume", control_pb2.ResumeRequest()).state)

    def drain(self) -> str:
        return _state_name(self._call("Drain", control_pb2.DrainRequest()).state)

    def records(self, from_seq: int = 0, follow: bool = False, timeout: float | None = None) -> "RecordStream":
        """Ledger records (dicts as `NodeView.records`) from `from_seq` on.

        With `follow`, the iterator blocks for new records until the daemon stops
        or `cancel()` is called (from any thread).
        """
        call = self._stub_for_call().Records(
            control_pb2.RecordsRequest(from_seq=from_seq, follow=follow), timeout=timeout
        )
        return RecordStream(call, self._translate)

    def wait_until_gone(self, timeout: float, poll_s: float = 0.2) -> bool:
        """Poll until the daemon no longer answers; False if it still does after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.status()
            except DaemonNotRunning:
                return True
            except ControlError:
                pass  # a daemon mid-shutdown may answer oddly; it is gone only when nothing listens
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = self._stub = None

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _not_running(self, why: str = "") -> DaemonNotRunning:
        return DaemonNotRunning(
            f"no swarmtune daemon is listening on {self.socket_path}{why}; "
            "start one with `swarmtune run --manifest ...`"
        )

    def _denied(self) -> ControlPermissionDenied:
        return ControlPermissionDenied(
            f"permission denied on the control socket {self.socket_path}: it is private to the user "
            "running the daemon; run this command as that user"
        )

    def _stub_for_call(self) -> control_pb2_grpc.ControlStub:
        # Check the path first: gRPC's own errors for these cases are vague.
        try:
            st = os.stat(self.socket_path)
        except FileNotFoundError:
            self.close()
            raise self._not_running() from None
        except PermissionError:
            raise self._denied() from None
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"{self.socket_path} is not a socket; pass the daemon's socket with --socket")
        if not os.access(self.socket_path, os.R_OK | os.W_OK):
            raise self._denied()
        if self._stub is None:
            self._channel = grpc.insecure_channel(f"unix:{self.socket_path.absolute()}")
            self._stub = control_pb2_grpc.ControlStub(self._channel)
        return self._stub

    def _call(self, method: str, request):
        stub = self._stub_for_call()
        try:
            return getattr(stub, method)(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise self._translate(e) from None

    def _translate(self, e: grpc.RpcError) -> ControlError:
        code, details = e.code(), e.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE:
            if "Permission denied" in details:
                return self._denied()
            self.close()  # reconnect from scratch next time (a restarted daemon is a new socket)
            return self._not_running(" (the socket is there but nothing answers: the daemon exited)")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return ControlError(
                f"the daemon on {self.socket_path} did not answer within {self.timeout:g} s; "
                "it may be hung (see its log)"
            )
        return ControlError(f"the daemon on {self.socket_path} answered {code.name}: {details}")


class RecordStream:
    """An open `Records` call: iterate for record dicts; `cancel()` ends it quietly."""

    def __init__(self, call, translate):
        self._call = call
        self._translate = translate
        self._cancelled = False

    def __iter__(self) -> "RecordStream":
        return self

    def __next__(self) -> dict:
        try:
            return _to_dict(next(self._call))
        except grpc.RpcError as e:
            if self._cancelled and e.code() == grpc.StatusCode.CANCELLED:
                raise StopIteration from None
            raise self._translate(e) from None

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()

    def __enter__(self) -> "RecordStream":
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()
