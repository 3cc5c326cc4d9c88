"""Cost of acknowledging only replicated jobs: submit latency and jobs/s of the API behind Redis Sentinel with
the replica WAIT on (`DGSERVE_REDIS_MIN_REPLICAS_ACK=1`, the default with sentinels) and off, beside one plain
Redis (the default deployment).

    OMP_NUM_THREADS=1 .venv/bin/python bench/replication_bench.py --jobs 300 --threads 8 --rounds 2

Each round starts, per mode, fresh loopback redis-servers (no persistence, so only replication is compared)
and the API under uvicorn (real HTTP), then (1) POSTs `--jobs` generate jobs one after another (latency of each
202) and (2) the same number from `--threads` threads at once (jobs/s). No worker runs: only the submit path is
measured (job record + Celery message, + fence and WAIT when on). It also times the WAIT alone from a client
(`JobStore.confirm_replicated`: what a worker adds to each job's terminal write). Modes alternate within a
round, so load drift on a shared machine hits all alike. Prints a table with ratios and writes JSON (`--out`).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.durability_bench import alternating_rounds, submit_bench_arguments, time_submits  # noqa: E402
from services.jobs import JobStore  # noqa: E402
from services.launcher import free_loopback_port  # noqa: E402
from services.settings import BUNDLED_MODEL_DIR, Settings  # noqa: E402
from tests.support.processes import api_command, start_process, stop_process, wait_for_http  # noqa: E402
from tests.support.sentinel_cluster import run_sentinel_cluster  # noqa: E402

MODES = ("single", "sentinel_nowait", "sentinel_wait")


@contextlib.contextmanager
def redis_settings(mode: str, folder: Path) -> Iterator[dict[str, str]]:
    """The `DGSERVE_*` Redis settings of `mode`, with its redis-servers running."""
    if mode == "single":
        with run_sentinel_cluster(folder, replicas=0, sentinels=0) as cluster:
            yield {"DGSERVE_REDIS_URL": f"redis://127.0.0.1:{cluster.master.port}/0"}
        return
    with run_sentinel_cluster(folder, replicas=2, sentinels=3) as cluster:
        yield {"DGSERVE_REDIS_URL": "redis://127.0.0.1/0", "DGSERVE_REDIS_SENTINELS": cluster.sentinel_addresses,
               "DGSERVE_REDIS_MASTER_NAME": cluster.master_name,
               "DGSERVE_REDIS_MIN_REPLICAS_ACK": "1" if mode == "sentinel_wait" else "0"}


def wait_alone_ms(redis_env: dict[str, str], samples: int = 300) -> float:
    """Median of `confirm_replicated` (fence + WAIT, one round trip) from a client; 0 when off."""
    settings = Settings(**{key[len("DGSERVE_"):].lower(): value for key, value in redis_env.items()})
    store = JobStore.from_settings(settings)
    timings = []
    for _ in range(samples):
        started = time.perf_counter()
        store.confirm_replicated()
        timings.append(time.perf_counter() - started)
    store.redis.close()
    return 1000 * statistics.median(timings)


def measure(mode: str, jobs: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as folder, redis_settings(mode, Path(folder)) as redis_env:
        api_port = free_loopback_port()
        env = {**os.environ, **redis_env, "DGSERVE_MODEL": str(BUNDLED_MODEL_DIR), "DGSERVE_MAX_QUEUED_JOBS": "100000"}
        api = start_process(api_command(api_port), env=env, cwd=REPO_ROOT)
        try:
            wait_for_http(f"http://127.0.0.1:{api_port}/healthz", timeout=60, process=api)
            return {**time_submits(f"http://127.0.0.1:{api_port}", jobs, threads),
                    "confirm_alone_ms": wait_alone_ms(redis_env)}
        finally:
            stop_process(api)


def main() -> None:
    args = submit_bench_arguments(__doc__.splitlines()[0], Path("/tmp/replication_bench.json"))
    runs, summary = alternating_rounds(MODES, args, measure)
    print(f"load average: {os.getloadavg()}")
    print(f"{'metric':<24}" + "".join(f"{mode:>18}" for mode in MODES) + f"{'wait/nowait':>14}{'wait/single':>14}")
    for key in summary["single"]:
        values = [summary[mode][key] for mode in MODES]
        nowait, wait = summary["sentinel_nowait"][key], summary["sentinel_wait"][key]
        ratios = [wait / base if base > 0.01 else float("nan") for base in (nowait, summary["single"][key])]
        print(f"{key:<24}" + "".join(f"{value:>18.2f}" for value in values) + "".join(f"{r:>14.2f}" for r in ratios))
    args.out.write_text(json.dumps({"runs": runs, "median": summary, "args": vars(args)}, indent=1, default=str))


if __name__ == "__main__":
    main()
