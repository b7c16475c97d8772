"""The live status line of `swarmtune run` in an interactive terminal.

    line = start_live_line(view, json_logs=False, last_round=100)   # None when stderr is not a terminal
    line.stop()

On a terminal the node's log scrolls as usual and one line stays pinned below it, redrawn twice a
second from the control view (node.status): state, round (of the swarm's last, with an ETA), loss,
peers, samples/s, averaging time, verified credit, and the stall reason when there is one. With
`--log-format json`, or when stderr is a file or a pipe (systemd, Docker, `> node.log`), nothing
changes: plain log lines only, no escape codes. rich draws the line; the node's log handler is
pointed at rich's stderr proxy while the line is shown, so log lines print above it.
"""

from __future__ import annotations

import logging
import sys

REFRESH_PER_S = 2


def _duration(s: float) -> str:
    s = int(s)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


def status_line(st: dict, *, last_round: int = 0, averaging_s: float | None = None, credit_rounds: int | None = None) -> str:
    """One line of rich markup from a control-view status dict."""
    colour = {"training": "green", "paused": "yellow", "syncing": "yellow", "draining": "yellow"}.get(st["state"], "red")
    parts = [f"[bold {colour}]● {st['state']}[/]"]
    rnd = f"round {st['round']}" + (f"/{last_round}" if last_round else "")
    if last_round and st.get("last_round_s") and st["round"] < last_round:
        rnd += f" (ETA {_duration((last_round - st['round']) * st['last_round_s'])})"
    parts.append(rnd)
    parts.append("loss " + ("-" if st["loss"] is None else f"{st['loss']:.4f}"))
    parts.append(f"{st['peers']} peer{'s' if st['peers'] != 1 else ''}")
    parts.append(f"{st['samples_per_s']:.1f} samples/s")
    if averaging_s is not None:
        parts.append(f"averaging {averaging_s:.2f} s")
    if credit_rounds is not None:
        parts.append(f"credit {credit_rounds} verified rounds")
    line = " · ".join(parts)
    if st.get("stalled"):
        line += f"  [bold red]STALLED: {st['stall_reason']}[/]"
    return line


class LiveLine:
    def __init__(self, view, *, last_round: int, stream):
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text

        self.view = view
        self.last_round = last_round
        self._text = Text
        self.console = Console(file=stream)
        self.live = Live(get_renderable=self._render, console=self.console, refresh_per_second=REFRESH_PER_S,
                         transient=True, redirect_stdout=True, redirect_stderr=True)
        self._handlers: list[logging.StreamHandler] = []

    def _render(self):
        try:
            st = self.view.status()
            own = next((c for c in self.view.credit() if c["peer_id"] == st["peer_id"]), None)
        except Exception as e:  # the line must never take the node down; say what broke instead
            return self._text(f"status unavailable: {e}")
        return self._text.from_markup(status_line(st, last_round=self.last_round,
                                                  credit_rounds=own["verified_rounds"] if own else 0), overflow="ellipsis")

    def start(self) -> "LiveLine":
        self.live.start()
        # the node's handler holds the real stderr; rich's proxy (now sys.stderr) prints above the line
        for h in logging.getLogger().handlers:
            if getattr(h, "_swarmtune", False) and isinstance(h, logging.StreamHandler):
                self._handlers.append(h)
                h.setStream(sys.stderr)
        return self

    def stop(self) -> None:
        self.live.stop()
        for h in self._handlers:
            h.setStream(sys.stderr)


def start_live_line(view, *, json_logs: bool, last_round: int = 0, stream=None) -> LiveLine | None:
    """Show the live line when `stream` (default stderr) is a terminal and logs are human; else None."""
    stream = sys.stderr if stream is None else stream
    if json_logs or not stream.isatty():
        return None
    return LiveLine(view, last_round=last_round, stream=stream).start()
