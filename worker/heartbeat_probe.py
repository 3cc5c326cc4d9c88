"""`python -m worker.heartbeat_probe [--max-age S]`: the worker's liveness probe (Kubernetes livenessProbe,
docker-compose healthcheck). Exit 0 when the engine loop touched its heartbeat file within `--max-age`
seconds, 1 otherwise (missing file included), with the reason on stderr.

The engine loop touches the file every iteration, idle or busy, so a stale file means a hung or dead loop
(a step that never returns) even while Celery itself still answers. The file is
`DGSERVE_WORKER_HEARTBEAT_FILE` (see `worker.settings.WorkerSettings.heartbeat_path`). Imports no torch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def heartbeat_age_seconds(path: str) -> float | None:
    """Seconds since the file was touched, or None when it does not exist."""
    try:
        return time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.heartbeat_probe")
    parser.add_argument("--max-age", type=float, default=120.0, help="seconds (default 120)")
    parser.add_argument("--file", help="heartbeat file (default: the worker settings' heartbeat path)")
    args = parser.parse_args(argv)
    if args.file is None:
        from worker.settings import WorkerSettings

        args.file = str(WorkerSettings().heartbeat_path)
    age = heartbeat_age_seconds(args.file)
    if age is None:
        print(f"unhealthy: no heartbeat file {args.file}", file=sys.stderr)
        return 1
    if age > args.max_age:
        print(f"unhealthy: heartbeat {age:.0f} s old (> {args.max_age:g} s): engine loop hung", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
