"""This worker's record in the job store's worker registry, which the API's /readyz reads.

Record format (the `info` of `JobStore.heartbeat(worker_id, info)`; the registry scores it with the time it
was written), the contract with `services.jobs.JobStore.live_workers`:

    {"queue", "model", "gpu", "pid", "engine": "model" or "simulated" (worker.simulated_engine), "limits": the engine's request limits (what the API checks submissions
     against, `dgtext.request_rules.ModelLimits`), "load": the worker's live load (`WorkerMetrics.load_snapshot`,
     shown by /readyz as `worker_load`), "beat_interval_s": how often this worker writes the record,
     "redis_run_id": the Redis server's `run_id` (INFO server) when the record was written: the store adds it}

A record counts as a worker alive now only if it was written by the Redis server running now (its `run_id`
changes at every restart, so neither a record written before a restart nor a dead worker's record restored
from the append-only file counts) and less than `LIVENESS_BEATS` intervals ago (so a worker killed a moment
ago stops counting after a few seconds, not after a lease length). The lease keeper writes it every interval,
and stops writing it when the engine loop hangs; a worker that shuts down cleanly removes it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from worker.protocols import JobStoreLike

LIVENESS_BEATS = 3  # mirrored in services.jobs.LIVENESS_BEATS (services never import the worker)


class Heartbeat:
    """Writes (`beat`) and removes (`remove`) one worker's registry record."""

    def __init__(self, store: JobStoreLike, worker_id: str, info: dict[str, Any], interval_s: float,
                 live_info: Callable[[], dict[str, Any]] | None = None) -> None:
        """`info` is fixed for the worker's life; `live_info()`, if given, is read at every beat and merged in."""
        if interval_s <= 0:
            raise ValueError(f"heartbeat interval must be > 0 seconds, got {interval_s}")
        self.store, self.worker_id, self.live_info = store, worker_id, live_info
        self.info = {**info, "beat_interval_s": interval_s}

    def beat(self) -> None:
        """Write the record now (raises the store's errors; the lease keeper handles outages)."""
        live = self.live_info() if self.live_info is not None else {}
        self.store.heartbeat(self.worker_id, {**self.info, **live})

    def remove(self) -> None:
        """Drop the record (clean shutdown): /readyz stops counting this worker at once."""
        self.store.forget_worker(self.worker_id)
