"""Keeping this worker's claim on its jobs, and taking over the jobs of workers that died.

One thread, `LeaseKeeper`, on two cadences:
- every `cancel_poll_s`: reads the cancel flags of the jobs in flight and tells the engine loop about each
  newly set one (`on_cancel(job_id)`);
- every `interval_s`: writes the worker's heartbeat, renews the lease of every job in flight (re-writing its
  last progress; a refused renewal means the job was requeued while this worker looked dead, or finished
  elsewhere: `on_lease_lost(job_id)`), then reaps orphans (`reap_orphans()`: running jobs of its queue whose
  lease lapsed are requeued and re-sent).

Store outages: each pass that finds the store unreachable is skipped (the outage is logged once, by the shared
`StoreOutage`). When the store answers again, leases are renewed at the next pass, but reaping waits until the
store has answered for `reap_grace_s` (one lease length): every live worker's leases lapsed during a long
outage, and each must get the chance to renew its own before anyone takes jobs over. A loop that completes no
step for `hung_after_s` is hung, not busy: its leases and heartbeat are left to lapse so that live workers
requeue its jobs and /readyz stops counting it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from worker.outage import STORE_UNREACHABLE, StoreOutage
from worker.protocols import JobStoreLike

logger = logging.getLogger(__name__)


class LeaseKeeper:
    """Cancel polling, heartbeat, lease renewal and orphan reaping for one worker (see the module doc).

    `progress_of(job_id) -> (canvas, step)` and `loop_stalled_s() -> float` read the engine loop without
    locks; `heartbeat()` writes the worker's registry record; `reap_orphans` is None when this worker does
    not reap.
    """

    def __init__(self, store: JobStoreLike, worker_id: str, outage: StoreOutage, *,
                 progress_of: Callable[[str], tuple[int, int]], loop_stalled_s: Callable[[], float],
                 on_cancel: Callable[[str], None], on_lease_lost: Callable[[str], None],
                 heartbeat: Callable[[], object] | None = None, reap_orphans: Callable[[], object] | None = None,
                 interval_s: float = 2.0, cancel_poll_s: float = 0.25, reap_grace_s: float = 15.0,
                 hung_after_s: float = 300.0) -> None:
        if interval_s <= 0 or cancel_poll_s <= 0:
            raise ValueError(f"intervals must be > 0 seconds, got interval_s={interval_s}, "
                             f"cancel_poll_s={cancel_poll_s}")
        self.store, self.worker_id, self.outage = store, worker_id, outage
        self._progress_of, self._loop_stalled_s = progress_of, loop_stalled_s
        self._on_cancel, self._on_lease_lost = on_cancel, on_lease_lost
        self._heartbeat, self._reap_orphans = heartbeat, reap_orphans
        self.interval_s, self.cancel_poll_s = interval_s, cancel_poll_s
        self.reap_grace_s, self.hung_after_s = reap_grace_s, hung_after_s
        self._lock = threading.Lock()
        self._watched: set[str] = set()
        self._cancel_seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dgserve-leases", daemon=True)

    def watch(self, job_id: str) -> None:
        with self._lock:
            self._watched.add(job_id)

    def unwatch(self, job_id: str) -> None:
        with self._lock:
            self._watched.discard(job_id)
            self._cancel_seen.discard(job_id)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        next_pass = time.monotonic()
        while not self._stop.is_set():
            self._guarded(self._poll_cancel_flags)
            if time.monotonic() >= next_pass:
                next_pass = time.monotonic() + self.interval_s
                self.run_pass()
            self._stop.wait(self.cancel_poll_s)

    def run_pass(self) -> None:
        """One heartbeat + renewal + reaping pass (public so tests can drive it without the thread)."""
        if self._loop_stalled_s() > self.hung_after_s:
            logger.error("engine loop stuck for %.0f s; heartbeat and leases left to lapse", self._loop_stalled_s())
            return
        if self._heartbeat is not None:
            self._guarded(self._heartbeat)
        renewed = self._guarded(self._renew_leases)
        if renewed and self._reap_orphans is not None and self.outage.seconds_up() >= self.reap_grace_s:
            self._guarded(self._reap_orphans)

    def _watched_now(self) -> list[str]:
        with self._lock:
            return sorted(self._watched)

    def _renew_leases(self) -> None:
        for job_id in self._watched_now():
            canvas, step = self._progress_of(job_id)
            if not self.store.set_progress(job_id, canvas, step, worker_id=self.worker_id):
                with self._lock:
                    still_ours = job_id in self._watched
                    self._watched.discard(job_id)  # not ours any more: reported once
                if still_ours:
                    logger.warning("lost the lease on job %s (requeued or finished elsewhere); stopping it here",
                                   job_id)
                    self._on_lease_lost(job_id)

    def _poll_cancel_flags(self) -> None:
        for job_id in self._watched_now():
            if job_id not in self._cancel_seen and self.store.is_cancel_requested(job_id):
                with self._lock:
                    self._cancel_seen.add(job_id)
                self._on_cancel(job_id)

    def _guarded(self, action: Callable[[], object]) -> bool:
        """Run one store action; False (logged once per outage) when the store is unreachable."""
        try:
            action()
        except STORE_UNREACHABLE as err:
            self.outage.failed(err)
            return False
        except Exception:  # noqa: BLE001 - a bug in one pass must not end lease keeping
            logger.exception("lease keeping: %s failed", getattr(action, "__name__", action))
            return False
        self.outage.answered()
        return True


ORPHANS_PER_PASS = 100  # bounds one reaper pass; more orphans than that are taken at the next pass


def reap_and_resend(store: JobStoreLike, resend_job: Callable[[str], None], limit: int = ORPHANS_PER_PASS
                    ) -> list[str]:
    """Requeue the queue's orphans (`store.reclaim_orphans`: a compare-and-set per job, so of several reapers
    exactly one wins each job) and re-send a message for each one won; returns the ids won."""
    reclaimed = store.reclaim_orphans(limit=limit)
    for job_id in reclaimed:
        logger.warning("job %s was orphaned (its worker stopped renewing the lease); requeued, re-sending", job_id)
        try:
            resend_job(job_id)
        except Exception:  # noqa: BLE001 - one failed publish must not strand the other reclaimed jobs
            logger.exception("could not re-send orphaned job %s: it stays queued without a message", job_id)
    return reclaimed
