"""Cost of a durable acknowledgement: submit latency and jobs/s with Redis `appendfsync always` (every write
fsynced before Redis replies, so a 202 survives a crash of the host) against `everysec` (the previous
default: up to one second of acknowledged jobs lost on a host crash or power loss).

    OMP_NUM_THREADS=1 .venv/bin/python bench/durability_bench.py --jobs 300 --threads 8 --rounds 2

Each round starts, per mode, a fresh loopback redis-server with AOF in a temporary folder and the API under
uvicorn (real HTTP), then (1) POSTs `--jobs` generate jobs one after another (latency of each 202) and (2) the
same number from `--threads` threads at once (jobs/s). No worker runs: jobs stay queued, so only the submit
path is measured (job record + Celery message + AOF). Modes alternate within a round, so load drift on a
shared machine hits both alike. Prints a table with ratios and writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from services.launcher import find_redis_server, free_loopback_port  # noqa: E402
from services.settings import BUNDLED_MODEL_DIR  # noqa: E402
from tests.support.processes import api_command, start_process, stop_process, wait_for_http, wait_until  # noqa: E402

MODES = ("everysec", "always")


def start_stack(mode: str, folder: Path) -> tuple[list[subprocess.Popen], str]:
    redis_port, api_port = free_loopback_port(), free_loopback_port()
    redis = start_process([find_redis_server(), "--port", str(redis_port), "--bind", "127.0.0.1", "--dir",
                           str(folder), "--appendonly", "yes", "--appendfsync", mode, "--save", ""])
    wait_until(lambda: subprocess.run([sys.executable, "-c", f"import redis; redis.Redis(port={redis_port}).ping()"],
                                      capture_output=True).returncode == 0, 30, interval=0.2, what="redis")
    env = {**os.environ, "DGSERVE_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
           "DGSERVE_MODEL": str(BUNDLED_MODEL_DIR), "DGSERVE_MAX_QUEUED_JOBS": "100000"}
    api = start_process(api_command(api_port), env=env, cwd=REPO_ROOT)
    base = f"http://127.0.0.1:{api_port}"
    wait_for_http(f"{base}/healthz", timeout=60, process=api)
    return [api, redis], base


def submit(client: httpx.Client, n: int) -> float:
    started = time.perf_counter()
    response = client.post("/v1/jobs", json={"prompt": f"def f{n}(x):", "max_new_tokens": 8})
    assert response.status_code == 202, response.text
    return time.perf_counter() - started


def time_submits(base_url: str, jobs: int, threads: int) -> dict:
    """Submit latency of `jobs` sequential POSTs (after 20 warm-up ones) and jobs/s of `jobs` more from `threads`
    threads, against the API at `base_url` (shared with bench/replication_bench.py)."""
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for n in range(20):  # warm-up: tokenizer, connections
            submit(client, -n)
        latencies = sorted(submit(client, n) for n in range(jobs))
        started = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda n: submit(client, n), range(jobs)))
        concurrent_s = time.perf_counter() - started
    return {"p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
            "sequential_jobs_per_s": len(latencies) / sum(latencies), "concurrent_jobs_per_s": jobs / concurrent_s}


def measure(mode: str, jobs: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        processes, base = start_stack(mode, Path(folder))
        try:
            return time_submits(base, jobs, threads)
        finally:
            for process in processes:
                stop_process(process)


def submit_bench_arguments(description: str, default_out: Path) -> argparse.Namespace:
    """The options shared by the submit benchmarks: jobs per run, submitting threads, rounds, JSON output."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=default_out)
    return parser.parse_args()


def alternating_rounds(modes: tuple[str, ...], args: argparse.Namespace,
                       measure_mode: Callable[[str, int, int], dict]) -> tuple[dict[str, list[dict]], dict]:
    """Each round measures every mode in turn (so load drift weighs on all of them alike); returns the runs by
    mode and, per mode, the median of each metric over the rounds."""
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    for _ in range(args.rounds):
        for mode in modes:
            runs[mode].append(measure_mode(mode, args.jobs, args.threads))
    summary = {mode: {key: statistics.median(run[key] for run in runs[mode]) for key in runs[mode][0]}
               for mode in modes}
    return runs, summary


def main() -> None:
    args = submit_bench_arguments(__doc__.splitlines()[0], Path("/tmp/durability_bench.json"))
    runs, summary = alternating_rounds(MODES, args, measure)
    print(f"{'metric':<24}{'everysec':>12}{'always':>12}{'always/everysec':>18}")
    for key in summary["always"]:
        a, e = summary["always"][key], summary["everysec"][key]
        print(f"{key:<24}{e:>12.2f}{a:>12.2f}{a / e:>18.2f}")
    args.out.write_text(json.dumps({"runs": runs, "median": summary, "args": vars(args)}, indent=1, default=str))


if __name__ == "__main__":
    main()
