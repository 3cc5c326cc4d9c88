"""End to end through the real stack: HTTP API (uvicorn) → Redis → Celery worker (engine on a tiny random
checkpoint) → job record and events → HTTP. One shared worker and API (see conftest)."""

from __future__ import annotations

import concurrent.futures
import re
from pathlib import Path

import pytest

from dgtext.tokenizer import PromptTokenizer
from engine.engine import Engine
from services.job_messages import JobQueue
from services.jobs import JobStore
from services.schemas import TERMINAL_STATUSES, GenerateJobCreate, parse_job_create
from services.settings import model_short_name
from tests.integration.conftest import (
    SHARED_QUEUE,
    Stack,
    metric_samples,
    read_events,
    store_event_types,
    submit,
    wait_for_status,
)
from tests.support.processes import wait_until
from worker.requests import prepare_job
from worker.runtime import model_info_of

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]
TERMINAL = TERMINAL_STATUSES

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_directly(model_dir, bodies: list[dict]) -> list[list[int]]:
    """The token ids the engine itself produces for these job bodies (all batched together)."""
    engine = Engine.from_pretrained(model_dir, max_canvases_in_flight=len(bodies))
    info = model_info_of(engine)
    ids: dict[str, list[int]] = {}
    for index, body in enumerate(bodies):
        engine.add_request(prepare_job(parse_job_create(body), info).request, request_id=str(index))
        ids[str(index)] = []
    for _ in range(10_000):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            if out.kind == "canvas":
                ids[out.request_id].extend(out.token_ids)
    return [ids[str(index)] for index in range(len(bodies))]


def test_generate_job_streams_drafts_canvases_and_done_then_result(stack: Stack):
    body = {"prompt": "Hello there", "seed": 7, "max_new_tokens": 40, "stream_drafts": True}
    with stack.client() as client:
        job_id = submit(client, body)
        events = read_events(client, job_id, until={"done", "failed"})
        view = wait_for_status(client, job_id, TERMINAL)
    types = [event_type for event_type, _ in events]
    assert types[:2] == ["queued", "started"] and types[-1] == "done"
    canvases = [data for event_type, data in events if event_type == "canvas"]
    drafts = [data for event_type, data in events if event_type == "draft"]
    assert len(canvases) == 2  # 40 tokens on a 32-token canvas
    assert drafts and drafts[0] == {"canvas": 0, "step": 1, "text": drafts[0]["text"]}
    assert types.index("draft") < types.index("canvas")
    assert view["status"] == "succeeded" and view["attempts"] == 1
    result = view["result"]
    assert result["finish_reason"] in ("stop", "length")
    assert result["usage"]["generated_tokens"] == len(result["token_ids"]) <= 40
    assert result["text"] == PromptTokenizer.from_dir(stack.model_dir).decode(result["token_ids"])
    timings = view["timings"]
    assert timings["created_at"] <= timings["started_at"] <= timings["finished_at"]
    assert 0 <= timings["queue_seconds"] < 30 and 0 < timings["run_seconds"] < 60
    assert events[-1][1]["result"] == result


def test_sixteen_jobs_are_batched_and_each_gets_its_own_result(stack: Stack):
    bodies = [{"prompt": f"job number {i}", "seed": 1000 + i, "max_new_tokens": 32} for i in range(16)]
    before = metric_samples(stack.worker.metrics_text(), "dgserve_batch_size_canvases_bucket")
    with stack.client() as client, concurrent.futures.ThreadPoolExecutor(16) as pool:
        job_ids = list(pool.map(lambda body: submit(client, body), bodies))
        views = list(pool.map(lambda job_id: wait_for_status(client, job_id, TERMINAL), job_ids))
    assert [view["status"] for view in views] == ["succeeded"] * 16
    expected = run_directly(stack.model_dir, bodies)
    assert [view["result"]["token_ids"] for view in views] == expected
    after = metric_samples(stack.worker.metrics_text(), "dgserve_batch_size_canvases_bucket")
    model = model_short_name(str(stack.model_dir))
    one, total = f'{{gpu="cpu",le="1.0",model="{model}"}}', f'{{gpu="cpu",le="+Inf",model="{model}"}}'
    batched_forwards = (after[total] - before.get(total, 0)) - (after[one] - before.get(one, 0))
    assert batched_forwards > 0, "no decoder forward held more than one canvas"
    # A forward with many canvases: the 16 jobs overlapped, not merely pairs.
    eight = f'{{gpu="cpu",le="8.0",model="{model}"}}'
    assert after[total] - after[eight] > before.get(total, 0) - before.get(eight, 0)


def test_cancel_mid_job(stack: Stack):
    body = {"prompt": "a long one", "seed": 3, "max_new_tokens": 2048, "stream_drafts": True}
    with stack.client() as client:
        job_id = submit(client, body)
        read_events(client, job_id, until={"draft"})
        response = client.delete(f"/v1/jobs/{job_id}")
        assert response.status_code == 202, response.text
        view = wait_for_status(client, job_id, TERMINAL, timeout=30)
        assert view["status"] == "cancelled"
        assert client.delete(f"/v1/jobs/{job_id}").status_code == 409
    types = store_event_types(stack.store(), job_id)
    assert types[-1] == "cancelled" and "done" not in types


