"""Orphan recovery in the JobStore against a real redis-server: the running index, `reclaim_orphans` (lapsed vs
renewed leases, concurrent reclaimers, attempts and deadlines) and `release` by the lease holder."""

from __future__ import annotations

import json
import threading
import time

import pytest

from services.jobs import JobStore
from services.schemas import GenerateJobCreate
from tests.services.test_job_store import event_types, make_store


@pytest.fixture
def store(fresh_redis_url: str) -> JobStore:
    return make_store(fresh_redis_url, max_attempts=2, job_lease_seconds=15)


def started_job(store: JobStore, worker_id: str = "w-1", prompt: str = "orphan me") -> str:
    job_id = store.create(GenerateJobCreate(prompt=prompt)).job_id
    assert store.try_start(job_id, worker_id).should_run
    return job_id


def lapse_lease(store: JobStore, job_id: str) -> None:
    """What a dead holder leaves behind: a lease in the past, in the record and in the index."""
    past = time.time() - 1
    store.redis.hset(store.job_key(job_id), "lease_until", repr(past))
    store.redis.zadd(store.running_key, {job_id: past})


def last_event(store: JobStore, job_id: str) -> tuple[str, dict]:
    _, fields = store.redis.xrange(store.events_key(job_id))[-1]
    return fields["type"], json.loads(fields["data"])


def test_running_index_follows_start_renewal_and_every_terminal_write(store: JobStore):
    queued = store.create(GenerateJobCreate(prompt="q")).job_id
    assert store.redis.zscore(store.running_key, queued) is None
    finishes = [lambda j: store.succeed(j, {"text": "t"}), lambda j: store.fail(j, "boom", "m"),
                store.mark_cancelled, store.expire]
    for index, finish in enumerate(finishes):
        job_id = started_job(store, prompt=f"job {index}")
        lease = float(store.redis.hget(store.job_key(job_id), "lease_until"))
        assert store.redis.zscore(store.running_key, job_id) == pytest.approx(lease)
        time.sleep(0.01)
        assert store.set_progress(job_id, 0, 1, worker_id="w-1")
        renewed = float(store.redis.hget(store.job_key(job_id), "lease_until"))
        assert renewed > lease and store.redis.zscore(store.running_key, job_id) == pytest.approx(renewed)
        assert finish(job_id)
        assert store.redis.zscore(store.running_key, job_id) is None
    assert store.redis.zcard(store.running_key) == 0


def test_reclaim_requeues_a_lapsed_lease_and_spares_a_renewed_one(store: JobStore):
    dead = started_job(store, "dead-worker", "a")
    alive = started_job(store, "live-worker", "b")
    assert store.reclaim_orphans() == []  # both leases are fresh
    lapse_lease(store, dead)
    # The live holder renewed after the index entry went stale: the record's lease decides.
    store.redis.zadd(store.running_key, {alive: time.time() - 1})
    assert store.reclaim_orphans() == [dead]

    record = store.get(dead)
    assert record.status == "queued" and record.worker_id is None and record.attempts == 1
    assert last_event(store, dead) == ("requeued", {"reason": "lease_expired", "attempts": 1,
                                                    "worker_id": "dead-worker"})
    assert store.queue_depth() == 1 and store.redis.zscore(store.running_key, dead) is None
    assert store.get(alive).status == "running"
    lease = float(store.redis.hget(store.job_key(alive), "lease_until"))
    assert store.redis.zscore(store.running_key, alive) == pytest.approx(lease)  # index repaired
    assert not store.set_progress(dead, 1, 1, worker_id="dead-worker")  # the old holder lost it
    restart = store.try_start(dead, "new-worker")
    assert restart.outcome == "started" and restart.attempts == 2
    assert event_types(store, dead) == ["queued", "started", "requeued", "started"]


def test_lapse_is_judged_at_now(store: JobStore):
    job_id = started_job(store)
    lease = float(store.redis.hget(store.job_key(job_id), "lease_until"))
    assert store.reclaim_orphans(now=lease - 1) == []
    assert store.reclaim_orphans(now=lease + 1) == [job_id]


def test_concurrent_reclaimers_requeue_each_orphan_exactly_once(store: JobStore, fresh_redis_url: str):
    orphans = [started_job(store, "dead", f"job {i}") for i in range(6)]
    for job_id in orphans:
        lapse_lease(store, job_id)
    reapers = [make_store(fresh_redis_url, max_attempts=2) for _ in range(8)]
    barrier = threading.Barrier(len(reapers))
    won: list[list[str]] = [[] for _ in reapers]

    def reap(index: int) -> None:
        barrier.wait(timeout=10)
        won[index] = reapers[index].reclaim_orphans()

    threads = [threading.Thread(target=reap, args=(i,)) for i in range(len(reapers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    winners = [job_id for ids in won for job_id in ids]
    assert sorted(winners) == sorted(orphans)  # every orphan once, none twice
    for job_id in orphans:
        assert event_types(store, job_id).count("requeued") == 1
        assert store.get(job_id).status == "queued"


def test_orphan_out_of_attempts_fails_with_a_clear_error(store: JobStore):
    job_id = started_job(store)
    lapse_lease(store, job_id)
    assert store.reclaim_orphans() == [job_id]
    assert store.try_start(job_id, "w-2").attempts == 2  # max_attempts
    lapse_lease(store, job_id)
    assert store.reclaim_orphans() == []
    record = store.get(job_id)
    assert record.status == "failed" and record.error[0] == "attempts_exhausted"
    assert "started 2 times" in record.error[1]
    assert last_event(store, job_id)[0] == "failed"
    assert store.queue_depth() == 0 and store.redis.zcard(store.running_key) == 0


def test_orphan_past_its_deadline_expires(store: JobStore):
    job_id = started_job(store)
    lapse_lease(store, job_id)
    store.redis.hset(store.job_key(job_id), "deadline_at", repr(time.time() - 1))
    assert store.reclaim_orphans() == []
    record = store.get(job_id)
    assert record.status == "expired" and record.error[0] == "deadline_exceeded"
    assert store.queue_depth() == 0 and store.redis.zcard(store.running_key) == 0


def test_stale_index_entries_are_dropped(store: JobStore):
    job_id = started_job(store)
    lapse_lease(store, job_id)
    store.redis.delete(store.job_key(job_id))  # the record's TTL ran out
    assert store.reclaim_orphans() == [] and store.redis.zcard(store.running_key) == 0
    with pytest.raises(ValueError, match="limit"):
        store.reclaim_orphans(limit=0)


def test_release_hands_the_job_back_only_from_its_holder(store: JobStore):
    job_id = started_job(store, "holder")
    assert not store.release(job_id, "someone-else")
    assert not store.set_progress(job_id, 0, 1, worker_id="someone-else")
    assert store.get(job_id).status == "running"
    assert store.release(job_id, "holder")
    assert not store.release(job_id, "holder")  # already queued
    assert last_event(store, job_id) == ("requeued", {"reason": "released", "attempts": 1, "worker_id": "holder"})
    assert store.redis.zcard(store.running_key) == 0 and store.queue_depth() == 1
    # No lease to wait for: the next worker starts it at once.
    restart = store.try_start(job_id, "next")
    assert restart.outcome == "started" and restart.attempts == 2
    assert store.succeed(job_id, {"text": "done"}) and not store.release(job_id, "next")
