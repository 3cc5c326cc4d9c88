"""The worker side of orphan recovery on real Redis, without a model: store writers of two "workers" renew their
own leases and reap each other's orphans on the same cadence; a job is re-sent by exactly one of them."""

from __future__ import annotations

import threading
import time

from services.jobs import JobStore
from services.schemas import GenerateJobCreate
from services.settings import Settings
from tests.support.processes import wait_until
from worker.store_writer import StoreWriter

TTL_S = 1


def worker_parts(url: str, worker_id: str, resent: list[tuple[str, str]]) -> tuple[JobStore, StoreWriter]:
    """One worker's store and writer: leases renewed like WorkerRuntime does, reaped orphans 're-sent' to a list."""
    store = JobStore.from_settings(Settings(redis_url=url, model="tiny-test", heartbeat_ttl_seconds=TTL_S))
    lock = threading.Lock()

    def renew(job_ids: list[str]) -> None:
        for job_id in job_ids:
            store.set_progress(job_id, 0, 1, worker_id=worker_id)

    def reap() -> None:
        for job_id in store.reclaim_orphans():
            with lock:
                resent.append((worker_id, job_id))

    writer = StoreWriter(store.is_cancel_requested, cancel_poll_s=0.05, renew_leases=renew, renew_every_s=0.1,
                         reap_orphans=reap)
    return store, writer


def test_live_leases_survive_and_a_dead_workers_job_is_resent_once(fresh_redis_url: str):
    resent: list[tuple[str, str]] = []
    store_a, writer_a = worker_parts(fresh_redis_url, "a", resent)
    store_b, writer_b = worker_parts(fresh_redis_url, "b", resent)
    live = store_a.create(GenerateJobCreate(prompt="kept alive by a")).job_id
    orphan = store_a.create(GenerateJobCreate(prompt="its worker died")).job_id
    assert store_a.try_start(live, "a").should_run
    assert store_a.try_start(orphan, "dead").should_run  # nobody renews this one
    writer_a.watch(live)
    for writer in (writer_a, writer_b):
        writer.start()
    try:
        wait_until(lambda: bool(resent), timeout=10, interval=0.05, what="the orphan reaped")
        time.sleep(3 * TTL_S)  # several more passes of both reapers, well past the live job's first lease
    finally:
        writer_a.stop()
        writer_b.stop()
    assert [job_id for _, job_id in resent] == [orphan]
    assert store_b.get(orphan).status == "queued"
    assert store_b.get(live).status == "running" and store_b.get(live).worker_id == "a"


def test_a_failing_reaper_does_not_stop_the_writer():
    passes: list[float] = []

    def broken_reaper() -> None:
        passes.append(time.monotonic())
        raise ConnectionError("store unreachable")

    writer = StoreWriter(lambda job_id: False, renew_every_s=0.05, reap_orphans=broken_reaper)
    writer.start()
    wait_until(lambda: len(passes) >= 3, timeout=5, interval=0.02, what="reaper retried")
    done: list[bool] = []
    writer.submit(lambda: done.append(True))
    writer.stop()
    assert done == [True]
