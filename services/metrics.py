"""Prometheus metrics of the API process (naming rules in docs/api.md,
"Metrics": `dgserve_*`, base units).

Each app gets its own `CollectorRegistry`, so several apps (tests, embedded launcher) never collide on
the process-global default registry. Labels never carry a job id.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Request latency of a job API is mostly Redis round trips: sub-millisecond to a few seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
REJECTION_REASONS = ("invalid", "too_large", "prompt_too_long", "queue_full", "rate_limited",
                     "idempotency_conflict", "enqueue_failed", "not_replicated", "key_limit")


class ApiMetrics:
    """Counters and histograms the API updates; `queue_depth` is refreshed at scrape time."""

    def __init__(self, model: str, queue: str):
        self.model = model
        self.queue = queue
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("dgserve_api_requests", "HTTP requests by route template, method and status.",
                                ("route", "method", "status"), registry=r)
        self.latency = Histogram("dgserve_api_request_duration_seconds",
                                 "Time from request to response start, by route template and method.",
                                 ("route", "method"), buckets=LATENCY_BUCKETS, registry=r)
        self.jobs_submitted = Counter("dgserve_api_jobs_submitted", "Jobs accepted and enqueued.",
                                      ("model", "kind"), registry=r)
        self.jobs_rejected = Counter("dgserve_api_jobs_rejected", "Job submissions refused, by reason.",
                                     ("model", "reason"), registry=r)
        self.queue_depth = Gauge("dgserve_queue_depth", "Jobs queued and not yet started on the model queue.",
                                 ("model", "queue"), registry=r)
        self.live_workers = Gauge("dgserve_live_workers", "Workers with a fresh heartbeat.", ("model",),
                                  registry=r)
        for reason in REJECTION_REASONS:  # export zeros so dashboards and alerts see every series
            self.jobs_rejected.labels(model=model, reason=reason)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, method=method, status=str(status)).inc()
        self.latency.labels(route=route, method=method).observe(seconds)

    def job_submitted(self, kind: str) -> None:
        self.jobs_submitted.labels(model=self.model, kind=kind).inc()

    def job_rejected(self, reason: str) -> None:
        self.jobs_rejected.labels(model=self.model, reason=reason).inc()

    def render(self, queue_depth: int, live_workers: int) -> bytes:
        """The exposition text, with the gauges read from Redis just now."""
        self.queue_depth.labels(model=self.model, queue=self.queue).set(queue_depth)
        self.live_workers.labels(model=self.model).set(live_workers)
        return generate_latest(self.registry)
