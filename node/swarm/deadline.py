"""How long one all-reduce may take, from the bytes it moves and the throughput measured so far.

A fixed timeout is wrong twice: too short on a slow home uplink (every round fails and is
retried forever), too long on a LAN (a crashed peer holds the group for the whole timeout).
Before anything was measured the deadline is the manifest's `[averaging] timeout`; after, it is
`margin × bytes ÷ throughput + slack` (at least MIN_S), where throughput is the median of what
recent all-reduces achieved. A sender that stalls for half of it is dropped, so a peer lost mid
all-reduce costs about 1.5× the measured all-reduce time before its group retries, not a
fixed timeout. A round that timed out doubles the next deadline (up to `cap`), so even the
first round on a link slower than assumed gets through on a retry; a success resets it.
"""

from __future__ import annotations

import statistics
from collections import deque

MARGIN = 3.0  # a group is as slow as its slowest link, and CPU load varies round to round
SLACK_S = 2.0  # connection set-up and per-part latency that does not scale with size
HISTORY = 8  # recent rounds in the throughput median
MIN_S = 8.0  # the measured deadline's floor: a sender may pause 4 s (a busy CPU) before it counts as lost


class AveragingDeadline:
    def __init__(self, floor_s: float, cap_s: float | None = None):
        if floor_s <= 0:
            raise ValueError("the averaging timeout must be positive")
        self.floor_s = float(floor_s)  # the deadline until the link is measured
        self.cap_s = float(cap_s) if cap_s is not None else max(600.0, 20 * self.floor_s)
        self._throughput: deque[float] = deque(maxlen=HISTORY)  # bytes/s of recent all-reduces
        self._backoff = 1.0

    @property
    def throughput(self) -> float | None:
        """Median bytes/s of recent all-reduces (None before the first)."""
        return statistics.median(self._throughput) if self._throughput else None

    def observe(self, bytes_moved: int, seconds: float) -> None:
        """A completed all-reduce moved `bytes_moved` per peer in `seconds`."""
        if bytes_moved > 0 and seconds > 0:
            self._throughput.append(bytes_moved / seconds)
        self._backoff = 1.0

    def timed_out(self) -> None:
        """An all-reduce did not finish in time: the next one gets twice as long (up to the cap)."""
        self._backoff = min(self._backoff * 2, self.cap_s / self.floor_s)

    def seconds_for(self, bytes_moved: int) -> float:
        """The deadline for an all-reduce that moves `bytes_moved` per peer."""
        base = self.floor_s
        if self.throughput:
            base = max(MIN_S, MARGIN * bytes_moved / self.throughput + SLACK_S)
        return min(self.cap_s, base * self._backoff)
