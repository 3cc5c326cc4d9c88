"""Worker loss and shutdown with real processes: kill -9 mid-job, SIGTERM with a grace period that lets the
job finish, SIGTERM that hands the job back. Each test uses its own queue and its own workers, with short
leases and a short kombu visibility timeout so redelivery happens in seconds."""

from __future__ import annotations

import os
import signal
import time

import pytest

from services.api.job_queue import JobQueue
from services.jobs import JobStore
from services.schemas import GenerateJobCreate
from tests.integration.conftest import Stack, extra_worker, kill_hard, store_event_types
from tests.support.processes import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]
# A lease of 2 s renewed every 0.5 s; a message unacked for 3 s is restored by the next sweep (every 1 s).
FAST_RECOVERY = {"heartbeat_ttl_seconds": 2, "worker_heartbeat_interval_seconds": 0.5,
                 "broker_visibility_timeout_seconds": 3, "broker_restore_interval_seconds": 1}
# 4 canvases of up to 48 steps: long enough (about a second or more) to be interrupted after its first draft.
LONG_JOB = GenerateJobCreate(prompt="interrupt me", seed=21, max_new_tokens=128, stream_drafts=True)


def submit_to(stack: Stack, queue: str) -> tuple[JobStore, str]:
    settings = stack.settings(queue_name=queue)
    store = JobStore.from_settings(settings)
    job_id = store.create(LONG_JOB).job_id
    producer = JobQueue(settings)
    producer.submit(job_id)
    producer.close()
    return store, job_id


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
    with extra_worker(stack, queue, "chaos-b", **FAST_RECOVERY):
        job = wait_finished(store, job_id)
    assert job.status == "succeeded", job.error
    assert job.attempts == 2
    types = store_event_types(store, job_id)
    assert types.count("started") == 2 and types.count("done") == 1
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
    with extra_worker(stack, queue, "handback-a", worker_shutdown_grace_seconds=0, **FAST_RECOVERY) as worker:
        store, job_id = submit_to(stack, queue)
        wait_for_event(store, job_id, "draft")
        os.killpg(worker.process.pid, signal.SIGTERM)
        assert worker.process.wait(timeout=60) == 0, worker.log()
    assert store.get(job_id).status == "running"  # handed back, not failed
    # The message is back on the queue, not lost in the unacked set.
    assert store.redis.llen(queue) == 1, worker.log()
    started = time.monotonic()
    with extra_worker(stack, queue, "handback-b", **FAST_RECOVERY):
        job = wait_finished(store, job_id)
    assert job.status == "succeeded" and job.attempts == 2, job.error
    assert store_event_types(store, job_id).count("done") == 1
    assert time.monotonic() - started < 90
