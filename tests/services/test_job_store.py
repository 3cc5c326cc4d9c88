"""JobStore against a real redis-server: compare-and-set transitions, idempotency, admission, events."""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis

from services.jobs import IdempotencyConflict, JobStore, QueueFull
from services.schemas import EditJobCreate, GenerateJobCreate
from services.settings import Settings


def make_store(url: str, **overrides) -> JobStore:
    settings = Settings(redis_url=url, model="/models/tiny-test", **overrides)
    return JobStore(redis.Redis.from_url(url, decode_responses=True), settings)


@pytest.fixture
def store(fresh_redis_url: str) -> JobStore:
    return make_store(fresh_redis_url, max_queued_jobs=3, max_attempts=2)


def event_types(store: JobStore, job_id: str) -> list[str]:
    return [fields["type"] for _, fields in store.redis.xrange(store.events_key(job_id))]


def test_create_stores_payload_owner_and_queued_event(store: JobStore):
    request = GenerateJobCreate(prompt="hello", max_new_tokens=8, seed=3)
    job_id = store.create(request, owner="owner-a").job_id
    record = store.get(job_id)
    assert record is not None and record.status == "queued" and record.owner == "owner-a"
    assert record.request == request and record.attempts == 0
    assert record.deadline_at == pytest.approx(record.created_at + store.settings.job_deadline_seconds)
    assert 0 < store.redis.ttl(store.job_key(job_id)) <= store.settings.job_deadline_seconds + store.settings.result_ttl_seconds
    assert event_types(store, job_id) == ["queued"]
    assert store.queue_depth() == 1
    public = record.to_public()
    assert public.status == "queued" and public.timings.queue_seconds is None and public.progress is None


def test_happy_path_transitions_and_timings(store: JobStore):
    job_id = store.create(GenerateJobCreate(prompt="hi")).job_id
    decision = store.try_start(job_id, "worker-1")
    assert decision.should_run and decision.outcome == "started" and decision.attempts == 1
    assert store.queue_depth() == 0
    assert store.append_event(job_id, "draft", {"text": "d"}) is not None
    assert store.set_progress(job_id, canvas=1, step=4)
    assert store.succeed(job_id, {"text": "out", "finish_reason": "stop"})
    record = store.get(job_id)
    assert record.status == "succeeded" and record.result == {"text": "out", "finish_reason": "stop"}
    assert record.progress == (1, 4)
    public = record.to_public()
    assert public.timings.run_seconds is not None and public.timings.queue_seconds is not None
    assert event_types(store, job_id) == ["queued", "started", "draft", "done"]
    assert store.redis.ttl(store.job_key(job_id)) <= store.settings.result_ttl_seconds


def test_finished_job_is_never_overwritten(store: JobStore):
    job_id = store.create(GenerateJobCreate(prompt="hi")).job_id
    store.try_start(job_id, "w")
    assert store.succeed(job_id, {"text": "first"})
    assert not store.succeed(job_id, {"text": "second"})
    assert not store.fail(job_id, "boom", "late failure")
    assert not store.mark_cancelled(job_id)
    assert not store.set_progress(job_id, 9, 9)
    decision = store.try_start(job_id, "w2")
    assert decision.outcome == "already_finished" and not decision.should_run
    record = store.get(job_id)
    assert record.status == "succeeded" and record.result == {"text": "first"} and record.attempts == 1
    assert event_types(store, job_id).count("done") == 1


