"""The one thread that writes to the job store on behalf of the engine loop.

Why a separate thread: the engine loop must go from one step to the next without waiting on Redis round
trips (16 jobs x a draft event per step would otherwise add milliseconds to every step on a tiny model).
The loop hands writes over as closures; this thread runs them strictly in submission order, so a job's
`canvas` events always precede its terminal write, and the terminal write happens before the job's future
is resolved (the Celery task acks only after the result is committed).

Outages: a write that fails because the store is unreachable (`worker.outage.STORE_UNREACHABLE`) is retried,
with a capped backoff, until it goes through; the writes behind it wait, so order is kept and nothing is
dropped while Redis restarts. The engine keeps stepping meanwhile; its writes queue up here. Only `stop()`
with writes still blocked gives up on them (the worker is exiting; the jobs' leases lapse and live workers
requeue them). Retrying a write whose reply was lost can repeat it: terminal writes are compare-and-set in
the store (a repeat is refused), a repeated draft/canvas event is harmless to results (they are assembled
from the engine's ids, not from events).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from worker.outage import STORE_UNREACHABLE, StoreOutage

logger = logging.getLogger(__name__)

StoreWrite = Callable[[], object]
RETRY_FIRST_S = 0.05  # first wait after a failed write; doubles up to RETRY_MAX_S
RETRY_MAX_S = 1.0  # bounds how late the writer notices that Redis is back


class StoreWriter:
    """FIFO executor of job-store writes that survives store outages.

    A write that raises anything but an outage error is logged and skipped (a bug in one job's write must
    not stop the writes of the others).
    """

    def __init__(self, outage: StoreOutage | None = None) -> None:
        self.outage = outage if outage is not None else StoreOutage()
        self._writes: queue.SimpleQueue[StoreWrite | None] = queue.SimpleQueue()
        self._giving_up = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dgserve-store-writer", daemon=True)
        self._stopped = False

    def start(self) -> None:
        self._thread.start()

    def submit(self, write: StoreWrite) -> None:
        """Queue one write; it runs after every write submitted before it."""
        if self._stopped:
            raise RuntimeError("StoreWriter is stopped; no more writes are accepted")
        self._writes.put(write)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Run every queued write, then end the thread; writes still blocked by an outage after `timeout_s`
        are abandoned."""
        if self._stopped:
            return
        self._stopped = True
        self._writes.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._giving_up.set()
            self._thread.join(RETRY_MAX_S * 2)

    def _run(self) -> None:
        while True:
            write = self._writes.get()
            if write is None:
                return
            self._run_until_done(write)

    def _run_until_done(self, write: StoreWrite) -> None:
        delay = RETRY_FIRST_S
        while True:
            try:
                write()
            except STORE_UNREACHABLE as err:
                self.outage.failed(err)
                if self._giving_up.is_set():
                    logger.error("worker stopping while the job store is unreachable: a queued write is dropped")
                    return
                time.sleep(delay)
                delay = min(2 * delay, RETRY_MAX_S)
                continue
            except Exception:  # noqa: BLE001 - one failed write must not stop the writes of other jobs
                logger.exception("job store write failed (not an outage; skipped)")
            else:
                self.outage.answered()
            return
