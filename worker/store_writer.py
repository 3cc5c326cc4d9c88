"""The one thread that talks to the job store on behalf of the engine loop.

Why a separate thread: the engine loop must go from one step to the next without waiting on Redis round
trips (16 jobs x a draft event per step would otherwise add milliseconds to every step on a tiny model).
The loop hands writes over as closures; this thread runs them strictly in submission order, so a job's
`canvas` events always precede its terminal write, and the terminal write happens before the job's future
is resolved (the Celery task acks only after the result is committed).

It also polls the cancel flags of the jobs in flight every `cancel_poll_s` and publishes the answers as a
set the loop reads without I/O, and renews this worker's leases on them every `renew_every_s` (a lease that
stops being renewed is how another worker learns that this one died). At the same cadence, right after the
renewal (so this worker never reclaims its own jobs because it renewed late), it runs the orphan reaper:
jobs of other workers whose lease lapsed are requeued and re-sent.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

StoreWrite = Callable[[], None]


class StoreWriter:
    """FIFO executor of job-store writes plus a cancel-flag poller.

    `is_cancel_requested(job_id) -> bool` is the store's query; a failing write is logged and skipped (the
    loop keeps serving other jobs; a lost draft event is better than a dead worker).
    """

    def __init__(self, is_cancel_requested: Callable[[str], bool], cancel_poll_s: float = 0.1,
                 renew_leases: Callable[[list[str]], None] | None = None, renew_every_s: float = 2.0,
                 reap_orphans: Callable[[], None] | None = None) -> None:
        if cancel_poll_s <= 0 or renew_every_s <= 0:
            raise ValueError(f"poll intervals must be > 0 seconds, got cancel_poll_s={cancel_poll_s}, "
                             f"renew_every_s={renew_every_s}")
        self._is_cancel_requested = is_cancel_requested
        self._cancel_poll_s = cancel_poll_s
        self._renew_leases = renew_leases
        self._renew_every_s = renew_every_s
        self._reap_orphans = reap_orphans
        self._writes: queue.SimpleQueue[StoreWrite | None] = queue.SimpleQueue()
        self._watched: set[str] = set()
        self._cancelled: frozenset[str] = frozenset()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="dgserve-store-writer", daemon=True)
        self._stopped = False

    def start(self) -> None:
        self._thread.start()

    def submit(self, write: StoreWrite) -> None:
        """Queue one write; it runs after every write submitted before it."""
        if self._stopped:
            raise RuntimeError("StoreWriter is stopped; no more writes are accepted")
        self._writes.put(write)

    def watch(self, job_id: str) -> None:
        with self._lock:
            self._watched.add(job_id)

    def unwatch(self, job_id: str) -> None:
        with self._lock:
            self._watched.discard(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        """The last polled answer (at most `cancel_poll_s` old); never does I/O."""
        return job_id in self._cancelled

    def stop(self, timeout_s: float = 10.0) -> None:
        """Run every queued write, then end the thread."""
        if self._stopped:
            return
        self._stopped = True
        self._writes.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        next_poll = next_renewal = time.monotonic()
        while True:
            timeout = max(0.0, next_poll - time.monotonic())
            try:
                write = self._writes.get(timeout=timeout)
            except queue.Empty:
                write = _NO_WRITE
            if write is None:
                return
            if write is not _NO_WRITE:
                self._run_one(write)
            if time.monotonic() >= next_poll:
                self._poll_cancel_flags()
                next_poll = time.monotonic() + self._cancel_poll_s
            if time.monotonic() >= next_renewal:
                self._renew_all_leases()
                self._reap()
                next_renewal = time.monotonic() + self._renew_every_s

    @staticmethod
    def _run_one(write: StoreWrite) -> None:
        try:
            write()
        except Exception:  # noqa: BLE001 - one failed write must not stop the writes of other jobs
            logger.exception("job store write failed")

    def _renew_all_leases(self) -> None:
        with self._lock:
            watched = sorted(self._watched)
        if not watched or self._renew_leases is None:
            return
        try:
            self._renew_leases(watched)
        except Exception:  # noqa: BLE001 - retried at the next interval; the lease has slack for that
            logger.warning("lease renewal failed", exc_info=True)

    def _reap(self) -> None:
        if self._reap_orphans is None:
            return
        try:
            self._reap_orphans()
        except Exception:  # noqa: BLE001 - orphans stay in the store's index; the next pass finds them again
            logger.warning("orphan reaping failed", exc_info=True)

    def _poll_cancel_flags(self) -> None:
        with self._lock:
            watched = list(self._watched)
        cancelled = set()
        for job_id in watched:
            try:
                if self._is_cancel_requested(job_id):
                    cancelled.add(job_id)
            except Exception:  # noqa: BLE001 - keep the previous answer when the store is unreachable
                logger.warning("cancel-flag poll failed for job %s", job_id, exc_info=True)
                if job_id in self._cancelled:
                    cancelled.add(job_id)
        self._cancelled = frozenset(cancelled)


def _no_write() -> None:
    """Marker: the queue timed out (it is never run)."""


_NO_WRITE: StoreWrite = _no_write
