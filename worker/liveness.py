"""The engine loop's liveness file: touched at the end of every loop iteration (idle or busy), read by
`python -m worker.heartbeat_probe` (the Kubernetes liveness probe and the compose healthcheck).

A file, not the Redis registry: liveness must not depend on Redis (a Redis outage would otherwise get every
worker restarted, and workers ride outages out with their jobs), and a stale file means exactly one thing —
the loop is stuck inside a step that never returns — even while Celery itself still answers.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)


class LivenessFile:
    """`touch()` sets the file's mtime to now, at most once per `min_interval_s` (a step can be milliseconds)."""

    def __init__(self, path: Path, min_interval_s: float = 1.0) -> None:
        self.path, self.min_interval_s = path, min_interval_s
        self._last_touch = float("-inf")
        self._warned = False

    def touch(self) -> None:
        now = time.monotonic()
        if now - self._last_touch < self.min_interval_s:
            return
        self._last_touch = now
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()
        except OSError as err:  # a read-only or full disk must not stop the loop; the probe will say so
            if not self._warned:
                logger.warning("cannot touch the liveness file %s: %s", self.path, err)
                self._warned = True
