"""`python -m worker [--gpu N | --cpu] [--engine model|simulated] [--model M] [--concurrency K] [--metrics-port P] [--loglevel L]`

One worker process per GPU. CUDA is not fork-safe and a process sees the cards it was started with, so the
card is chosen here, in CUDA_VISIBLE_DEVICES, before anything imports torch; then this process *becomes*
the Celery worker (`exec`), with the threads pool (the tasks only wait; the engine loop is one thread).
Options are passed on as `DGSERVE_*` environment variables, which `WorkerSettings` reads.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m worker", description="Run one dgserve GPU (or CPU) worker.")
    device = parser.add_mutually_exclusive_group()
    device.add_argument("--gpu", type=int, metavar="N", help="physical GPU index this worker owns")
    device.add_argument("--cpu", action="store_true", help="run the engine on the CPU (development, tests)")
    parser.add_argument("--engine", choices=("model", "simulated"), help=(
        "simulated: no model, steps sleep a batch-time model (control-plane load tests; default: "
        "DGSERVE_WORKER_ENGINE or model)"))
    parser.add_argument("--model", help="checkpoint folder or Hugging Face repo id (default: DGSERVE_MODEL)")
    parser.add_argument("--concurrency", type=int, metavar="K",
                        help="jobs held at once = canvases in flight (default: DGSERVE_WORKER_CONCURRENCY)")
    parser.add_argument("--metrics-port", type=int, metavar="P",
                        help="Prometheus port (default: DGSERVE_WORKER_METRICS_PORT)")
    parser.add_argument("--loglevel", default="INFO", help="Celery log level")
    parser.add_argument("--hostname", help="Celery node name (default: dgserve-<device>-<pid>@<host>)")
    args = parser.parse_args(argv)
    if args.gpu is not None and args.gpu < 0:
        parser.error(f"--gpu must be a card index >= 0, got {args.gpu}")
    if args.concurrency is not None and args.concurrency < 1:
        parser.error(f"--concurrency must be >= 1, got {args.concurrency}")
    return args


def worker_environment(args: argparse.Namespace, base: dict[str, str]) -> dict[str, str]:
    """The environment the Celery worker runs with: the card pinned, CLI options as DGSERVE_* variables."""
    env = dict(base)
    if args.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(args.gpu)
        env["DGSERVE_WORKER_DEVICE"] = "cuda"
    elif args.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # hide every card so nothing allocates a CUDA context by accident
        env["DGSERVE_WORKER_DEVICE"] = "cpu"
    if args.model:
        env["DGSERVE_MODEL"] = args.model
    if args.engine:
        env["DGSERVE_WORKER_ENGINE"] = args.engine
    if args.concurrency is not None:
        env["DGSERVE_WORKER_CONCURRENCY"] = str(args.concurrency)
    if args.metrics_port is not None:
        env["DGSERVE_WORKER_METRICS_PORT"] = str(args.metrics_port)
    return env


def celery_argv(args: argparse.Namespace, concurrency: int, queue: str) -> list[str]:
    from services.job_messages import batch_queue_name  # consumed after `queue` (worker/celery_app.py)

    device = f"gpu{args.gpu}" if args.gpu is not None else "cpu"
    hostname = args.hostname or f"dgserve-{device}-{os.getpid()}@{socket.gethostname()}"
    return [sys.executable, "-m", "celery", "-A", "worker.tasks", "worker", "--pool", "threads",
            "--concurrency", str(concurrency), "--queues", f"{queue},{batch_queue_name(queue)}",
            "--hostname", hostname,
            # Event heartbeats stay on (one small message every 2 s): Flower and `celery events` show a worker
            # as online only while they arrive. Task events are on in worker.celery_app.
            "--loglevel", args.loglevel, "--without-gossip", "--without-mingle"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = worker_environment(args, dict(os.environ))
    os.environ.clear()
    os.environ.update(env)
    # Imported only now: settings validation must see the variables set above (and it imports no torch).
    from worker.settings import WorkerSettings

    settings = WorkerSettings()
    os.execve(sys.executable, celery_argv(args, settings.worker_concurrency, settings.queue_name), env)


if __name__ == "__main__":
    main()
