"""Worker loss and shutdown with real processes: kill -9 mid-job, SIGTERM with a grace period that lets the
job finish, SIGTERM that hands the job back. Each test uses its own queue and its own workers, with the
production (long) kombu visibility timeout: recovery comes from the job store's leases (orphan reaping by a
live worker, release at shutdown), never from kombu redelivering the dead worker's message."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from services.job_messages import JobQueue
from services.jobs import JobStore
from services.schemas import GenerateJobCreate
from tests.integration.conftest import Stack, extra_worker, kill_hard, store_event_types
from tests.support.processes import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]
# A lease of 2 s, renewed (and orphans reaped) every 0.5 s. The visibility timeout stays at its default.
FAST_RECOVERY = {"job_lease_seconds": 2, "worker_heartbeat_interval_seconds": 0.5}
RECOVERY_BOUND_S = 30.0  # orphan found within ~2.5 s, then the job reruns (~1-5 s on a busy 2-core machine)
# 4 canvases of up to 48 steps: long enough (about a second or more) to be interrupted after its first draft.
LONG_LEASE_S = 30
# 32 canvases: runs for seconds, well past the first lease renewal after its first draft.
LONGER_JOB = GenerateJobCreate(prompt="take me over", seed=22, max_new_tokens=1024, stream_drafts=True)
LONG_JOB = GenerateJobCreate(prompt="interrupt me", seed=21, max_new_tokens=128, stream_drafts=True)


def submit_to(stack: Stack, queue: str) -> tuple[JobStore, str]:
    settings = stack.settings(queue_name=queue)
    store = JobStore.from_settings(settings)
    job_id = store.create(LONG_JOB).job_id
    send_message(stack, queue, job_id)
    return store, job_id


def send_message(stack: Stack, queue: str, job_id: str) -> None:
    producer = JobQueue(stack.settings(queue_name=queue))
    producer.submit(job_id)
    producer.close()


def requeued_reasons(store: JobStore, job_id: str) -> list[str]:
    return [json.loads(entry["data"])["reason"] for _, entry in store.redis.xrange(store.events_key(job_id))
            if entry["type"] == "requeued"]


def wait_for_event(store: JobStore, job_id: str, event_type: str, timeout: float = 60.0) -> None:
    wait_until(lambda: event_type in store_event_types(store, job_id), timeout, interval=0.02,
               what=f"{event_type} event of {job_id}")


def wait_finished(store: JobStore, job_id: str, timeout: float = 90.0):
    wait_until(lambda: store.get(job_id).is_finished, timeout, interval=0.1, what=f"job {job_id} finished")
    return store.get(job_id)


def test_kill_9_mid_job_then_a_new_worker_finishes_it_exactly_once(stack: Stack):
    queue = "dgemma.itest-chaos"
    with extra_worker(stack, queue, "chaos-a", **FAST_RECOVERY) as doomed:
        store, job_id = submit_to(stack, queue)
        wait_for_event(store, job_id, "draft")
        kill_hard(doomed.process)
    assert store.get(job_id).status == "running"  # nobody finished it
    with extra_worker(stack, queue, "chaos-b", **FAST_RECOVERY) as rescuer:
        ready = time.monotonic()
        job = wait_finished(store, job_id, timeout=RECOVERY_BOUND_S)
        recovered_s = time.monotonic() - ready
        # kombu restores the dead worker's unacked message only after the (1,200 s) visibility timeout;
        # play that redelivery now: the finished job is acked, not run again.
        send_message(stack, queue, job_id)
        wait_until(lambda: f"job {job_id} not run: already_finished" in rescuer.log(), 30, interval=0.1,
                   what="the late redelivery acked")
    print(f"kill -9 recovery: job finished {recovered_s:.1f} s after the new worker was ready")
    job = store.get(job_id)
    assert job.status == "succeeded", job.error
    assert job.attempts == 2
    types = store_event_types(store, job_id)
    assert types.count("started") == 2 and types.count("done") == 1
    assert requeued_reasons(store, job_id) == ["lease_expired"]
    assert job.result["usage"]["generated_tokens"] == len(job.result["token_ids"]) > 0


def test_sigterm_lets_the_job_in_flight_finish_then_exits(stack: Stack):
    queue = "dgemma.itest-drain"
    with extra_worker(stack, queue, "drain", worker_shutdown_grace_seconds=60, **FAST_RECOVERY) as worker:
        store, job_id = submit_to(stack, queue)
        wait_for_event(store, job_id, "draft")
        os.killpg(worker.process.pid, signal.SIGTERM)
        job = wait_finished(store, job_id)
        assert worker.process.wait(timeout=60) == 0, worker.log()
    assert job.status == "succeeded" and job.attempts == 1
    assert store_event_types(store, job_id).count("done") == 1


def test_sigterm_past_the_grace_period_hands_the_job_back_for_another_worker(stack: Stack):
    queue = "dgemma.itest-handback"
    # A long lease: were the job not released, the next worker would wait LONG_LEASE_S before taking it over.
    long_lease = {"job_lease_seconds": LONG_LEASE_S, "worker_heartbeat_interval_seconds": 0.5}
    with extra_worker(stack, queue, "handback-a", worker_shutdown_grace_seconds=0, **long_lease) as worker:
        store, job_id = submit_to(stack, queue)
        wait_for_event(store, job_id, "draft")
        os.killpg(worker.process.pid, signal.SIGTERM)
        assert worker.process.wait(timeout=60) == 0, worker.log()
    assert store.get(job_id).status == "queued"  # released at once, not failed, no lease left to lapse
    assert requeued_reasons(store, job_id) == ["worker_shutdown"]
    # The message is back on the queue, not lost in the unacked set.
    assert store.redis.llen(queue) == 1, worker.log()
    with extra_worker(stack, queue, "handback-b", **long_lease):
        ready = time.monotonic()
        job = wait_finished(store, job_id, timeout=LONG_LEASE_S)
        restarted_s = time.monotonic() - ready
    print(f"SIGTERM hand-back: job finished {restarted_s:.1f} s after the next worker was ready")
    assert job.status == "succeeded" and job.attempts == 2, job.error
    assert store_event_types(store, job_id).count("done") == 1
    assert restarted_s < LONG_LEASE_S


def test_a_worker_whose_job_was_taken_from_it_stops_running_it(stack: Stack):
    """A reaper requeued the job while its worker looked dead (e.g. cut off from Redis past its lease): the worker
    must notice at its next lease renewal, stop that attempt, and let the requeued job run once."""
    queue = "dgemma.itest-lostlease"
    with extra_worker(stack, queue, "lost-lease", **FAST_RECOVERY) as worker:
        settings = stack.settings(queue_name=queue)
        store = JobStore.from_settings(settings)
        job_id = store.create(LONGER_JOB).job_id
        send_message(stack, queue, job_id)
        wait_for_event(store, job_id, "draft")
        holder = store.get(job_id).worker_id
        # What a reaper does: requeue by compare-and-set, then re-send the message.
        assert store.release(job_id, holder, "taken_over_by_test")
        send_message(stack, queue, job_id)
        wait_until(lambda: f"lost the lease on job {job_id}" in worker.log(), 30, interval=0.05,
                   what="the first attempt stopped")
        job = wait_finished(store, job_id)
    assert job.status == "succeeded" and job.attempts == 2, job.error
    types = store_event_types(store, job_id)
    assert types.count("done") == 1 and types.count("started") == 2
    assert requeued_reasons(store, job_id) == ["taken_over_by_test"]
