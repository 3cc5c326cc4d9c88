"""The processes of `bench/load_sim.py` and what it reads from them: a loopback redis-server, N API processes
(uvicorn, the real app), M Celery workers on the simulated engine (worker/simulated_engine.py), and snapshots
of Redis's command counters and every process's CPU time (from /proc, so Linux only).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from services.jobs import JobStore  # noqa: E402
from services.launcher import find_redis_server, free_loopback_port  # noqa: E402
from services.settings import BUNDLED_MODEL_DIR, Settings  # noqa: E402
from tests.support.processes import api_command, start_process, stop_process, wait_for_http, wait_until  # noqa: E402

QUEUE = "dgemma.loadsim"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class StackShape:
    """What to start: API and worker processes, worker batch rows, the simulated step time, Redis fsync."""

    apis: int = 1
    workers: int = 8
    concurrency: int = 64
    step_scale: float = 1.0
    appendfsync: str = "always"  # as deploy/redis/redis.conf and `dgserve up` run it


@dataclass
class Stack:
    folder: Path
    redis_port: int
    redis_process: subprocess.Popen
    api_urls: list[str] = field(default_factory=list)
    apis: list[subprocess.Popen] = field(default_factory=list)
    workers: list[subprocess.Popen] = field(default_factory=list)
    worker_metrics: list[str] = field(default_factory=list)
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=10))  # one client: no TLS setup per call

    def redis(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.redis_port, decode_responses=True)

    def stop(self) -> None:
        for process in [*self.workers, *self.apis]:
            stop_process(process, timeout=30)
        stop_process(self.redis_process)


def base_env(redis_port: int) -> dict[str, str]:
    return {**os.environ, "DGSERVE_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "PYTHONPATH": str(REPO_ROOT),
            "DGSERVE_MODEL": str(BUNDLED_MODEL_DIR), "DGSERVE_QUEUE_NAME": QUEUE, "OMP_NUM_THREADS": "1",
            "DGSERVE_MAX_QUEUED_JOBS": "1000000", "DGSERVE_CACHE_DIR": "", "PYTHONUNBUFFERED": "1"}


def start_stack(shape: StackShape, folder: Path) -> Stack:
    """Redis, then the APIs and workers; returns once every API answers /healthz and every worker's registry
    record is in Redis (model-less workers still import torch: tens of seconds on a busy machine)."""
    port = free_loopback_port()
    persistence = ["--appendonly", "no"] if shape.appendfsync == "off" else \
        ["--appendonly", "yes", "--appendfsync", shape.appendfsync]
    process = start_process([find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             *persistence, "--dir", str(folder), "--maxmemory-policy", "noeviction"],
                            log_path=folder / "redis.log")
    stack = Stack(folder, port, process)
    try:
        wait_until(lambda: _pings(stack), 30, interval=0.1, what="redis-server answers")
        env = base_env(port)
        env["DGSERVE_CACHE_DIR"] = str(folder / "cache")
        for index in range(shape.apis):
            _start_api(stack, env, index)
        for index in range(shape.workers):
            _start_worker(stack, env, index, shape)
        for url, api in zip(stack.api_urls, stack.apis, strict=True):
            wait_for_http(f"{url}/healthz", timeout=120, process=api)
        wait_until(lambda: _live_workers(stack) >= shape.workers, 600, interval=0.5,
                   what=f"{shape.workers} simulated workers registered")
    except BaseException:
        stack.stop()
        raise
    return stack


def _pings(stack: Stack) -> bool:
    try:
        return bool(stack.redis().ping())
    except redis.ConnectionError:
        return False


def _live_workers(stack: Stack) -> int:
    for process in stack.workers:
        if process.poll() is not None:
            raise RuntimeError(f"a simulated worker exited with {process.returncode}; see {stack.folder}")
    store = JobStore(stack.redis(), Settings(redis_url=f"redis://127.0.0.1:{stack.redis_port}/0", queue_name=QUEUE,
                                             model=str(BUNDLED_MODEL_DIR)))
    return sum(1 for worker in store.live_workers() if worker.get("queue") == QUEUE)


def _start_api(stack: Stack, env: dict[str, str], index: int) -> None:
    port = free_loopback_port()
    stack.apis.append(start_process(
        api_command(port, "--no-access-log"),
        log_path=stack.folder / f"api-{index}.log", env=env, cwd=REPO_ROOT))
    stack.api_urls.append(f"http://127.0.0.1:{port}")


def _start_worker(stack: Stack, env: dict[str, str], index: int, shape: StackShape) -> None:
    port = free_loopback_port()
    worker_env = {**env, "DGSERVE_WORKER_SIMULATED_STEP_SCALE": str(shape.step_scale),
                  "DGSERVE_WORKER_METRICS_HOST": "127.0.0.1",
                  "DGSERVE_WORKER_HEARTBEAT_FILE": str(stack.folder / f"worker-{index}.heartbeat")}
    stack.workers.append(start_process(
        [sys.executable, "-m", "worker", "--cpu", "--engine", "simulated", "--concurrency", str(shape.concurrency),
         "--metrics-port", str(port), "--hostname", f"sim{index}@loadsim", "--loglevel", "WARNING"],
        log_path=stack.folder / f"worker-{index}.log", env=worker_env, cwd=REPO_ROOT))
    stack.worker_metrics.append(f"http://127.0.0.1:{port}/metrics")


# -- measurements -----------------------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of every thread of `pid` so far (/proc/<pid>/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def self_cpu_seconds() -> float:
    """CPU seconds of this process (the load generator), all threads."""
    times = os.times()
    return times.user + times.system


@dataclass(frozen=True)
class Snapshot:
    at: float
    commands: int
    reads: int  # read events on client sockets: one per request or pipeline that arrives = round trips
    commandstats: dict[str, int]
    cpu: dict[str, float]  # "redis", "api", "workers", "generator": CPU seconds so far (sums over processes)


def snapshot(stack: Stack) -> Snapshot:
    client = stack.redis()
    stats, commandstats = client.info("stats"), client.info("commandstats")
    cpu = {"redis": cpu_seconds(stack.redis_process.pid),
           "api": sum(cpu_seconds(p.pid) for p in stack.apis),
           "workers": sum(cpu_seconds(p.pid) for p in stack.workers),
           "generator": self_cpu_seconds()}
    calls = {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in commandstats.items()}
    return Snapshot(time.monotonic(), int(stats["total_commands_processed"]),
                    int(stats.get("total_reads_processed", 0)), calls, cpu)


def worker_jobs_done(stack: Stack) -> float:
    """Sum of `dgserve_worker_jobs_total` over every worker (all outcomes): jobs the workers finished."""
    total = 0.0
    for url in stack.worker_metrics:
        for line in stack.http.get(url).text.splitlines():
            if line.startswith("dgserve_worker_jobs_total{"):
                total += float(line.rpartition(" ")[2])
    return total
