"""Whether this worker can reach the job store, shared by the threads that talk to it.

During a Redis restart or a network blip every store call fails for a while. Callers report each failure and
each success here; the first failure logs one line ("unreachable") and the first success after it logs one
line ("reachable again", with the outage's length), so an outage of a minute is two log lines, not a
traceback per write and per poll.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

logger = logging.getLogger(__name__)

# What an unreachable or restarting store raises (BusyLoadingError, "Redis is loading the AOF", is a
# ConnectionError). Anything else is a bug or a refused write, never retried.
STORE_UNREACHABLE: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError)


class StoreOutage:
    """Thread-safe up/down state of the job store as this worker sees it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._up_since = float("-inf")  # a worker that just started held no leases: nothing to wait for

    @property
    def is_down(self) -> bool:
        return self._down_since is not None

    def seconds_up(self) -> float:
        """How long the store has answered since the last outage ended (0 while it is down)."""
        with self._lock:
            return 0.0 if self._down_since is not None else time.monotonic() - self._up_since

    def failed(self, err: BaseException) -> None:
        with self._lock:
            if self._down_since is not None:
                return
            self._down_since = time.monotonic()
        logger.warning("job store unreachable (%s: %s); store writes wait and retry in order, jobs keep running",
                       type(err).__name__, err)

    def answered(self) -> None:
        with self._lock:
            if self._down_since is None:
                return
            down_s = time.monotonic() - self._down_since
            self._down_since = None
            self._up_since = time.monotonic()
        logger.warning("job store reachable again after %.1f s; catching up on the queued writes", down_s)
