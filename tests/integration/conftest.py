"""The real stack for end-to-end tests: a redis-server, Celery worker subprocesses on a tiny random
checkpoint, and the API under uvicorn, all on loopback ports.

One redis, one worker and one API are shared by the whole session (starting a worker means importing torch and
loading the model: seconds on a 2-core machine). Tests that kill or stop workers start their own, on a queue
of their own, so they never disturb the shared worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from services.jobs import JobStore
from services.settings import Settings
from tests.support.processes import (
    api_command,
    free_port,
    start_process,
    stop_process,
    wait_for_http,
    wait_until,
)
from tests.support.redis_server import RedisServer, run_redis_server

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_QUEUE = "dgemma.itest"
WORKER_STARTUP_S = 120.0  # torch import + model load on a busy 2-core machine


@dataclass
class WorkerProcess:
    process: subprocess.Popen
    metrics_url: str
    log_path: Path
    queue: str

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def metrics_text(self) -> str:
        return httpx.get(self.metrics_url, timeout=5).text


@dataclass
class Stack:
    redis: RedisServer
    model_dir: Path
    base_env: dict[str, str]
    api_url: str
    worker: WorkerProcess
    log_dir: Path
    extra: list[subprocess.Popen] = field(default_factory=list)

    def settings(self, **overrides: object) -> Settings:
        env = {k[len("DGSERVE_"):].lower(): v for k, v in self.base_env.items() if k.startswith("DGSERVE_")}
        return Settings(**{**env, **overrides})

    def store(self, queue: str = SHARED_QUEUE) -> JobStore:
        return JobStore.from_settings(self.settings(queue_name=queue))

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.api_url, timeout=30)


def worker_env(base_env: dict[str, str], queue: str, **settings: object) -> dict[str, str]:
    env = {**base_env, "DGSERVE_QUEUE_NAME": queue}
    env.update({f"DGSERVE_{name.upper()}": str(value) for name, value in settings.items()})
    return env


@contextlib.contextmanager
def api_and_worker(redis_env: dict[str, str], model_dir: Path, folder: Path, queue: str, concurrency: int,
                   name: str) -> Iterator[tuple[str, WorkerProcess]]:
    """A real API process and one real worker (`concurrency` slots, heartbeat every 0.5 s, 5 s job leases) on
    `queue`, against the Redis that `redis_env` (DGSERVE_REDIS_* variables) names; yields (API URL, worker) once
    both answer, and stops both after. For the fault tests, which each bring their own Redis."""
    env = {**redis_env, "DGSERVE_MODEL": str(model_dir), "OMP_NUM_THREADS": "1",
           "DGSERVE_CACHE_DIR": str(folder / "cache"), "DGSERVE_JOB_LEASE_SECONDS": "5", "PYTHONUNBUFFERED": "1",
           "DGSERVE_WORKER_METRICS_HOST": "127.0.0.1", "DGSERVE_QUEUE_NAME": queue}
    api_port = free_port()
    api = start_process(api_command(api_port), log_path=folder / "api.log", env=env, cwd=REPO_ROOT)
    worker = None
    try:
        worker = start_worker(env, model_dir, folder, queue, concurrency=concurrency, name=name,
                              worker_heartbeat_interval_seconds=0.5)
        wait_for_http(f"http://127.0.0.1:{api_port}/healthz", timeout=60, process=api)
        yield f"http://127.0.0.1:{api_port}", worker
    finally:
        if worker is not None:
            stop_process(worker.process, timeout=30)
        stop_process(api)


def start_worker(stack_env: dict[str, str], model_dir: Path, log_dir: Path, queue: str, concurrency: int = 16,
                 name: str = "worker", **settings: object) -> WorkerProcess:
    """`python -m worker --cpu` on `queue`; returns once its metrics endpoint answers (model loaded)."""
    port = free_port()
    log_path = log_dir / f"{name}-{port}.log"
    env = worker_env(stack_env, queue, **settings)
    args = [sys.executable, "-m", "worker", "--cpu", "--model", str(model_dir), "--concurrency", str(concurrency),
            "--metrics-port", str(port), "--loglevel", "INFO", "--hostname", f"{name}-{port}@itest"]
    process = start_process(args, log_path=log_path, env=env, cwd=REPO_ROOT)
    worker = WorkerProcess(process, f"http://127.0.0.1:{port}/metrics", log_path, queue)
    try:
        wait_for_http(worker.metrics_url, timeout=WORKER_STARTUP_S, process=process)
        # Metrics come up after the model is loaded, but the consumer starts a moment later.
        wait_until(lambda: "ready" in worker.log(), WORKER_STARTUP_S, interval=0.1, what=f"{name} consuming")
    except (TimeoutError, RuntimeError) as err:
        stop_process(process)
        raise RuntimeError(f"{name} did not start: {err}\n{worker.log()}") from err
    return worker


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support.checkpoints import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-model"), seed=0)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stack]:
    log_dir = tmp_path_factory.mktemp("stack-logs")
    with run_redis_server(tmp_path_factory.mktemp("stack-redis")) as server:
        base_env = {
            "DGSERVE_REDIS_URL": server.url, "DGSERVE_MODEL": str(tiny_model_dir),
            "DGSERVE_CACHE_DIR": str(log_dir / "cache"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "DGSERVE_JOB_LEASE_SECONDS": "5", "PYTHONUNBUFFERED": "1", "DGSERVE_WORKER_METRICS_HOST": "127.0.0.1",
        }
        api_port = free_port()
        api_env = {**base_env, "DGSERVE_QUEUE_NAME": SHARED_QUEUE, "DGSERVE_API_PORT": str(api_port)}
        api = start_process(api_command(api_port), log_path=log_dir / "api.log", env=api_env, cwd=REPO_ROOT)
        worker = None
        try:
            worker = start_worker(base_env, tiny_model_dir, log_dir, SHARED_QUEUE, name="shared")
            wait_for_http(f"http://127.0.0.1:{api_port}/healthz", timeout=60, process=api)
            yield Stack(server, tiny_model_dir, base_env, f"http://127.0.0.1:{api_port}", worker, log_dir)
        finally:
            if worker is not None:
                stop_process(worker.process, timeout=30)
            stop_process(api)


# -- helpers shared by the tests ------------------------------------------------------------------------------
def submit(client: httpx.Client, body: dict, **headers: str) -> str:
    response = client.post("/v1/jobs", json=body, headers=headers)
    assert response.status_code == 202, response.text
    assert response.headers["location"].endswith(response.json()["id"])
    return response.json()["id"]


def wait_for_status(client: httpx.Client, job_id: str, statuses: set[str], timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = client.get(f"/v1/jobs/{job_id}").json()
        if view["status"] in statuses:
            return view
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} did not reach {statuses} in {timeout}s (last: {view})")


def read_events(client: httpx.Client, job_id: str, until: set[str], timeout: float = 120.0) -> list[tuple[str, dict]]:
    """The job's SSE stream, parsed, up to and including the first event whose type is in `until`."""
    events: list[tuple[str, dict]] = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=timeout) as response:
        assert response.status_code == 200, response.read()
        event_type, data = "message", ""
        for line in response.iter_lines():
            if line.startswith("event:"):
                event_type = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                data += line.split(":", 1)[1].strip()
            elif line == "" and data:
                events.append((event_type, json.loads(data)))
                if event_type in until:
                    return events
                event_type, data = "message", ""
    return events


def store_event_types(store: JobStore, job_id: str) -> list[str]:
    return [entry["type"] for _, entry in store.redis.xrange(store.events_key(job_id))]


def metric_samples(text: str, name: str) -> dict[str, float]:
    """`{label-string: value}` of every sample of `name` in a Prometheus exposition."""
    samples = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, _, value = line.rpartition(" ")
            samples[key[len(name):]] = float(value)
    return samples


@contextlib.contextmanager
def extra_worker(stack: Stack, queue: str, name: str, **settings: object) -> Iterator[WorkerProcess]:
    worker = start_worker(stack.base_env, stack.model_dir, stack.log_dir, queue, name=name, **settings)
    try:
        yield worker
    finally:
        stop_process(worker.process, timeout=30)


def kill_hard(process: subprocess.Popen) -> None:
    """kill -9 the whole process group (the worker has no child processes with the threads pool)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, 9)
    process.wait(timeout=10)
