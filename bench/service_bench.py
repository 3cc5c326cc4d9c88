"""Service overhead benchmark: the same generate jobs through the full stack and directly through the engine.

    OMP_NUM_THREADS=1 .venv/bin/python bench/service_bench.py --n 64 --concurrency 16 --single 20

Phases, each run on the same model, machine and job bodies (same seeds, so the same tokens and steps):
1. direct, saturated: all N requests added to an `Engine` at once (it batches `--concurrency` canvases, as the
   worker's engine does); latency = add → finished.
2. stack, saturated: a loopback redis-server, one `python -m worker --cpu` and the API under uvicorn are
   started; all N jobs are POSTed at once and followed over SSE; latency = POST → `done` event.
   throughput ratio = stack tokens/s ÷ direct tokens/s.
   Direct and stack rounds alternate (`--rounds`) so load drift on a shared machine hits both alike.
3. single job at a time, `--single` jobs (`--single-steps` steps per canvas): direct latency vs stack latency of the same job, back to back; the
   difference is the latency the service adds (HTTP, Redis, Celery, job store, SSE) with no queueing in it.
   Also reported: stack latency minus the worker's own run time of the job (from the job record), i.e. the
   part spent outside the worker.

Prints a table and writes JSON (`--out`). Without `--model` a random tiny checkpoint is written to a
temporary folder (random weights: every canvas runs to the step cap, which is the same work in both paths).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from engine.engine import Engine  # noqa: E402
from services.launcher import find_redis_server, free_loopback_port  # noqa: E402
from services.schemas import TERMINAL_EVENTS, parse_job_create  # noqa: E402
from tests.support.processes import api_command  # noqa: E402
from worker.requests import prepare_job  # noqa: E402
from worker.runtime import model_info_of  # noqa: E402


def job_bodies(n: int, max_new_tokens: int, offset: int = 0, **options: int) -> list[dict]:
    return [{"prompt": f"benchmark prompt number {i}", "seed": 10_000 + i, "max_new_tokens": max_new_tokens,
             **options} for i in range(offset, offset + n)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


# -- direct ------------------------------------------------------------------------------------------------
def run_direct(engine: Engine, bodies: list[dict]) -> tuple[float, list[float], int]:
    """All bodies added at once; returns (wall seconds, latency per body, generated tokens)."""
    info = model_info_of(engine)
    requests = [prepare_job(parse_job_create(body), info).request for body in bodies]
    started = time.perf_counter()
    results = engine.generate(requests)
    wall = time.perf_counter() - started
    tokens = sum(len(result.token_ids) for result in results)
    return wall, [result.finished_at - started for result in results], tokens


# -- stack -------------------------------------------------------------------------------------------------
class LocalStack:
    """redis-server + one CPU worker + the API on loopback ports, stopped on exit."""

    def __init__(self, model: str, concurrency: int, log_dir: Path) -> None:
        self.log_dir = log_dir
        redis_port, api_port, metrics_port = free_loopback_port(), free_loopback_port(), free_loopback_port()
        self.api_url = f"http://127.0.0.1:{api_port}"
        self.env = {**os.environ, "DGSERVE_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "DGSERVE_MODEL": model,
                    "DGSERVE_QUEUE_NAME": "dgemma.bench", "DGSERVE_MAX_QUEUED_JOBS": "100000",
                    # Below redis-py's 5 s default socket timeout, so the API's blocking XREAD of a queued
                    # job's events returns before the socket times out.
                    "DGSERVE_SSE_KEEPALIVE_SECONDS": "4", "DGSERVE_WORKER_METRICS_HOST": "127.0.0.1",
                    "DGSERVE_CACHE_DIR": str(log_dir / "cache"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        self.processes: list[subprocess.Popen] = []
        self._start("redis", [find_redis_server(), "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no"])
        self._start("worker", [sys.executable, "-m", "worker", "--cpu", "--model", model, "--concurrency",
                               str(concurrency), "--metrics-port", str(metrics_port), "--loglevel", "WARNING"])
        self._start("api", api_command(api_port))

    def _start(self, name: str, args: list[str]) -> None:
        with open(self.log_dir / f"{name}.log", "ab") as log:
            self.processes.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                                   cwd=REPO_ROOT, start_new_session=True))

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(f"{process.args[0]} exited; logs in {self.log_dir}")
            try:
                if httpx.get(f"{self.api_url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"stack not ready after {timeout}s; logs in {self.log_dir}")

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


@dataclass(frozen=True)
class JobTrace:
    """One job through the stack, all on the wall clock (client, API and worker share the machine's clock)."""

    submitted: float      # client: before POST
    accepted: float       # client: 202 received
    done: float           # client: `done` event received
    tokens: int
    created_at: float     # API: job record created
    started_at: float     # worker: try_start
    finished_at: float    # worker: result committed

    @property
    def latency(self) -> float:
        return self.done - self.submitted


async def submit_and_wait(client: httpx.AsyncClient, body: dict) -> JobTrace:
    """POST one job and follow its SSE stream to `done`.

    A dropped stream is resumed with Last-Event-ID, as any SSE client does.
    """
    submitted = time.time()
    response = await client.post("/v1/jobs", json=body)
    response.raise_for_status()
    accepted = time.time()
    job_id = response.json()["id"]
    last_event_id = None
    for _attempt in range(100):
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        event_type = ""
        try:
            async with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as stream:
                async for line in stream.aiter_lines():
                    if line.startswith("id:"):
                        last_event_id = line.split(":", 1)[1].strip()
                    elif line.startswith("event:"):
                        event_type = line.split(":", 1)[1].strip()
                    elif line.startswith("data:") and event_type in TERMINAL_EVENTS:
                        done = time.time()
                        if event_type != "done":
                            raise RuntimeError(f"job {job_id} ended {event_type}: {line}")
                        result = json.loads(line.split(":", 1)[1])["result"]
                        timings = (await client.get(f"/v1/jobs/{job_id}")).json()["timings"]
                        return JobTrace(submitted, accepted, done, int(result["usage"]["generated_tokens"]),
                                        timings["created_at"], timings["started_at"], timings["finished_at"])
        except httpx.RemoteProtocolError:
            continue
    raise RuntimeError(f"event stream of {job_id} ended without a terminal event")


async def run_stack_async(api_url: str, bodies: list[dict]) -> tuple[float, list[JobTrace]]:
    """All bodies submitted at once; returns (wall seconds, one trace per body)."""
    limits = httpx.Limits(max_connections=len(bodies) + 4, max_keepalive_connections=len(bodies) + 4)
    async with httpx.AsyncClient(base_url=api_url, timeout=600, limits=limits) as client:
        started = time.perf_counter()
        traces = await asyncio.gather(*(submit_and_wait(client, body) for body in bodies))
        wall = time.perf_counter() - started
    return wall, list(traces)


def run_stack(api_url: str, bodies: list[dict]) -> tuple[float, list[JobTrace]]:
    return asyncio.run(run_stack_async(api_url, bodies))


# -- main --------------------------------------------------------------------------------------------------
def saturated_rounds(engine: Engine, api_url: str, bodies: list[dict], rounds: int) -> dict:
    """Direct and stack runs of the same bodies, alternated so that load drift on a shared machine hits both."""
    ratios, direct_rates, stack_rates, token_counts = [], [], [], []
    for _ in range(rounds):
        direct_wall, _, direct_tokens = run_direct(engine, bodies)
        stack_wall, traces = run_stack(api_url, bodies)
        stack_tokens = sum(trace.tokens for trace in traces)
        # Equal in principle (seeded jobs); the engine's batch-size-dependent rounding can flip a sampler
        # decision on random weights, so the counts are reported rather than required to match.
        token_counts.append({"direct": direct_tokens, "stack": stack_tokens})
        direct_rates.append(direct_tokens / direct_wall)
        stack_rates.append(stack_tokens / stack_wall)
        ratios.append(stack_rates[-1] / direct_rates[-1])
    return {"jobs": len(bodies), "rounds": rounds, "tokens_per_round": token_counts,
            "direct_tokens_per_s": direct_rates, "stack_tokens_per_s": stack_rates, "throughput_ratio": ratios,
            "throughput_ratio_median": statistics.median(ratios)}


def single_jobs(engine: Engine, api_url: str, bodies: list[dict]) -> dict:
    """One job at a time, direct then through the stack: the latency the service adds with nothing queued.

    The paired difference (stack − direct of the same job, back to back) carries the machine's noise in the
    engine time; the breakdown uses the job record's timestamps instead: HTTP submit, dispatch (record
    created → worker's try_start: Celery + Redis), worker (try_start → result committed: engine + job
    store), notify (result committed → client has the `done` event: Redis stream + SSE).
    """
    added, direct_latency, stack_latency, parts = [], [], [], {"submit": [], "dispatch": [], "worker": [],
                                                                "notify": [], "outside_worker": []}
    for body in bodies:
        _, (direct,), _ = run_direct(engine, [body])
        _, (trace,) = run_stack(api_url, [body])
        direct_latency.append(direct)
        stack_latency.append(trace.latency)
        added.append(trace.latency - direct)
        parts["submit"].append(trace.accepted - trace.submitted)
        parts["dispatch"].append(trace.started_at - trace.created_at)
        parts["worker"].append(trace.finished_at - trace.started_at)
        parts["notify"].append(trace.done - trace.finished_at)
        parts["outside_worker"].append(trace.latency - (trace.finished_at - trace.started_at))
    report = {"jobs": len(bodies), "direct_latency_p50_ms": 1000 * percentile(direct_latency, 50),
              "stack_latency_p50_ms": 1000 * percentile(stack_latency, 50),
              "added_latency_p50_ms": 1000 * percentile(added, 50),
              "added_latency_p99_ms": 1000 * percentile(added, 99)}
    for name, values in parts.items():
        report[f"{name}_p50_ms"] = 1000 * percentile(values, 50)
        report[f"{name}_p99_ms"] = 1000 * percentile(values, 99)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder (default: a random tiny checkpoint)")
    parser.add_argument("--n", type=int, default=64, help="jobs in the saturated phase")
    parser.add_argument("--rounds", type=int, default=3, help="alternated direct/stack rounds of the saturated phase")
    parser.add_argument("--single", type=int, default=20, help="jobs run one at a time in the latency phase")
    parser.add_argument("--concurrency", type=int, default=16, help="canvases in flight (worker threads)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--single-steps", type=int, default=4, help=(
        "step cap per canvas in the latency phase: short jobs keep the machine's noise in the engine time "
        "small next to the fixed cost per job that the service adds"))
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "service_bench.json")
    args = parser.parse_args()

    work_dir = Path(tempfile.mkdtemp(prefix="dgserve-service-bench-"))
    model = args.model
    if model is None:
        from engine.checkpoint import write_random_checkpoint

        model = str(write_random_checkpoint(work_dir / "model", preset="tiny", seed=0))
    stack = LocalStack(model, args.concurrency, work_dir)
    try:
        engine = Engine.from_pretrained(model, max_canvases_in_flight=args.concurrency)
        stack.wait_ready()
        warm = job_bodies(args.concurrency, args.max_new_tokens, offset=100_000)
        run_direct(engine, warm)
        run_stack(stack.api_url, warm)
        saturated = saturated_rounds(engine, stack.api_url, job_bodies(args.n, args.max_new_tokens), args.rounds)
        single = single_jobs(engine, stack.api_url, job_bodies(args.single, args.max_new_tokens, offset=args.n,
                                                               max_denoising_steps=args.single_steps))
    finally:
        stack.stop()

    report = {"model": model, "concurrency": args.concurrency, "max_new_tokens": args.max_new_tokens,
              "single_max_denoising_steps": args.single_steps,
              "cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "load_average_after": os.getloadavg(), "saturated": saturated, "single": single, "logs": str(work_dir)}
    print(f"saturated ({args.n} jobs x {args.rounds} rounds): direct tok/s "
          f"{', '.join(f'{r:.1f}' for r in saturated['direct_tokens_per_s'])}; stack tok/s "
          f"{', '.join(f'{r:.1f}' for r in saturated['stack_tokens_per_s'])}; ratio median "
          f"{saturated['throughput_ratio_median']:.3f} ({', '.join(f'{r:.3f}' for r in saturated['throughput_ratio'])})")
    print(f"single ({args.single} jobs): direct p50 {single['direct_latency_p50_ms']:.1f} ms, stack p50 "
          f"{single['stack_latency_p50_ms']:.1f} ms, added p50 {single['added_latency_p50_ms']:.1f} ms / p99 "
          f"{single['added_latency_p99_ms']:.1f} ms")
    print("  breakdown p50/p99 ms: " + ", ".join(
        f"{name} {single[f'{name}_p50_ms']:.1f}/{single[f'{name}_p99_ms']:.1f}"
        for name in ("submit", "dispatch", "worker", "notify", "outside_worker")))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
