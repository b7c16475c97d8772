"""The node's live web dashboard: one static page and the JSON it draws, served on 127.0.0.1.

    swarmtune run --manifest swarm.toml --dashboard-port 8080      # then open http://127.0.0.1:8080/

    dash = start_dashboard(view, progress=workdir / "rounds.jsonl", port=8080)
    dash.stop()

Routes: `/` is the page (node/builtin/dashboard.html: plain HTML, CSS, JavaScript and inline SVG;
nothing to build, nothing fetched from elsewhere, so it works offline); `/api/overview` is one JSON
snapshot; `/api/events` sends the same snapshot as server-sent events once a second, so the page
updates without reloading. Everything comes from what the control service reads (node.status:
the status board, the peer view, shard coverage, verified credit) plus this node's progress file
(rounds.jsonl: loss, throughput and averaging time per round) and its recent warning log lines.
Read-only: the dashboard has no buttons; pause/resume stay on the 0600 control socket.

The server is the standard library's threading HTTP server in daemon threads, like the metrics
endpoint (no event loop, nothing to install); it binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PAGE = Path(__file__).resolve().parent / "builtin" / "dashboard.html"
HISTORY = 2000  # rounds kept for the curves
WARNINGS = 30  # warning/error log lines kept
EVENT_EVERY_S = 1.0


class WarningLog(logging.Handler):
    """The last WARNINGS warning-or-worse log records of this process, for the page."""

    def __init__(self, size: int = WARNINGS):
        super().__init__(level=logging.WARNING)
        self._items: deque = deque(maxlen=size)
        self._lock2 = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:  # a malformed log call must not break logging
            msg = str(record.msg)
        with self._lock2:
            self._items.append({"time": record.created, "level": logging.getLevelName(record.levelno),
                                "logger": record.name, "msg": msg[:500]})

    def items(self) -> list[dict]:
        with self._lock2:
            return list(self._items)


class ProgressTail:
    """Reads the node's rounds.jsonl as it grows (only the new bytes each time); keeps the last HISTORY points."""

    KEYS = ("round", "loss", "samples", "seconds", "averaging_s", "applied", "time", "peers")

    def __init__(self, path: Path, size: int = HISTORY):
        self.path = Path(path)
        self._offset = 0
        self._partial = b""
        self._points: deque = deque(maxlen=size)
        self._lock = threading.Lock()

    def points(self) -> list[dict]:
        with self._lock:
            self._read()
            return list(self._points)

    def _read(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()  # a line still being written
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            point = {k: row.get(k) for k in self.KEYS}
            if point["seconds"]:
                point["samples_per_s"] = (row.get("samples") or 0) / point["seconds"]
            self._points.append(point)


def _finite(value):
    """JSON for browsers: NaN/inf (a diverged loss) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def overview(view, progress: ProgressTail, warnings: WarningLog) -> dict:
    """Everything the page shows, as one JSON-able dict."""
    status = view.status()
    credit = sorted(view.credit(), key=lambda c: -c["samples"])
    own = next((c for c in credit if c["peer_id"] == status["peer_id"]), None)
    swarm = {"peers": len(credit), "verified_rounds": sum(c["verified_rounds"] for c in credit),
             "samples": sum(c["samples"] for c in credit), "tokens": sum(c["tokens"] for c in credit)}
    return _finite({
        "time": time.time(), "status": status, "peers": view.peers(), "shards": view.shards(),
        "credit": {"own": own, "swarm": swarm, "peers": credit[:50]},
        "history": progress.points(), "warnings": warnings.items(),
    })


@dataclass
class Dashboard:
    """A running dashboard; `port` is the bound one (useful with port=0)."""

    host: str
    port: int
    _server: ThreadingHTTPServer
    _thread: threading.Thread
    _stop: threading.Event
    _warnings: WarningLog

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def stop(self) -> None:
        self._stop.set()
        logging.getLogger().removeHandler(self._warnings)
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_dashboard(view, *, progress: Path, host: str = "127.0.0.1", port: int = 0) -> Dashboard:
    """Serve the dashboard of `view` (node.status.NodeControlView) from daemon threads; port=0 picks a free port."""
    tail = ProgressTail(progress)
    warnings = WarningLog()
    stop = threading.Event()
    page = PAGE.read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # no access log lines in the node's log
            pass

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path in ("/", "/index.html"):
                self._send(200, page, "text/html; charset=utf-8")
            elif path == "/api/overview":
                self._send(200, json.dumps(overview(view, tail, warnings)).encode(), "application/json")
            elif path == "/api/events":
                self._events()
            else:
                self._send(404, b"not found\n", "text/plain")

        def _events(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            try:
                while not stop.is_set():
                    self.wfile.write(b"data: " + json.dumps(overview(view, tail, warnings)).encode() + b"\n\n")
                    self.wfile.flush()
                    stop.wait(EVENT_EVERY_S)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the page was closed

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as e:
        raise OSError(f"cannot serve the dashboard on {host}:{port}: {e.strerror or e}; "
                      "choose another --dashboard-port or stop the process that holds it") from e
    server.daemon_threads = True
    logging.getLogger().addHandler(warnings)
    thread = threading.Thread(target=server.serve_forever, name="dashboard", daemon=True)
    thread.start()
    return Dashboard(host=host, port=server.server_address[1], _server=server, _thread=thread, _stop=stop,
                     _warnings=warnings)
