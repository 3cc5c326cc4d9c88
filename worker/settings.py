"""Worker-only knobs, layered on the service's one `Settings` (same `DGSERVE_` environment prefix).

They live here rather than in services/settings.py because only the worker process reads them (the API image
must stay small and never think about devices or engine sizing); everything shared (Redis URL, model,
queue name, deadline, attempts, metrics port) is inherited.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from services.settings import Settings, cache_dir


class WorkerSettings(Settings):
    """`DGSERVE_WORKER_CONCURRENCY=16`, `DGSERVE_WORKER_DEVICE=cpu`, ... (see each field)."""

    worker_concurrency: int = Field(default=16, ge=1, le=1024, description=(
        "Celery threads = jobs held at once = the engine's max canvases in flight"))
    worker_device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description=(
        "auto: CUDA if a card is visible, else CPU"))
    worker_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(default="auto", description=(
        "auto: bfloat16 on CUDA, float32 on CPU"))
    worker_max_context: int = Field(default=4096, ge=64, description="longest prompt + output one slot holds")
    worker_max_tokens_per_forward: int = Field(default=8192, ge=64)
    worker_kv_cache_bytes: int | None = Field(default=None, ge=1, description="None: the engine's default budget")
    worker_metrics_host: str = Field(default="0.0.0.0", description=(
        "interface of the /metrics endpoint: all by default so Prometheus in another container can scrape it"))
    worker_heartbeat_file: Path | None = Field(default=None, description=(
        "liveness file the engine loop touches every iteration (read by `python -m worker.heartbeat_probe`); "
        "default <cache dir>/worker-<queue>.heartbeat"))
    worker_heartbeat_interval_seconds: float = Field(default=2.0, gt=0, le=60, description=(
        "how often the worker writes its registry record (/readyz), renews its job leases and reaps orphans; "
        "keep it at most a third of job_lease_seconds"))
    worker_shutdown_grace_seconds: float = Field(default=120.0, ge=0, le=3600, description=(
        "after SIGTERM, in-flight jobs get this long to finish before being handed back to the queue"))
    worker_hung_loop_seconds: float = Field(default=300.0, gt=0, le=3600, description=(
        "an engine loop that completes no step for this long is hung: its job leases are left to lapse so "
        "live workers requeue the jobs. Keep it above the longest step (first-step torch.compile included)"))
    worker_cancel_poll_seconds: float = Field(default=0.25, gt=0, le=10, description=(
        "how often cancel flags of running jobs are read"))
    worker_engine: Literal["model", "simulated"] = Field(default="model", description=(
        "model: the real engine on the checkpoint's weights. simulated: worker.simulated_engine, which sleeps a "
        "batch-time model instead of computing and writes placeholder text (load tests of the control plane "
        "only, bench/load_sim.py); refused on a GPU unless worker_allow_simulated_engine is also set"))
    worker_allow_simulated_engine: bool = Field(default=False, description=(
        "let a worker on a GPU (a production card) run the simulated engine; CPU workers need no permission"))
    worker_simulated_step_ms: str = Field(default="1:9.16,4:12.49,16:35.58", description=(
        "the simulated engine's step time, 'batch:milliseconds,...' (interpolated, extended linearly past the "
        "largest batch); default: the tiny preset's measured CPU step, docs/benchmarks.md (issue 2 table)"))
    worker_simulated_step_scale: float = Field(default=1.0, gt=0, le=1000, description=(
        "multiplies every simulated step time (e.g. 0.1 for a card ten times faster than the table)"))
    broker_restore_interval_seconds: int = Field(default=10, ge=1, le=3600, description=(
        "how often the worker sweeps for messages whose visibility timeout passed"))

    @property
    def heartbeat_path(self) -> Path:
        """The liveness file of this worker's engine loop."""
        if self.worker_heartbeat_file is not None:
            return self.worker_heartbeat_file
        return cache_dir() / f"worker-{self.queue_name}.heartbeat"
