"""Control-plane load simulation: how many jobs/s one Redis and one API process carry, and what saturates first.

    .venv/bin/python bench/load_sim.py                                  # 50, 100, 200, 400 jobs/s for 30 s each
    .venv/bin/python bench/load_sim.py --rates 50,100 --seconds 10 --json

Real parts on loopback (bench/load_sim_stack.py): a redis-server (AOF, `appendfsync always` as deployed), `--apis`
uvicorn processes of the real app, `--workers` real Celery workers (`python -m worker --engine simulated`) whose
engine sleeps the batch-time model of docs/benchmarks.md instead of computing (worker/simulated_engine.py), so
no GPU is needed to load the queue. For each rate an async httpx generator POSTs generate jobs open-loop (job
i is sent at i / rate seconds, whatever the answers; round-robin over the APIs) for `--seconds`, then waits
until the workers have finished every accepted job. Reported per rate:
- accepted jobs/s, submit latency p50/p99 (POST -> 202), send lag (how late POSTs left against the schedule:
  the generator's own delay plus waiting for one of `--max-in-flight` slots, i.e. backpressure);
- queue wait p50/p99 (`started_at - created_at` from the job records);
- Redis commands and round trips (read events on client sockets) per job, from INFO deltas, also net of the
  idle rate measured before the first phase (heartbeats, lease renewals, Celery polling), top commands per job;
- CPU ms per job and cores busy of Redis, the API processes, the workers and the generator (/proc);
- errors by HTTP status or exception, and lost / duplicated jobs: every accepted job must end `succeeded`
  with exactly one `done` event in its stream (as the integration tests count commits). Both must be 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_sim_stack import QUEUE, Snapshot, Stack, StackShape, snapshot, start_stack, worker_jobs_done  # noqa: E402

IDLE_SECONDS = 5.0  # the background measurement before the first phase


@dataclass(frozen=True)
class Submission:
    status: str  # "202", another HTTP status, or an exception's class name
    latency_s: float  # POST sent -> answer
    lag_s: float  # how late the POST left compared with the open-loop schedule
    job_id: str | None


def body_of(args: argparse.Namespace) -> Callable[[int], dict]:
    """Job i's request: a short distinct prompt, one canvas, a fixed number of steps, its own seed."""
    return lambda index: {"prompt": f"def load_{index}(x):", "max_new_tokens": args.max_new_tokens,
                          "max_denoising_steps": args.steps, "seed": index, "stream_drafts": args.stream_drafts}


async def open_loop(urls: list[str], rate: float, seconds: float, body_of: Callable[[int], dict], offset: int,
                    max_in_flight: int, late_grace_s: float) -> tuple[list[Submission], int]:
    """POST `rate * seconds` jobs, job i at i / rate seconds after the start, without waiting for answers, at
    most `max_in_flight` at once (httpx's pool slows down badly when thousands of requests queue inside it: the
    generator would saturate first). Sending stops `late_grace_s` after the schedule's end; returns the
    submissions and how many jobs were not sent by then."""
    clients = [httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(
        max_connections=max_in_flight, max_keepalive_connections=max_in_flight)) for url in urls]
    loop, in_flight = asyncio.get_running_loop(), asyncio.Semaphore(max_in_flight)

    async def submit(client: httpx.AsyncClient, index: int, scheduled: float) -> Submission:
        sent = loop.time()
        try:
            response = await client.post("/v1/jobs", json=body_of(index))
        except httpx.HTTPError as err:
            return Submission(type(err).__name__, loop.time() - sent, sent - scheduled, None)
        finally:
            in_flight.release()
        job_id = response.json().get("id") if response.status_code == 202 else None
        return Submission(str(response.status_code), loop.time() - sent, sent - scheduled, job_id)

    try:
        start, total, tasks = loop.time(), int(rate * seconds), []
        for i in range(total):
            scheduled = start + i / rate
            if scheduled > loop.time():
                await asyncio.sleep(scheduled - loop.time())
            await in_flight.acquire()
            if loop.time() > start + seconds + late_grace_s:
                in_flight.release()
                return list(await asyncio.gather(*tasks)), total - i
            tasks.append(asyncio.create_task(submit(clients[i % len(clients)], offset + i, scheduled)))
        return list(await asyncio.gather(*tasks)), 0
    finally:
        await asyncio.gather(*(client.aclose() for client in clients))


def wait_for_workers(stack: Stack, expected_total: float, timeout_s: float) -> bool:
    """Until the workers' finished-job counters reach `expected_total` (read over HTTP: no Redis commands) and
    no job is left queued or running (two ZCARDs: a POST that timed out on the client may still have been
    accepted, and its job must not run into the next phase)."""
    deadline, client = time.monotonic() + timeout_s, stack.redis()
    while time.monotonic() < deadline:
        if worker_jobs_done(stack) >= expected_total and \
                client.zcard(f"dgserve:queued:{QUEUE}") + client.zcard(f"dgserve:running:{QUEUE}") == 0:
            return True
        time.sleep(0.25)
    return False


