"""The worker runtime and its engine loop in one process, with `DeterministicFakeEngine` and a real Redis job
store: `WorkerRuntime.run_job` called from several threads as Celery's task threads call it. The
multi-process tests (tests/integration) cover the same paths with a real model and real Celery."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from services.jobs import JobStore
from services.schemas import GenerateJobCreate
from tests.support.processes import free_port, wait_until
from tests.worker.fake_engine import ERROR_PROMPT, DeterministicFakeEngine
from worker.runtime import HandBack, WorkerRuntime
from worker.settings import WorkerSettings

pytestmark = pytest.mark.timeout(60)


def make_runtime(url: str, engine: DeterministicFakeEngine, **settings: object) -> WorkerRuntime:
    worker_settings = WorkerSettings(redis_url=url, model="tiny-test", worker_device="cpu",
                                     worker_metrics_port=free_port(), worker_metrics_host="127.0.0.1",
                                     worker_heartbeat_interval_seconds=0.1, worker_cancel_poll_seconds=0.02,
                                     **settings)
    runtime = WorkerRuntime(worker_settings, hostname="in-process", engine=engine)
    runtime.start()
    return runtime


@pytest.fixture
def fake_engine() -> DeterministicFakeEngine:
    return DeterministicFakeEngine(canvas_length=8, steps_per_canvas=2, step_seconds=0.005)


@pytest.fixture
def runtime(fresh_redis_url: str, fake_engine: DeterministicFakeEngine) -> Iterator[WorkerRuntime]:
    runtime = make_runtime(fresh_redis_url, fake_engine)
    yield runtime
    runtime.stop()


def run_in_threads(runtime: WorkerRuntime, job_ids: list[str]) -> dict[str, object]:
    """`run_job` for each id on its own thread (as Celery's threads pool does); outcome or exception per id."""
    outcomes: dict[str, object] = {}

    def run(job_id: str) -> None:
        try:
            outcomes[job_id] = runtime.run_job(job_id)
        except Exception as err:  # noqa: BLE001 - the test inspects it
            outcomes[job_id] = err

    threads = [threading.Thread(target=run, args=(job_id,)) for job_id in job_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return outcomes


def event_types(store: JobStore, job_id: str) -> list[str]:
    return [entry["type"] for _, entry in store.redis.xrange(store.events_key(job_id))]


def test_concurrent_jobs_are_batched_and_each_commits_its_result_once(runtime: WorkerRuntime,
                                                                      fake_engine: DeterministicFakeEngine):
    store = runtime.store
    sizes = [5, 16, 20]
    job_ids = [store.create(GenerateJobCreate(prompt=f"job {n}", max_new_tokens=n, stream_drafts=True)).job_id
               for n in sizes]
    outcomes = run_in_threads(runtime, job_ids)
    assert outcomes == dict.fromkeys(job_ids, "succeeded")
    for job_id, size in zip(job_ids, sizes, strict=True):
        job = store.get(job_id)
        expected = fake_engine.expected_ids(size)
        assert job.result["token_ids"] == expected
        assert job.result["text"] == fake_engine.tokenizer.decode(expected)  # made at the edge, from the ids
        types = event_types(store, job_id)
        canvases = -(-size // 8)
        assert types == ["queued", "started", *(["draft", "draft", "canvas"] * canvases), "done"]
    assert not runtime.loop.is_in_flight(job_ids[0])


def test_a_cancel_stops_the_job_between_steps(runtime: WorkerRuntime):
    store = runtime.store
    job_id = store.create(GenerateJobCreate(prompt="long", max_new_tokens=400)).job_id  # ~1 s of fake steps
    outcomes: dict[str, object] = {}
    thread = threading.Thread(target=lambda: outcomes.update(run_in_threads(runtime, [job_id])))
    thread.start()
    wait_until(lambda: runtime.loop.is_in_flight(job_id), 10, what="job admitted")
    assert store.cancel(job_id) == "cancel_requested"
    thread.join(30)
    assert outcomes == {job_id: "cancelled"}
    assert store.get(job_id).status == "cancelled" and event_types(store, job_id)[-1] == "cancelled"


def test_an_engine_error_fails_only_that_job_with_the_engines_message(runtime: WorkerRuntime):
    store = runtime.store
    bad = store.create(GenerateJobCreate(prompt=ERROR_PROMPT, max_new_tokens=8)).job_id
    good = store.create(GenerateJobCreate(prompt="fine", max_new_tokens=8)).job_id
    assert run_in_threads(runtime, [bad, good]) == {bad: "failed", good: "succeeded"}
    error = store.get(bad).error
    assert error is not None and error[0] == "engine_error" and "fake device error" in error[1]


def test_a_job_past_its_deadline_is_stopped_and_expired(fresh_redis_url: str):
    fake_engine = DeterministicFakeEngine(canvas_length=8, steps_per_canvas=2, step_seconds=0.005, max_context=4096)
    runtime = make_runtime(fresh_redis_url, fake_engine, job_deadline_seconds=1)
    try:
        job_id = runtime.store.create(GenerateJobCreate(prompt="slow", max_new_tokens=2000)).job_id
        assert run_in_threads(runtime, [job_id]) == {job_id: "expired"}
        assert runtime.store.get(job_id).error[0] == "deadline_exceeded"
    finally:
        runtime.stop()


def test_shutdown_past_the_grace_period_hands_jobs_back_released(fresh_redis_url: str,
                                                                 fake_engine: DeterministicFakeEngine):
    runtime = make_runtime(fresh_redis_url, fake_engine, worker_shutdown_grace_seconds=0)
    store = runtime.store
    job_id = store.create(GenerateJobCreate(prompt="interrupted", max_new_tokens=400)).job_id
    outcomes: dict[str, object] = {}
    thread = threading.Thread(target=lambda: outcomes.update(run_in_threads(runtime, [job_id])))
    thread.start()
    wait_until(lambda: runtime.loop.is_in_flight(job_id), 10, what="job admitted")
    runtime.begin_shutdown()
    thread.join(30)
    runtime.stop()
    assert isinstance(outcomes[job_id], HandBack)
    job = store.get(job_id)
    assert job.status == "queued" and job.attempts == 1
    assert event_types(store, job_id)[-1] == "requeued"


def test_the_heartbeat_registers_the_worker_and_a_clean_stop_removes_it(fresh_redis_url: str,
                                                                       fake_engine: DeterministicFakeEngine):
    runtime = make_runtime(fresh_redis_url, fake_engine)
    wait_until(lambda: [w["worker_id"] for w in runtime.store.live_workers()] == [runtime.worker_id], 5,
               what="worker registered")
    runtime.stop()
    time.sleep(0.05)
    assert runtime.store.live_workers() == []
