"""Celery's own tooling sees dgserve workers: `celery inspect ping` answers, and task events flow (what
`celery events` and Flower read), against the real worker process of the shared stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
from celery import Celery

from services.settings import REPO_ROOT
from tests.integration.conftest import SHARED_QUEUE, Stack, submit, wait_for_status

pytestmark = pytest.mark.integration


def test_celery_inspect_ping_answers(stack: Stack):
    node = stack.worker.log_path.name.removesuffix(".log")  # shared-<port>, the --hostname's name part
    env = {**os.environ, **stack.base_env, "DGSERVE_QUEUE_NAME": SHARED_QUEUE}
    ping = subprocess.run([sys.executable, "-m", "celery", "-A", "worker.celery_app", "inspect", "ping",
                           "--destination", f"{node}@itest", "--timeout", "10", "--json"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert json.loads(ping.stdout.strip().splitlines()[-1]) == {f"{node}@itest": {"ok": "pong"}}


def test_task_events_are_sent(stack: Stack):
    app = Celery(broker=stack.redis.url)
    seen: dict[str, list[str]] = {}
    connected = threading.Event()

    def record(event: dict) -> None:
        seen.setdefault(event["type"], []).append(event.get("uuid", event.get("hostname", "")))

    def listen() -> None:
        with app.connection() as connection:
            receiver = app.events.Receiver(connection, handlers={"*": record})
            connected.set()
            # Until the task finished and a worker event arrived: worker heartbeats come every few seconds, so a
            # job that finishes first must not end the capture before one (bounded by the receiver's timeout).
            for _ in receiver.itercapture(limit=None, timeout=30, wakeup=False):
                if "task-succeeded" in seen and ("worker-heartbeat" in seen or "worker-online" in seen):
                    return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    assert connected.wait(30)
    with stack.client() as client:
        job_id = submit(client, {"prompt": "events", "max_new_tokens": 4, "seed": 3})
        wait_for_status(client, job_id, {"succeeded"})
    listener.join(timeout=30)
    assert "task-received" in seen and "task-succeeded" in seen, sorted(seen)
    assert "worker-heartbeat" in seen or "worker-online" in seen, sorted(seen)
