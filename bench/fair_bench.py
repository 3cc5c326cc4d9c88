"""Cost of tenant fairness in the job store: the fair pick (`JobStore.start_next`, round-robin over API keys)
against starting the job a message names (`JobStore.try_start`), and job creation with per-key limits
(`DGSERVE_KEY_LIMITS`) against creation without them.

    .venv/bin/python bench/fair_bench.py --jobs 2000 --keys 10 --rounds 3

Each round, on a fresh loopback redis-server (no persistence: the scripts are measured, not the disk):
create `--jobs` generate jobs spread over `--keys` owners, without and then with per-key limits (high enough
never to refuse), then start them all, one call per job from one client, by `try_start(id)` in creation order
and, on a second copy of the same backlog, by `start_next` (the worker's path). The two modes of each operation run back to back
within a round, so load drift hits both alike; medians over rounds. Both creates include the new lane push
(the pre-fairness CREATE is not in the tree): the create ratio is the cost of the limits alone. Prints a table with ratios and `uptime`'s load average.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from services.jobs import JobStore  # noqa: E402
from services.schemas import GenerateJobCreate  # noqa: E402
from services.settings import Settings  # noqa: E402
from tests.support.redis_server import run_redis_server  # noqa: E402


def timed(calls: list[Callable[[], object]]) -> list[float]:
    """Seconds of each call, in order."""
    seconds = []
    for call in calls:
        began = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - began)
    return seconds


def one_round(url: str, jobs: int, keys: int) -> dict[str, list[float]]:
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushdb()
    limits = ";".join(f"sha256:{index:064x}=queued:{jobs},tpm:{jobs * 100}" for index in range(keys))
    plain = JobStore(client, Settings(redis_url=url, queue_name="bench.plain", max_queued_jobs=10 * jobs))
    limited = JobStore(client, Settings(redis_url=url, queue_name="bench.limited", max_queued_jobs=10 * jobs,
                                        key_limits=limits))
    owners = [f"{index % keys:064x}" for index in range(jobs)]
    requests = [GenerateJobCreate(prompt=f"def f{index}(x):", max_new_tokens=8) for index in range(jobs)]
    created: dict[str, list[str]] = {"plain": [], "limited": []}
    results = {
        "create, no key limits": timed([lambda r=r, o=o: created["plain"].append(plain.create(r, owner=o).job_id)
                                        for r, o in zip(requests, owners, strict=True)]),
        "create, with key limits": timed([lambda r=r, o=o: created["limited"].append(
            limited.create(r, owner=o, token_cost=20).job_id) for r, o in zip(requests, owners, strict=True)]),
    }
    results["start: try_start(id)"] = timed([lambda j=j: plain.try_start(j, "w") for j in created["plain"]])
    results["start: start_next (fair pick)"] = timed([lambda: limited.start_next("w") for _ in range(jobs)])
    assert limited.start_next("w") is None and client.zcard(limited.running_key) == jobs
    client.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--keys", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    medians: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as folder, run_redis_server(Path(folder)) as server:
        for _ in range(args.rounds):
            for name, seconds in one_round(server.url, args.jobs, args.keys).items():
                ordered = sorted(seconds)
                medians.setdefault(name, []).append((statistics.median(ordered),
                                                     ordered[int(0.99 * (len(ordered) - 1))]))
    print(f"{args.jobs} jobs over {args.keys} keys, {args.rounds} rounds; "
          f"load: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    print("| operation | p50 (µs) | p99 (µs) |\n|---|---|---|")
    p50 = {name: statistics.median(m[0] for m in values) for name, values in medians.items()}
    for name, values in medians.items():
        print(f"| {name} | {p50[name] * 1e6:.0f} | {statistics.median(m[1] for m in values) * 1e6:.0f} |")
    print(f"\ncreate with / without key limits (p50): {p50['create, with key limits'] / p50['create, no key limits']:.2f}")
    print(f"start_next / try_start (p50): "
          f"{p50['start: start_next (fair pick)'] / p50['start: try_start(id)']:.2f}")


if __name__ == "__main__":
    main()