def test_only_one_of_many_concurrent_starts_wins(store: JobStore):
    job_id = store.create(GenerateJobCreate(prompt="race")).job_id
    outcomes: list[str] = []
    threads = [threading.Thread(target=lambda i=i: outcomes.append(store.try_start(job_id, f"w{i}").outcome))
               for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert sorted(outcomes) == ["running_elsewhere"] * 7 + ["started"]
    assert store.get(job_id).attempts == 1


def test_redelivery_restarts_after_lease_lapses_then_dead_letters(store: JobStore):
    job_id = store.create(GenerateJobCreate(prompt="chaos")).job_id
    assert store.try_start(job_id, "dead-worker").outcome == "started"
    assert store.try_start(job_id, "new-worker").outcome == "running_elsewhere"
    store.redis.hset(store.job_key(job_id), "lease_until", repr(time.time() - 1))  # the holder stopped renewing
    restart = store.try_start(job_id, "new-worker")
    assert restart.outcome == "restarted" and restart.attempts == 2
    store.redis.hset(store.job_key(job_id), "lease_until", repr(time.time() - 1))
    exhausted = store.try_start(job_id, "third-worker")
    assert exhausted.outcome == "attempts_exhausted" and not exhausted.should_run
    record = store.get(job_id)
    assert record.status == "failed" and record.error[0] == "attempts_exhausted"
    assert event_types(store, job_id)[-1] == "failed"


def test_job_past_deadline_expires_instead_of_starting(store: JobStore):
    job_id = store.create(GenerateJobCreate(prompt="late")).job_id
    store.redis.hset(store.job_key(job_id), "deadline_at", repr(time.time() - 1))
    decision = store.try_start(job_id, "w")
    assert decision.outcome == "expired" and decision.job.status == "expired"
    assert decision.job.error[0] == "deadline_exceeded" and store.queue_depth() == 0


def test_cancel_queued_running_and_finished(store: JobStore):
    queued = store.create(GenerateJobCreate(prompt="a")).job_id
    assert store.cancel(queued) == "cancelled"
    assert store.get(queued).status == "cancelled" and store.queue_depth() == 0
    assert store.try_start(queued, "w").outcome == "already_finished"

    running = store.create(GenerateJobCreate(prompt="b")).job_id
    store.try_start(running, "w")
    assert not store.is_cancel_requested(running)
    assert store.cancel(running) == "cancel_requested"
    assert store.is_cancel_requested(running) and store.get(running).status == "running"
    assert store.mark_cancelled(running)
    assert store.cancel(running) == "finished"
    assert store.cancel("no-such-job") == "not_found"
    assert event_types(store, running)[-1] == "cancelled"


def test_idempotency_same_body_same_job_different_body_conflict(store: JobStore):
    first = store.create(GenerateJobCreate(prompt="x", seed=1), owner="o", idempotency_key="key-1")
    replay = store.create(GenerateJobCreate(prompt="x", seed=1), owner="o", idempotency_key="key-1")
    assert first.created and not replay.created and replay.job_id == first.job_id
    with pytest.raises(IdempotencyConflict) as conflict:
        store.create(GenerateJobCreate(prompt="x", seed=2), owner="o", idempotency_key="key-1")
    assert conflict.value.existing_job_id == first.job_id
    other_owner = store.create(GenerateJobCreate(prompt="x", seed=1), owner="p", idempotency_key="key-1")
    assert other_owner.created and other_owner.job_id != first.job_id
    assert store.queue_depth() == 2


def test_idempotency_key_outliving_its_job_is_reused(store: JobStore):
    first = store.create(GenerateJobCreate(prompt="x"), idempotency_key="k")
    store.redis.delete(store.job_key(first.job_id))
    again = store.create(GenerateJobCreate(prompt="x"), idempotency_key="k")
    assert again.created and again.job_id != first.job_id


def test_admission_limit_rejects_without_creating(store: JobStore):
    ids = [store.create(GenerateJobCreate(prompt=str(i))).job_id for i in range(3)]
    keys_before = store.redis.dbsize()
    with pytest.raises(QueueFull):
        store.create(GenerateJobCreate(prompt="one too many"))
    assert store.redis.dbsize() == keys_before
    store.try_start(ids[0], "w")
    assert store.create(GenerateJobCreate(prompt="fits again")).created


def test_events_and_progress_only_for_live_jobs(store: JobStore):
    assert store.append_event("missing", "draft", {}) is None
    assert not store.redis.exists(store.events_key("missing"))
    job_id = store.create(GenerateJobCreate(prompt="p")).job_id
    assert not store.set_progress(job_id, 0, 1)  # queued, not running
    entry_id = store.append_event(job_id, "canvas", {"text": "t", "canvas": 0})
    fields = dict(store.redis.xrange(store.events_key(job_id), entry_id, entry_id)[0][1])
    assert fields["type"] == "canvas" and json.loads(fields["data"]) == {"text": "t", "canvas": 0}
    assert store.redis.ttl(store.events_key(job_id)) > 0


def test_event_with_progress_in_one_round_trip_keeps_both_writes(store: JobStore):
    job_id = store.create(GenerateJobCreate(prompt="p")).job_id
    decision = store.try_start(job_id, "worker-1")
    # try_start's record is read after its own write (same MULTI/EXEC), so it already says running.
    assert decision.job is not None and decision.job.status == "running" and decision.job.attempts == 1
    assert store.append_event_with_progress(job_id, "canvas", {"text": "t"}, 2, 5, worker_id="worker-1")
    record = store.get(job_id)
    assert record is not None and record.progress == (2, 5)
    assert event_types(store, job_id) == ["queued", "started", "canvas"]
    # Another worker's id: the event is still appended (as append_event does), the lease is not renewed.
    assert not store.append_event_with_progress(job_id, "draft", {"text": "d"}, 3, 1, worker_id="worker-2")
    assert store.get(job_id).progress == (2, 5)
    assert event_types(store, job_id)[-1] == "draft"


def test_edit_job_round_trips_through_the_record(store: JobStore):
    request = EditJobCreate(document="a = 1\nb = 2\n", edits=[{"find": "b = 2", "instruction": "rename"}])
    record = store.get(store.create(request).job_id)
    assert record.kind == "edit" and record.request == request
    assert record.request.resolved_spans() == [(6, 11)]


def test_heartbeats_and_stale_workers(store: JobStore):
    assert store.live_workers() == []
    store.heartbeat("w-gpu0", {"gpu": 0, "queue": store.settings.queue_name})
    live = store.live_workers()
    assert [worker["worker_id"] for worker in live] == ["w-gpu0"] and live[0]["gpu"] == 0
    store.redis.zadd("dgserve:workers", {"w-gpu0": time.time() - store.settings.job_lease_seconds - 1})
    assert store.live_workers() == []
    assert store.redis.hget("dgserve:worker_info", "w-gpu0") is None


def test_queue_full_message_names_the_queue(fresh_redis_url: str):
    small = make_store(fresh_redis_url, max_queued_jobs=1)
    small.create(GenerateJobCreate(prompt="a"))
    with pytest.raises(QueueFull, match="dgemma.tiny-test"):
        small.create(GenerateJobCreate(prompt="b"))
