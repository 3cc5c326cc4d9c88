"""Batch API benchmark: N lines through the Batch API vs the same requests submitted one by one as jobs, and
the latency of interactive requests submitted while the batch runs.

    OMP_NUM_THREADS=1 .venv/bin/python bench/batch_bench.py --lines 1000 --max-tokens 32 --steps 8 --concurrency 16

One stack (loopback redis-server, one `python -m worker --cpu`, the API under uvicorn; `LocalStack` of
bench/service_bench.py) on the embedded model, phases in one run:
1. idle: `--probes` interactive completions, one at a time, on the idle stack (reference latency);
2. jobs: the N requests as N `POST /v1/jobs` (32 in flight from the client), waited for by polling;
   lines/s and generated tokens/s from first submit to last result;
3. batch: the same N requests (same seeds, so the same tokens) as one JSONL file through `POST /v1/files` +
   `POST /v1/batches`, polled until `completed`; lines/s and tokens/s from upload to completion (output file
   included); meanwhile an interactive completion is sent every `--probe-every` seconds and its latency
   recorded with its queue wait (job record: created → started): with interactive-over-batch queues it waits
   only for a free worker slot, not for the batch; its run time is that of a job batched with 15 others.
Prints a table and writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))
from service_bench import LocalStack, percentile  # noqa: E402

DEFAULT_MODEL = REPO_ROOT / "models" / "dgtiny"


def line_bodies(count: int, max_tokens: int, steps: int | None) -> list[dict]:
    knobs = {} if steps is None else {"max_denoising_steps": steps}
    return [{"prompt": f"def function_{i}(", "max_tokens": max_tokens, "seed": 50_000 + i, **knobs}
            for i in range(count)]


async def run_jobs(api_url: str, bodies: list[dict], in_flight: int = 32) -> tuple[float, int]:
    """Each body as its own job; returns (wall seconds, generated tokens)."""
    limit = asyncio.Semaphore(in_flight)
    async with httpx.AsyncClient(base_url=api_url, timeout=600) as client:
        async def one(body: dict) -> int:
            async with limit:
                job = {**body, "max_new_tokens": body["max_tokens"]}
                del job["max_tokens"]
                response = await client.post("/v1/jobs", json=job)
                response.raise_for_status()
                job_id = response.json()["id"]
                while True:
                    view = (await client.get(f"/v1/jobs/{job_id}")).json()
                    if view["status"] == "succeeded":
                        return int(view["result"]["usage"]["generated_tokens"])
                    if view["status"] in ("failed", "cancelled", "expired"):
                        raise RuntimeError(f"job {job_id} ended {view['status']}: {view.get('error')}")
                    await asyncio.sleep(0.5)  # the batch is polled as often: same client load on the API

        started = time.perf_counter()
        tokens = await asyncio.gather(*(one(body) for body in bodies))
        return time.perf_counter() - started, sum(tokens)


def run_batch(api_url: str, bodies: list[dict]) -> tuple[float, int, dict]:
    """The bodies as one batch; returns (wall seconds, generated tokens, final batch object)."""
    lines = [json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/completions", "body": body})
             for i, body in enumerate(bodies)]
    with httpx.Client(base_url=api_url, timeout=600) as client:
        started = time.perf_counter()
        upload = client.post("/v1/files", data={"purpose": "batch"},
                             files={"file": ("lines.jsonl", io.BytesIO("\n".join(lines).encode()))})
        upload.raise_for_status()
        batch = client.post("/v1/batches", json={"input_file_id": upload.json()["id"],
                                                 "endpoint": "/v1/completions", "completion_window": "24h"}).json()
        while batch.get("status") not in ("completed", "failed", "cancelled", "expired"):
            time.sleep(0.5)
            batch = client.get(f"/v1/batches/{batch['id']}").json()
        output = client.get(f"/v1/files/{batch['output_file_id']}/content").text
        wall = time.perf_counter() - started
    tokens = sum(json.loads(line)["response"]["body"]["usage"]["completion_tokens"]
                 for line in output.splitlines() if line)
    return wall, tokens, batch


def probe(api_url: str, index: int, knobs: dict) -> tuple[float, float]:
    """One interactive completion: (latency from POST to the answer, its job's queue wait: created → started,
    from the job record)."""
    started = time.perf_counter()
    response = httpx.post(f"{api_url}/v1/completions", timeout=600,
                          json={"prompt": f"probe {index}", "max_tokens": 32, "seed": index, **knobs})
    response.raise_for_status()
    latency = time.perf_counter() - started
    job_id = response.json()["id"].removeprefix("cmpl-")
    timings = httpx.get(f"{api_url}/v1/jobs/{job_id}", timeout=60).json()["timings"]
    return latency, float(timings["queue_seconds"])


def probes_during(api_url: str, every: float, stop: threading.Event, knobs: dict,
                  samples: list[tuple[float, float]]) -> None:
    index = 0
    while not stop.is_set():
        samples.append(probe(api_url, 90_000 + index, knobs))
        index += 1
        stop.wait(every)


def summarise(args: argparse.Namespace, results: dict) -> str:
    jobs, batch = results["jobs"], results["batch"]
    rows = [
        ("jobs one by one", f"{jobs['lines_per_s']:.1f}", f"{jobs['tokens_per_s']:.0f}", f"{jobs['wall_s']:.1f}"),
        ("Batch API", f"{batch['lines_per_s']:.1f}", f"{batch['tokens_per_s']:.0f}", f"{batch['wall_s']:.1f}"),
    ]
    text = ["| path | lines/s | tokens/s | wall s |", "|---|---|---|---|"]
    text += [f"| {' | '.join(row)} |" for row in rows]
    text.append(f"\nbatch / jobs throughput: {batch['lines_per_s'] / jobs['lines_per_s']:.2f}x")
    for name, key in (("latency", "latency_s"), ("queue wait", "queue_wait_s")):
        idle, during = results["idle_probe"][key], results["probe_during_batch"][key]
        text.append(f"interactive {name} p50: idle {idle['p50']:.2f} s, during the batch {during['p50']:.2f} s "
                    f"(p90 {during['p90']:.2f} s, {during['count']} probes)")
    text.append(f"the batch alone took {batch['wall_s']:.1f} s")
    return "\n".join(text)


def _stats(values: list[float]) -> dict:
    values = values or [float("nan")]
    return {"p50": statistics.median(values), "p90": percentile(values, 90), "count": len(values)}


def _probe_stats(samples: list[tuple[float, float]]) -> dict:
    return {"latency_s": _stats([s[0] for s in samples]), "queue_wait_s": _stats([s[1] for s in samples])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--lines", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None, help="max_denoising_steps per canvas (model default)")
    parser.add_argument("--concurrency", type=int, default=16, help="worker slots (canvases in flight)")
    parser.add_argument("--probes", type=int, default=5, help="interactive requests on the idle stack")
    parser.add_argument("--probe-every", type=float, default=1.0)
    parser.add_argument("--out", default="batch_bench.json")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # `finally` stops the stack on SIGTERM too
    bodies = line_bodies(args.lines, args.max_tokens, args.steps)
    log_dir = Path(tempfile.mkdtemp(prefix="batch-bench-"))
    stack = LocalStack(args.model, args.concurrency, log_dir)
    try:
        stack.wait_ready()
        knobs = {} if args.steps is None else {"max_denoising_steps": args.steps}  # probes as heavy as a line
        probe(stack.api_url, 0, knobs)  # warm-up: tokenizer, first forward
        idle = [probe(stack.api_url, 1 + i, knobs) for i in range(args.probes)]
        jobs_wall, jobs_tokens = asyncio.run(run_jobs(stack.api_url, bodies))
        stop, during = threading.Event(), []
        prober = threading.Thread(target=probes_during,
                                  args=(stack.api_url, args.probe_every, stop, knobs, during))
        prober.start()
        batch_wall, batch_tokens, batch = run_batch(stack.api_url, bodies)
        stop.set()
        prober.join()
    finally:
        stack.stop()
    results = {
        "lines": args.lines, "max_tokens": args.max_tokens, "steps": args.steps, "concurrency": args.concurrency, "model": args.model,
        "jobs": {"wall_s": jobs_wall, "tokens": jobs_tokens, "lines_per_s": args.lines / jobs_wall,
                 "tokens_per_s": jobs_tokens / jobs_wall},
        "batch": {"wall_s": batch_wall, "tokens": batch_tokens, "lines_per_s": args.lines / batch_wall,
                  "tokens_per_s": batch_tokens / batch_wall, "request_counts": batch["request_counts"]},
        "idle_probe": _probe_stats(idle), "probe_during_batch": _probe_stats(during),
    }
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(summarise(args, results))


if __name__ == "__main__":
    main()