def test_idempotent_resubmission_and_redelivery_of_a_finished_job(stack: Stack):
    body = {"prompt": "same request twice", "seed": 11, "max_new_tokens": 32}
    with stack.client() as client:
        first = submit(client, body, **{"Idempotency-Key": "itest-key-1"})
        second = submit(client, body, **{"Idempotency-Key": "itest-key-1"})
        assert first == second
        view = wait_for_status(client, first, TERMINAL)
        assert view["status"] == "succeeded" and view["attempts"] == 1
        # The broker delivers the same job again (at-least-once): the worker acks it without running it.
        queue = JobQueue(stack.settings(queue_name=SHARED_QUEUE))
        queue.submit(first)
        queue.close()
        store = stack.store()
        wait_until(lambda: "Task dgserve.run_job" in stack.worker.log() and
                   stack.worker.log().count("'already_finished'") >= 1, timeout=30, what="redelivery acked")
        again = client.get(f"/v1/jobs/{first}").json()
    assert again["attempts"] == 1 and again["result"] == view["result"]
    types = store_event_types(store, first)
    assert types.count("started") == 1 and types.count("done") == 1


def test_the_api_refuses_what_the_engine_would_and_a_job_stored_past_it_fails_cleanly(stack: Stack):
    # The worker publishes its engine's limits (max_context 4096) with its heartbeat; the API checks them.
    with stack.client() as client:
        response = client.post("/v1/jobs", json={"prompt": "x", "max_new_tokens": 4096})
        assert response.status_code == 422, response.text
        assert response.json()["error"]["field"] == "max_new_tokens"
        # A job stored without that check (as one accepted before any worker had published) still fails
        # cleanly in the worker, by the same rule, and the worker keeps serving.
        bad = stack.store().create(GenerateJobCreate(prompt="x", max_new_tokens=4096)).job_id
        queue = JobQueue(stack.settings(queue_name=SHARED_QUEUE))
        queue.submit(bad)
        queue.close()
        view = wait_for_status(client, bad, TERMINAL)
        assert view["status"] == "failed" and view["error"]["code"] == "invalid_request"
        assert "max_new_tokens" in view["error"]["message"] and "4096" in view["error"]["message"]
        good = submit(client, {"prompt": "still alive?", "seed": 5, "max_new_tokens": 16})
        assert wait_for_status(client, good, TERMINAL)["status"] == "succeeded"


def test_metrics_endpoints_expose_the_documented_names(stack: Stack):
    with stack.client() as client:  # histograms show buckets once observed: run one job (no test-order coupling)
        job = submit(client, {"prompt": "metrics", "seed": 3, "max_new_tokens": 8, "max_denoising_steps": 2})
        assert wait_for_status(client, job, TERMINAL)["status"] == "succeeded"
    worker_text = stack.worker.metrics_text()
    for name in ("dgserve_generated_tokens_total", "dgserve_denoising_steps_total", "dgserve_canvases_total",
                 "dgserve_steps_per_canvas_bucket", "dgserve_batch_size_canvases_bucket",
                 "dgserve_forward_seconds_bucket", "dgserve_job_e2e_seconds_bucket",
                 "dgserve_job_queue_wait_seconds_bucket", "dgserve_job_run_seconds_bucket",
                 "dgserve_canvases_in_flight", "dgserve_canvases_waiting", "dgserve_gpu_memory_used_bytes",
                 "dgserve_gpu_memory_total_bytes"):
        assert name in worker_text, name
    assert "job_id" not in worker_text
    with stack.client() as client:
        api_text = client.get("/metrics").text
        assert client.get("/readyz").status_code == 200  # the worker's heartbeat is in the store
    for name in ("dgserve_api_requests_total", "dgserve_queue_depth"):
        assert name in api_text, name
    # Every series the shipped Grafana dashboard and alert rules query must exist on one of the endpoints.
    exposed = set(re.findall(r"^(dgserve_\w+?)(?:_bucket|_sum|_count)?[{ ]", worker_text + api_text, re.M))
    for path in (REPO_ROOT / "deploy/grafana/dashboards/dgserve.json", REPO_ROOT / "deploy/prometheus/alerts.yml"):
        queried = {re.sub(r"_(bucket|sum|count)$", "", n) for n in re.findall(r"dgserve_\w+", path.read_text())}
        assert queried <= exposed, f"{path.name} queries metrics nobody exposes: {sorted(queried - exposed)}"


def test_job_past_its_deadline_is_stopped_between_steps(stack: Stack):
    # The API stamps deadline_at = created + job_deadline_seconds; a store with a 1 s deadline makes one.
    settings = stack.settings(queue_name=SHARED_QUEUE, job_deadline_seconds=1)
    store = JobStore.from_settings(settings)
    job_id = store.create(GenerateJobCreate(prompt="too slow", seed=9, max_new_tokens=4096 - 64)).job_id
    producer = JobQueue(settings)
    producer.submit(job_id)
    producer.close()
    wait_until(lambda: store.get(job_id).is_finished, timeout=60, what="deadline enforced")
    job = store.get(job_id)
    assert job.status == "expired" and job.error[0] == "deadline_exceeded"
    assert job.started_at is not None  # it ran, and was stopped by the worker, not refused at start
    assert store_event_types(store, job_id)[-1] == "expired"


def test_edit_job_through_the_stack(stack: Stack):
    document = "The quick brown fox jumps over the lazy dog."
    body = {"kind": "edit", "document": document, "edits": [{"find": "brown fox"}], "seed": 4}
    with stack.client() as client:
        job_id = submit(client, body)
        view = wait_for_status(client, job_id, TERMINAL)
    assert view["status"] == "succeeded", view["error"]
    result = view["result"]
    (edit,) = result["edits"]
    assert result["document"].startswith(document[:edit["start"]])
    assert result["document"].endswith(document[edit["original_end"]:])
    assert result["document"][edit["start"]:edit["end"]] == edit["replacement"]
