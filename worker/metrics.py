"""Prometheus collectors of one worker process and the HTTP endpoint that serves them.

Names follow docs/api.md ("Metrics"): `dgserve_*`, base units, `_total` for counters. Labels are `model`,
`gpu` (the card index, or "cpu" in CPU mode) and `kind` (generate|edit); never a job id, so the series count
stays bounded whatever the traffic.

Memory per card: on CUDA, `dgserve_gpu_memory_used_bytes` / `_total_bytes` come from `torch.cuda.mem_get_info`
(what the driver sees, other processes included) and the torch gauges from the caching allocator. In CPU mode
there is no card: the "gpu" gauges report this process's resident set size and the machine's RAM (labelled
gpu="cpu") because that is the memory the engine actually competes for, and the torch allocator gauges are
left unset (the CPU allocator keeps no such counters).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# vLLM-like latency buckets: from 10 ms to ~2 hours, so both tiny CPU jobs and long GPU jobs land in range.
JOB_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                       10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
FORWARD_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5,
                           0.75, 1.0, 2.5, 5.0)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
STEPS_PER_CANVAS_BUCKETS = (1, 2, 4, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 96, 128)


@dataclass(frozen=True)
class MetricLabels:
    """The constant labels of this worker: which model it serves and on which card."""

    model: str
    gpu: str


class WorkerMetrics:
    """All collectors of one worker, on a registry of their own (so tests can build several)."""

    def __init__(self, labels: MetricLabels, registry: CollectorRegistry | None = None) -> None:
        self.labels = labels
        self.registry = registry or CollectorRegistry()
        r = self.registry
        by_kind = ("model", "gpu", "kind")
        by_card = ("model", "gpu")
        self.generated_tokens = Counter("dgserve_generated_tokens", "Tokens committed to job outputs.",
                                        by_kind, registry=r)
        self.denoising_steps = Counter("dgserve_denoising_steps", "Denoising steps run for committed canvases.",
                                       by_kind, registry=r)
        self.canvases = Counter("dgserve_canvases", "Canvases committed.", by_kind, registry=r)
        self.jobs_finished = Counter("dgserve_worker_jobs", "Jobs this worker ended, by outcome.",
                                     (*by_kind, "outcome"), registry=r)
        self.steps_per_canvas = Histogram("dgserve_steps_per_canvas", "Denoising steps per committed canvas.",
                                          by_kind, buckets=STEPS_PER_CANVAS_BUCKETS, registry=r)
        self.batch_size = Histogram("dgserve_batch_size_canvases", "Canvases in one decoder forward.",
                                    by_card, buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.forward_seconds = Histogram("dgserve_forward_seconds", "Wall time of one engine step's forwards.",
                                         by_card, buckets=FORWARD_SECONDS_BUCKETS, registry=r)
        self.job_e2e_seconds = Histogram("dgserve_job_e2e_seconds", "From job creation to its result.",
                                         by_kind, buckets=JOB_SECONDS_BUCKETS, registry=r)
        self.job_queue_wait_seconds = Histogram("dgserve_job_queue_wait_seconds",
                                                "From job creation to its first engine step.",
                                                by_kind, buckets=JOB_SECONDS_BUCKETS, registry=r)
        self.job_run_seconds = Histogram("dgserve_job_run_seconds", "From the job's start to its result.",
                                         by_kind, buckets=JOB_SECONDS_BUCKETS, registry=r)
        self.canvases_in_flight = Gauge("dgserve_canvases_in_flight", "Requests being denoised now.",
                                        by_card, registry=r)
        self.canvases_waiting = Gauge("dgserve_canvases_waiting", "Requests admitted but not yet running.",
                                      by_card, registry=r)
        self.gpu_memory_used = Gauge("dgserve_gpu_memory_used_bytes", "Memory in use on the card "
                                     "(CPU mode: this process's resident set).", by_card, registry=r)
        self.gpu_memory_total = Gauge("dgserve_gpu_memory_total_bytes", "Memory of the card "
                                      "(CPU mode: the machine's RAM).", by_card, registry=r)
        self.torch_allocated = Gauge("dgserve_torch_memory_allocated_bytes",
                                     "Bytes held by live tensors (CUDA caching allocator).", by_card, registry=r)
        self.torch_reserved = Gauge("dgserve_torch_memory_reserved_bytes",
                                    "Bytes reserved by the CUDA caching allocator.", by_card, registry=r)

        # Children of the per-step series, resolved once: the engine loop updates them after every step.
        card = {"model": labels.model, "gpu": labels.gpu}
        self._batch_size_child = self.batch_size.labels(**card)
        self._forward_seconds_child = self.forward_seconds.labels(**card)
        self._in_flight_child = self.canvases_in_flight.labels(**card)
        self._waiting_child = self.canvases_waiting.labels(**card)
        # Plain copies of a few values for the heartbeat (`load_snapshot`): the API's /readyz shows them to
        # the playground, which cannot reach this port. prometheus_client keeps its values private.
        self._snapshot = {"generated_tokens": 0, "canvases_in_flight": 0, "canvases_waiting": 0,
                          "memory_used_bytes": 0, "memory_total_bytes": 0}

    def card(self) -> dict[str, str]:
        return {"model": self.labels.model, "gpu": self.labels.gpu}

    def of_kind(self, kind: str) -> dict[str, str]:
        return {**self.card(), "kind": kind}

    def observe_step(self, num_denoising_canvases: int, forward_seconds: float) -> None:
        """One engine step: its batch size (only forwards that denoised something) and its time."""
        if num_denoising_canvases > 0:
            self._batch_size_child.observe(num_denoising_canvases)
        self._forward_seconds_child.observe(forward_seconds)

    def observe_canvas(self, kind: str, num_tokens: int, num_steps: int) -> None:
        """A committed canvas: counted here (not at job end) so token rates are smooth in dashboards."""
        labels = self.of_kind(kind)
        self.generated_tokens.labels(**labels).inc(num_tokens)
        self._snapshot["generated_tokens"] += num_tokens
        self.denoising_steps.labels(**labels).inc(num_steps)
        self.canvases.labels(**labels).inc()
        self.steps_per_canvas.labels(**labels).observe(num_steps)

    def observe_job(self, kind: str, outcome: str, e2e_seconds: float | None, queue_wait_seconds: float | None,
                    run_seconds: float | None) -> None:
        """A job this worker ended; latencies are observed only when known (a job that never ran has none)."""
        labels = self.of_kind(kind)
        self.jobs_finished.labels(**labels, outcome=outcome).inc()
        for histogram, seconds in ((self.job_e2e_seconds, e2e_seconds),
                                   (self.job_queue_wait_seconds, queue_wait_seconds),
                                   (self.job_run_seconds, run_seconds)):
            if seconds is not None:
                histogram.labels(**labels).observe(max(seconds, 0.0))

    def set_load(self, num_running: int, num_waiting: int) -> None:
        self._in_flight_child.set(num_running)
        self._waiting_child.set(num_waiting)
        self._snapshot.update(canvases_in_flight=num_running, canvases_waiting=num_waiting)

    def set_memory(self, used_bytes: int, total_bytes: int, allocated_bytes: int | None = None,
                   reserved_bytes: int | None = None) -> None:
        self.gpu_memory_used.labels(**self.card()).set(used_bytes)
        self.gpu_memory_total.labels(**self.card()).set(total_bytes)
        self._snapshot.update(memory_used_bytes=used_bytes, memory_total_bytes=total_bytes)
        if allocated_bytes is not None:
            self.torch_allocated.labels(**self.card()).set(allocated_bytes)
        if reserved_bytes is not None:
            self.torch_reserved.labels(**self.card()).set(reserved_bytes)

    def load_snapshot(self) -> dict[str, int]:
        """This worker's tokens generated since start (all kinds), requests in flight and waiting, and card
        memory (used, total): small JSON-able numbers the worker sends with its heartbeat."""
        return dict(self._snapshot)

    def serve(self, port: int, host: str = "127.0.0.1") -> Any:
        """Start the /metrics HTTP endpoint on a daemon thread; returns the server (call shutdown() to stop)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server


def process_memory_bytes() -> tuple[int, int]:
    """(resident set size of this process, total RAM) from /proc; (0, 0) where /proc is missing."""
    page_size = os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/self/statm") as statm:
            resident_pages = int(statm.read().split()[1])
        total_pages = os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError, IndexError):
        return 0, 0
    return resident_pages * page_size, total_pages * page_size
