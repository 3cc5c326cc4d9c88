"""The worker side of orphan recovery on real Redis, without a model: the lease keepers of two "workers" (the
production `LeaseKeeper` and `reap_and_resend`) renew their own leases and reap each other's orphans on the
same cadence; a job is re-sent by exactly one of them."""

from __future__ import annotations

import threading
import time

from services.jobs import JobStore
from services.schemas import GenerateJobCreate
from services.settings import Settings
from tests.support.processes import wait_until
from worker.leases import LeaseKeeper, reap_and_resend
from worker.outage import StoreOutage

TTL_S = 1


def worker_parts(url: str, worker_id: str, resent: list[tuple[str, str]]) -> tuple[JobStore, LeaseKeeper]:
    """One worker's store and lease keeper; its reaped orphans are 're-sent' to a list."""
    store = JobStore.from_settings(Settings(redis_url=url, model="tiny-test", job_lease_seconds=TTL_S))
    lock = threading.Lock()

    def resend(job_id: str) -> None:
        with lock:
            resent.append((worker_id, job_id))

    keeper = LeaseKeeper(store, worker_id, StoreOutage(), progress_of=lambda job_id: (0, 1),
                         loop_stalled_s=lambda: 0.0, on_cancel=lambda job_id: None, on_lease_lost=lambda job_id: None,
                         reap_orphans=lambda: reap_and_resend(store, resend), interval_s=0.1, cancel_poll_s=0.05,
                         reap_grace_s=TTL_S)
    return store, keeper


def test_live_leases_survive_and_a_dead_workers_job_is_resent_once(fresh_redis_url: str):
    resent: list[tuple[str, str]] = []
    store_a, keeper_a = worker_parts(fresh_redis_url, "a", resent)
    store_b, keeper_b = worker_parts(fresh_redis_url, "b", resent)
    live = store_a.create(GenerateJobCreate(prompt="kept alive by a")).job_id
    orphan = store_a.create(GenerateJobCreate(prompt="its worker died")).job_id
    assert store_a.try_start(live, "a").should_run
    assert store_a.try_start(orphan, "dead").should_run  # nobody renews this one
    keeper_a.watch(live)
    for keeper in (keeper_a, keeper_b):
        keeper.start()
    try:
        wait_until(lambda: bool(resent), timeout=10, interval=0.05, what="the orphan reaped")
        time.sleep(3 * TTL_S)  # several more passes of both reapers, well past the live job's first lease
    finally:
        keeper_a.stop()
        keeper_b.stop()
    assert [job_id for _, job_id in resent] == [orphan]
    assert store_b.get(orphan).status == "queued"
    assert store_b.get(live).status == "running" and store_b.get(live).worker_id == "a"


def test_a_failing_reaper_does_not_stop_lease_keeping():
    passes: list[float] = []
    renewed: list[str] = []

    class Store:
        def set_progress(self, job_id: str, canvas: int, step: int, worker_id: str | None = None) -> bool:
            renewed.append(job_id)
            return True

        def is_cancel_requested(self, job_id: str) -> bool:
            return False

    def broken_reaper() -> None:
        passes.append(time.monotonic())
        raise RuntimeError("a bug in the reaper")

    keeper = LeaseKeeper(Store(), "w", StoreOutage(), progress_of=lambda job_id: (0, 1),  # type: ignore[arg-type]
                         loop_stalled_s=lambda: 0.0, on_cancel=lambda job_id: None,
                         on_lease_lost=lambda job_id: None, reap_orphans=broken_reaper, interval_s=0.05,
                         cancel_poll_s=0.02, reap_grace_s=0.0)
    keeper.watch("job-1")
    keeper.start()
    try:
        wait_until(lambda: len(passes) >= 3, timeout=5, interval=0.02, what="reaper retried")
    finally:
        keeper.stop()
    assert renewed.count("job-1") >= 3  # renewal went on at every pass
