"""DHT stores on their way: this node's signed records, receipts and spot-checks, not waited for by the round.

Each statement is written to the node's own files before it is published, and the DHT copy is best effort
(node/republish.py stores it again later), so a round need not wait for the ~0.1 s a store takes even on
loopback, or a WAN round trip on a home link (py-spy: three blocking stores were a quarter of a tiny round).
`add` keeps a store's future; failures are logged as they are seen; `flush` waits for the rest at exit.
"""

from __future__ import annotations

import logging
import time

logger = logging.getLogger(__name__)


class PendingStores:
    def __init__(self):
        self._pending: list[tuple[str, object]] = []  # (what, future of the store's bool)

    def add(self, what: str, future) -> None:
        """Keep `future` (a DHT store's) until it settles; False: nothing was sent (the publisher said why)."""
        self._settle(wait=0.0)
        if future is not False:
            self._pending.append((what, future))

    def flush(self, timeout: float = 10.0) -> None:
        """Wait at most `timeout` s for the stores still on their way; what is left is only in the files."""
        self._settle(wait=timeout)
        if self._pending:
            logger.info("%d signed statement(s) not yet in the DHT at exit; they are in this node's files",
                        len(self._pending))
            self._pending = []

    def _settle(self, wait: float) -> None:
        deadline = time.monotonic() + wait
        pending = []
        for what, future in self._pending:
            try:
                stored = future.result(timeout=max(0.0, deadline - time.monotonic())) if wait or future.done() else None
            except TimeoutError:
                stored = None
            except Exception as e:  # the DHT process is gone, or the store failed
                logger.warning("could not publish %s to the DHT: %s", what, e)
                continue
            if not future.done():
                pending.append((what, future))
            elif not stored:
                logger.info("the DHT did not take %s (no peer accepted it): it is in this node's files, and stored "
                            "again later", what)
        self._pending = pending