def verify(stack: Stack, job_ids: list[str]) -> dict:
    """Every accepted job's end from its record and event stream (after the phase's counters were read)."""
    client, statuses, done_counts, waits = stack.redis(), Counter(), Counter(), []
    for start in range(0, len(job_ids), 500):
        chunk = job_ids[start:start + 500]
        pipe = client.pipeline(transaction=False)
        for job_id in chunk:
            pipe.hmget(f"job:{job_id}", "status", "created_at", "started_at")
            pipe.xrange(f"job:{job_id}:events")
        replies = pipe.execute()
        for (status, created, started), events in zip(replies[0::2], replies[1::2], strict=True):
            statuses[status or "missing"] += 1
            done_counts[sum(1 for _, entry in events if entry.get("type") == "done")] += 1
            if created and started:
                waits.append(float(started) - float(created))
    not_done = sum(count for status, count in statuses.items() if status != "succeeded")
    return {"statuses": dict(statuses), "lost": not_done, "duplicated": sum(
        count for dones, count in done_counts.items() if dones > 1), "queue_waits": waits}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def per_job(before: Snapshot, after: Snapshot, idle: dict, jobs: int) -> dict:
    """Redis and CPU deltas of one phase, per accepted job (and net of the idle background rates)."""
    wall, n = after.at - before.at, max(jobs, 1)
    commands, reads = after.commands - before.commands, after.reads - before.reads
    top = Counter({name: calls - before.commandstats.get(name, 0) for name, calls in after.commandstats.items()})
    cpu = {name: after.cpu[name] - before.cpu[name] for name in after.cpu}
    return {
        "wall_s": wall, "redis_commands_per_job": commands / n, "redis_round_trips_per_job": reads / n,
        "redis_commands_per_job_net": (commands - idle["commands_per_s"] * wall) / n,
        "redis_round_trips_per_job_net": (reads - idle["reads_per_s"] * wall) / n,
        "top_commands_per_job": {name: round(calls / n, 2) for name, calls in top.most_common(20) if calls > 0},
        "cpu_ms_per_job": {name: 1000 * seconds / n for name, seconds in cpu.items()},
        "cores_busy": {name: seconds / wall for name, seconds in cpu.items()},
    }


def run_phase(stack: Stack, args: argparse.Namespace, rate: float, idle: dict, offset: int) -> dict:
    done_before = worker_jobs_done(stack)
    before = snapshot(stack)
    submissions, unsent = asyncio.run(open_loop(stack.api_urls, rate, args.seconds, body_of(args), offset,
                                                args.max_in_flight, args.late_grace_seconds))
    submitted_at = time.monotonic()
    accepted = [s for s in submissions if s.job_id is not None]
    drained = wait_for_workers(stack, done_before + len(accepted), args.drain_seconds)
    after = snapshot(stack)
    ends = verify(stack, [s.job_id for s in accepted if s.job_id is not None])
    latencies, waits = [s.latency_s for s in accepted], ends.pop("queue_waits")
    return {
        "offered_per_s": rate, "seconds": args.seconds, "sent": len(submissions), "unsent": unsent,
        "accepted": len(accepted),
        "accepted_per_s": len(accepted) / max(submitted_at - before.at, 1e-9), "drained": drained,
        "submit_ms": {"p50": 1000 * percentile(latencies, 0.5), "p99": 1000 * percentile(latencies, 0.99)},
        "send_lag_ms": {"p50": 1000 * percentile([s.lag_s for s in submissions], 0.5),
                             "p99": 1000 * percentile([s.lag_s for s in submissions], 0.99)},
        "queue_wait_ms": {"p50": 1000 * percentile(waits, 0.5), "p99": 1000 * percentile(waits, 0.99)},
        "errors": dict(Counter(s.status for s in submissions if s.job_id is None)),
        **ends, **per_job(before, after, idle, len(accepted)), "load_average": os.getloadavg(),
    }


def measure_idle(stack: Stack, seconds: float) -> dict:
    before = snapshot(stack)
    time.sleep(seconds)
    after = snapshot(stack)
    wall = after.at - before.at
    return {"seconds": wall, "commands_per_s": (after.commands - before.commands) / wall,
            "reads_per_s": (after.reads - before.reads) / wall,
            "cores_busy": {name: (after.cpu[name] - before.cpu[name]) / wall for name in after.cpu}}


