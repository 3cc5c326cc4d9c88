"""Fault test: Redis restarts (kill -9, started again on the same port with the same AOF) while a worker has
jobs in flight. Real parts only: a durable redis-server, a `python -m worker` process, the API under uvicorn,
everything over loopback. Nothing but Redis is restarted; the worker must ride the outage out."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from services.jobs import JobStore
from services.settings import Settings
from tests.integration.conftest import (
    WorkerProcess,
    api_and_worker,
    store_event_types,
)
from tests.support.processes import (
    wait_until,
)
from tests.support.redis_server import RestartableRedis

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(420)]

QUEUE = "dgemma.itest-outage"
OUTAGE_S = 3.0  # Redis is down this long (a restart takes ~2 s in production)
JOBS = 4
# Long enough (tens of canvases, tens of seconds on this machine) to be in flight across the whole outage.
JOB_BODY = {"max_new_tokens": 640, "stream_drafts": True}


@dataclass
class OutageStack:
    redis: RestartableRedis
    api_url: str
    worker: WorkerProcess
    store: JobStore


@pytest.fixture
def outage_stack(tmp_path: Path, tiny_model_dir: Path) -> Iterator[OutageStack]:
    server = RestartableRedis(tmp_path / "redis")
    server.start()
    try:
        with api_and_worker({"DGSERVE_REDIS_URL": server.url}, tiny_model_dir, tmp_path, QUEUE, JOBS,
                            "outage") as (api_url, worker):
            store = JobStore.from_settings(Settings(redis_url=server.url, queue_name=QUEUE, job_lease_seconds=5))
            yield OutageStack(server, api_url, worker, store)
    finally:
        server.stop()


def test_jobs_in_flight_finish_exactly_once_across_a_redis_restart(outage_stack: OutageStack):
    stack = outage_stack
    client = httpx.Client(base_url=stack.api_url, timeout=10)
    wait_until(lambda: client.get("/readyz").status_code == 200, 30, interval=0.1, what="ready before")
    job_ids = []
    for index in range(JOBS):
        response = client.post("/v1/jobs", json={"prompt": f"ride it out {index}", "seed": index, **JOB_BODY})
        assert response.status_code == 202, response.text
        job_ids.append(response.json()["id"])
    wait_until(lambda: all("draft" in store_event_types(stack.store, job_id) for job_id in job_ids), 120,
               interval=0.1, what="every job in flight")

    stack.redis.kill()
    during = probe_api_while_down(client, job_ids[0], OUTAGE_S)
    stack.redis.start()
    assert stack.worker.process.poll() is None, stack.worker.log()

    wait_until(lambda: all(stack.store.get(job_id).is_finished for job_id in job_ids), 240, interval=0.2,
               what="every job finished")
    wait_until(lambda: client.get("/readyz").status_code == 200, 30, interval=0.1, what="ready after")
    log = stack.worker.log_path.read_text(errors="replace")
    assert stack.worker.process.poll() is None, log[-4000:]
    assert "Unrecoverable error" not in log and "job store write failed" not in log
    # One line when the outage starts, one when it ends (not a traceback per write).
    assert log.count("job store unreachable") == 1 and log.count("job store reachable again") == 1, log[-4000:]

    for job_id in job_ids:
        job = stack.store.get(job_id)
        assert job.status == "succeeded" and job.attempts == 1, (job.status, job.error, job.attempts)
        events = [(entry["type"], entry["data"]) for _, entry in stack.store.redis.xrange(
            stack.store.events_key(job_id))]
        types = [event_type for event_type, _ in events]
        assert types.count("done") == 1 and types.count("started") == 1 and "requeued" not in types
        # No canvas was dropped: every committed canvas has its event (a write retried after a lost reply may
        # repeat one, never skip one), and the result holds every canvas's tokens.
        canvases = {json.loads(data)["canvas"] for kind, data in events if kind == "canvas"}
        assert canvases == set(range(job.result["usage"]["canvases"]))
        assert len(job.result["token_ids"]) == job.result["usage"]["generated_tokens"] > 0

    # During the outage /readyz said not ready, and the job routes answered 503 (never a 500, never silence).
    assert during["readyz"] and set(during["readyz"]) == {503}, during
    assert set(during["get"]) == {503} and set(during["post"]) == {503}, during
    print(f"outage probes: {during}")
    print("\n".join(line for line in log.splitlines() if any(
        word in line for word in ("reachable", "broker", "Restoring", "Connected", "unacked"))))


def probe_api_while_down(client: httpx.Client, job_id: str, seconds: float) -> dict[str, list[int]]:
    """Status codes of /readyz, GET /v1/jobs/{id} and POST /v1/jobs for `seconds` of the outage (0: the
    connection was dropped without an answer)."""
    codes: dict[str, list[int]] = {"readyz": [], "get": [], "post": []}
    requests = {"readyz": ("GET", "/readyz", None), "get": ("GET", f"/v1/jobs/{job_id}", None),
                "post": ("POST", "/v1/jobs", {"prompt": "during the outage"})}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for name, (method, path, body) in requests.items():
            try:
                codes[name].append(client.request(method, path, json=body).status_code)
            except httpx.TransportError:
                codes[name].append(0)
        time.sleep(0.2)
    return codes
