"""Liveness signal of one worker, touched by the engine-loop thread.

Two sinks: a file whose mtime a container health check compares with the clock (`celery inspect ping`
times out on a busy worker, the file does not), and the job store's worker heartbeat that the API's /readyz
reads. The engine loop calls `beat()` every iteration; writes are throttled to `interval_s` so a loop doing a
few hundred steps a second does not turn into a few hundred Redis writes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)


class Heartbeat:
    """Throttled toucher of a heartbeat file and a remote heartbeat callback.

    `remote` is called with no arguments (the worker runtime passes one that queues
    `store.heartbeat(worker_id, info)` on the store-writer thread); its failures are logged, never raised,
    because a Redis hiccup must not stop the engine loop.
    """

    def __init__(self, path: Path | None, remote: Callable[[], None] | None = None,
                 interval_s: float = 2.0) -> None:
        if interval_s <= 0:
            raise ValueError(f"heartbeat interval must be > 0 seconds, got {interval_s}")
        self.path = path
        self.remote = remote
        self.interval_s = interval_s
        self._last_beat = float("-inf")

    def beat(self, force: bool = False) -> bool:
        """Touch both sinks if `interval_s` passed since the last touch (or `force`); True if it touched."""
        now = time.monotonic()
        if not force and now - self._last_beat < self.interval_s:
            return False
        self._last_beat = now
        if self.path is not None:
            self._touch_file(self.path)
        if self.remote is not None:
            try:
                self.remote()
            except Exception:  # noqa: BLE001 - the loop must survive a store outage; the file still beats
                logger.warning("remote heartbeat failed", exc_info=True)
        return True

    @staticmethod
    def _touch_file(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
        os.utime(path, None)

    def age_seconds(self) -> float | None:
        """Seconds since the file was last touched (None if it does not exist): what a health check reads."""
        if self.path is None or not self.path.exists():
            return None
        return time.time() - self.path.stat().st_mtime
