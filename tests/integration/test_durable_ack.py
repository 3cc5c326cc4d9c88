"""A 202 means the job survives a crash of Redis: the Redis of `dgserve up` (and of deploy/) fsyncs every write
before replying (`appendfsync always`), and jobs acknowledged right before a kill -9 are all there, queued
with their Celery message, when Redis restarts on the same data.

What the kill -9 here proves and what it cannot: killing the Redis *process* loses nothing that Redis wrote
to the kernel before replying, which it does under `everysec` too; `always` adds the fsync that keeps those
writes through a crash of the host or a power loss, which a test on one machine cannot stage. So the test
checks both halves it can: the launcher's Redis runs with `appendfsync always`, and acknowledged jobs survive
a kill -9 issued immediately after the last 202.
"""

from __future__ import annotations

import os
import signal

import httpx
import pytest
import redis

from services.api.app import create_app
from services.jobs import JobStore
from services.launcher import start_redis
from services.settings import BUNDLED_MODEL_DIR, Settings
from services.supervisor import StopSignals, Supervisor
from tests.support.api_server import serve_in_thread

pytestmark = pytest.mark.integration


def test_jobs_acknowledged_before_a_redis_kill_9_survive(tmp_path):
    data = tmp_path / "redis"
    supervisor = Supervisor(tmp_path, StopSignals(), print)
    try:
        url = start_redis(supervisor, data)
        assert redis.Redis.from_url(url, decode_responses=True).config_get("appendfsync") == {"appendfsync": "always"}
        settings = Settings(redis_url=url, model=str(BUNDLED_MODEL_DIR))
        accepted: list[str] = []
        with serve_in_thread(create_app(settings)) as base, httpx.Client(base_url=base, timeout=10) as client:
            for n in range(40):
                response = client.post("/v1/jobs", json={"prompt": f"def f{n}(x):", "max_new_tokens": 8})
                assert response.status_code == 202, response.text
                accepted.append(response.json()["id"])
            os.kill(supervisor.children[0].process.pid, signal.SIGKILL)  # right after the last 202
            supervisor.children[0].process.wait(timeout=10)
        restarted = Supervisor(tmp_path, StopSignals(), print)
        try:
            url = start_redis(restarted, data)
            store = JobStore(redis.Redis.from_url(url, decode_responses=True), Settings(redis_url=url,
                                                                                      model=settings.model))
            statuses = {job_id: getattr(store.get(job_id), "status", None) for job_id in accepted}
            assert set(statuses.values()) == {"queued"}, statuses
            assert store.redis.llen(settings.queue_name) == len(accepted)  # every Celery message too
        finally:
            restarted.signals.handle(signal.SIGTERM)
            restarted.stop(timeout_s=10)
    finally:
        supervisor.signals.handle(signal.SIGTERM)
        supervisor.stop(timeout_s=10)
