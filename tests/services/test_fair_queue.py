"""The fair pick (`JobStore.start_next`, services/fair_scripts.py) on a real Redis: API keys take turns within
a lane, the message's lane goes first, and jobs that were cancelled, expired or requeued are handled as
`try_start` handles them."""

from __future__ import annotations

import time

import redis

from services.jobs import JobStore
from services.schemas import GenerateJobCreate
from services.settings import Settings


def make_store(url: str, **settings: object) -> JobStore:
    return JobStore(redis.Redis.from_url(url, decode_responses=True),
                    Settings(redis_url=url, queue_name="dgemma.fair", **settings))


def submit(store: JobStore, owner: str, count: int, batch: bool = False) -> list[str]:
    return [store.create(GenerateJobCreate(prompt=f"{owner}{i}"), owner=owner,
                         batch_id="batch_x" if batch else None).job_id for i in range(count)]


def drain(store: JobStore, batch: bool = False) -> list[str]:
    started = []
    while (decision := store.start_next("w", batch=batch)) is not None:
        assert decision.should_run and decision.job is not None and decision.job.status == "running"
        started.append(decision.job.id)
    return started


def test_keys_take_turns_one_job_at_a_time(fresh_redis_url: str):
    store = make_store(fresh_redis_url)
    a, b, c = submit(store, "A", 5), submit(store, "B", 2), submit(store, "", 1)  # '' = anonymous callers
    order = drain(store)
    assert order == [a[0], b[0], c[0], a[1], b[1], a[2], a[3], a[4]]
    assert all(store.get(job_id).attempts == 1 for job_id in order)
    assert store.queue_depth() == 0 and store.redis.zcard(store.running_key) == 8


def test_a_late_key_waits_for_one_turn_not_for_the_backlog(fresh_redis_url: str):
    store = make_store(fresh_redis_url)
    a = submit(store, "A", 50)
    first = drain_some(store, 3)
    (b,) = submit(store, "B", 1)
    assert first == a[:3] and drain_some(store, 2) == [a[3], b]


def drain_some(store: JobStore, count: int) -> list[str]:
    picks = [store.start_next("w") for _ in range(count)]
    return [pick.job.id for pick in picks if pick is not None and pick.job is not None]


def test_cancelled_and_expired_jobs_are_skipped(fresh_redis_url: str):
    store = make_store(fresh_redis_url, job_deadline_seconds=1)
    stale = submit(store, "A", 2)
    time.sleep(1.1)  # past their deadline
    fresh = submit(store, "A", 3)
    assert store.cancel(fresh[0]) == "cancelled"
    assert drain(store) == fresh[1:]
    assert [store.get(job_id).status for job_id in stale] == ["expired", "expired"]
    assert store.get(fresh[0]).status == "cancelled"


def test_many_dead_entries_do_not_hide_a_live_job(fresh_redis_url: str):
    store = make_store(fresh_redis_url)
    dead = submit(store, "A", 150)  # more than one START_NEXT call pops
    for job_id in dead:
        store.cancel(job_id)
    (live,) = submit(store, "A", 1)
    assert drain(store) == [live]


def test_the_message_lane_goes_first_and_either_lane_is_drained(fresh_redis_url: str):
    store = make_store(fresh_redis_url)
    lines = submit(store, "A", 2, batch=True) + submit(store, "B", 1, batch=True)
    interactive = submit(store, "C", 2)
    assert drain_some(store, 1) == [interactive[0]]
    assert [store.start_next("w", batch=True).job.id for _ in range(2)] == [lines[0], lines[2]]  # A, B, A
    assert drain(store) == [interactive[1], lines[1]]  # then the batch lane, when no interactive job waits


def test_a_requeued_job_goes_back_to_the_head_of_its_keys_list(fresh_redis_url: str):
    store = make_store(fresh_redis_url, job_lease_seconds=1)
    a = submit(store, "A", 3)
    assert drain_some(store, 1) == [a[0]]
    assert store.reclaim_orphans(now=time.time() + 5) == [a[0]]  # its worker stopped renewing the lease
    again = store.start_next("w2")
    assert again is not None and again.job.id == a[0] and again.attempts == 2
    released = store.start_next("w3")
    assert released.job.id == a[1] and store.release(a[1], "w3", reason="worker_shutdown")
    assert drain(store) == [a[1], a[2]]


def test_jobs_the_caller_still_runs_are_left_queued_and_their_key_keeps_its_order(fresh_redis_url: str):
    store = make_store(fresh_redis_url)
    a, b = submit(store, "A", 2), submit(store, "B", 1)
    assert drain_some(store, 1) == [a[0]]
    assert store.release(a[0], "w", reason="taken_over")  # requeued while its worker still runs it
    assert store.start_next("w", exclude=[a[0]]).job.id == b[0]  # A sits out: its next job is a[0]
    assert store.start_next("w", exclude=[a[0]]) is None and store.get(a[0]).status == "queued"
    assert drain(store) == [a[0], a[1]]  # once the old attempt is gone, A's jobs run in order