def table_row(row: dict) -> str:
    order = ("api", "workers", "redis", "generator")
    errors = ", ".join(f"{status} x{count}" for status, count in row["errors"].items()) or "0"
    if row["unsent"]:
        errors += f"; {row['unsent']} unsent"
    cells = [
        f"{row['offered_per_s']:g}", f"{row['accepted_per_s']:.1f}",
        f"{row['submit_ms']['p50']:.0f} / {row['submit_ms']['p99']:.0f}", f"{row['send_lag_ms']['p99']:.0f}",
        f"{row['queue_wait_ms']['p50']:.0f} / {row['queue_wait_ms']['p99']:.0f}",
        f"{row['redis_commands_per_job']:.1f} ({row['redis_commands_per_job_net']:.1f})",
        f"{row['redis_round_trips_per_job']:.1f} ({row['redis_round_trips_per_job_net']:.1f})",
        " / ".join(f"{row['cpu_ms_per_job'][k]:.1f}" for k in order),
        " / ".join(f"{row['cores_busy'][k]:.2f}" for k in order),
        errors, str(row["lost"]), str(row["duplicated"]), " ".join(f"{x:.1f}" for x in row["load_average"])]
    return "| " + " | ".join(cells) + " |"


def print_table(report: dict) -> None:
    shape, idle = report["shape"], report["idle"]
    print(f"load_sim: {shape['apis']} API, {shape['workers']} simulated workers x {shape['concurrency']} rows, "
          f"{report['steps']} steps x {report['max_new_tokens']} tokens per job"
          f"{' with drafts' if report.get('stream_drafts') else ''}, step scale {shape['step_scale']}, "
          f"appendfsync {shape['appendfsync']}; idle: {idle['commands_per_s']:.0f} Redis cmds/s, cores "
          + ", ".join(f"{name} {busy:.2f}" for name, busy in idle["cores_busy"].items()))
    print("| offered/s | accepted/s | submit p50 / p99 ms | send lag p99 ms | queue wait p50 / p99 ms | Redis cmds/job "
          "(net of idle) | round trips/job (net) | CPU ms/job api / workers / redis / gen | cores busy api / workers "
          "/ redis / gen | errors | lost | dup | load avg |")
    print("|" + "---|" * 13)
    for row in report["phases"]:
        print(table_row(row))
    for row in report["phases"]:
        top = dict(list(row["top_commands_per_job"].items())[:10])
        print(f"top commands per job at {row['offered_per_s']:g}/s: {top}; job ends: {row['statuses']}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="50,100,200,400", help="jobs/s per phase, comma separated")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each phase's request loop")
    parser.add_argument("--apis", type=int, default=1)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=64, help="batch rows (Celery threads) per worker")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per canvas of each job")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="32 = one canvas of models/dgtiny")
    parser.add_argument("--stream-drafts", action="store_true", help="jobs ask for a draft event every step")
    parser.add_argument("--step-scale", type=float, default=1.0, help="multiplies the simulated step times")
    parser.add_argument("--appendfsync", choices=("always", "everysec", "off"), default="always")
    parser.add_argument("--max-in-flight", type=int, default=256, help="POSTs awaiting an answer at most")
    parser.add_argument("--late-grace-seconds", type=float, default=15.0, help=(
        "a phase stops sending this long after its schedule ends; jobs not sent by then are reported as unsent"))
    parser.add_argument("--drain-seconds", type=float, default=180.0, help="longest wait for a phase's jobs")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    parser.add_argument("--keep", type=Path, help="keep the processes' logs and Redis files in this folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    shape = StackShape(args.apis, args.workers, args.concurrency, args.step_scale, args.appendfsync)
    rates = [float(rate) for rate in args.rates.split(",")]
    with tempfile.TemporaryDirectory(prefix="load-sim-") as scratch:
        folder = args.keep or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        print(f"starting redis, {args.apis} API(s), {args.workers} simulated worker(s) in {folder}", file=sys.stderr)
        stack = start_stack(shape, folder)
        try:
            asyncio.run(open_loop(stack.api_urls, 10, 2, body_of(args), 10**9, args.max_in_flight, 60))
            wait_for_workers(stack, 20, args.drain_seconds)  # warm-up: connections, tokenizer, first steps
            idle = measure_idle(stack, IDLE_SECONDS)
            phases, offset = [], 0
            for rate in rates:
                print(f"phase {rate:g} jobs/s for {args.seconds:g} s", file=sys.stderr)
                phases.append(run_phase(stack, args, rate, idle, offset))
                offset += int(rate * args.seconds)
        finally:
            stack.stop()
    report = {"shape": vars(shape), "steps": args.steps, "max_new_tokens": args.max_new_tokens,
              "stream_drafts": args.stream_drafts,
              "seconds": args.seconds, "idle": idle, "phases": phases, "cpu_count": os.cpu_count()}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_table(report)
    return report


if __name__ == "__main__":
    main()
