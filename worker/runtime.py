"""Everything one worker process owns, built once when Celery starts the worker.

`WorkerRuntime` wires the job store, the engine (model loaded in this process, on its one device; tests may
pass any `worker.protocols.EngineLike`), the store-writer thread, the lease keeper, the engine-loop thread, the
registry heartbeat and the metrics endpoint, and implements the body of the `dgserve.run_job` task
(`run_job`). The Celery signal handlers in `worker.tasks` call `start_runtime` / `begin_shutdown` /
`stop_runtime`.

Orphan recovery: Celery redelivers a dead worker's unacked message only after the visibility timeout (above
the job deadline), far too late. Instead, every worker's lease keeper periodically requeues running jobs of
its queue whose lease lapsed and re-sends `dgserve.run_job` for the jobs it won (`worker.leases`). The dead
worker's original message, restored much later, then finds the job finished (ack) or running under a live
lease (retried later), and is never run twice.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

from engine.engine import Engine
from services.jobs import JobStore
from worker.device import gpu_label, resolve_device, resolve_dtype, sample_memory
from worker.engine_loop import Cancel, EngineLoop, LeaseLost, Shutdown
from worker.heartbeat import Heartbeat
from worker.job_reporter import JobReporter
from worker.leases import LeaseKeeper, reap_and_resend
from worker.liveness import LivenessFile
from worker.metrics import MetricLabels, WorkerMetrics
from worker.outage import STORE_UNREACHABLE, StoreOutage
from worker.protocols import EngineLike
from worker.requests import ModelInfo, prepare_job
from worker.settings import WorkerSettings
from worker.simulated_engine import BatchTimeModel, SimulatedEngine
from worker.store_writer import StoreWriter
from worker.tickets import JobOutcome, JobTicket

logger = logging.getLogger(__name__)
T = TypeVar("T")
START_OUTAGE_WAIT_S = 60.0  # a job's start waits this long for an unreachable store before the task retries


class HandBack(Exception):
    """The job was not finished here and must go back to the queue (the task rejects with requeue)."""


class RetryLater(Exception):
    """Another attempt holds a live lease on the job; look again after `countdown` seconds (by then the lease
    has been renewed by a live worker, or has lapsed and the job can be taken over)."""

    def __init__(self, countdown: float) -> None:
        super().__init__(f"job is running elsewhere; retry in {countdown:.1f} s")
        self.countdown = countdown


class WorkerRuntime:
    """One worker process's parts, wired: store, engine, engine loop, store writer, lease keeper, metrics."""

    def __init__(self, settings: WorkerSettings, hostname: str | None = None,
                 resend_job: Callable[[str], None] | None = None, engine: Any = None) -> None:
        self.settings = settings
        self.worker_id = f"{hostname or socket.gethostname()}:{os.getpid()}"
        self.resend_job = resend_job  # publishes `dgserve.run_job(job_id)` to this queue; None: no reaping
        self.store = JobStore.from_settings(settings)
        self.device = resolve_device(settings.worker_device)
        self.engine = engine if engine is not None else load_engine(settings, self.device)
        self.metrics = WorkerMetrics(MetricLabels(model=settings.model_name, gpu=gpu_label(self.device)))
        self.outage = StoreOutage()
        self.writer = StoreWriter(self.outage)
        interval_s = settings.worker_heartbeat_interval_seconds
        self.heartbeat = Heartbeat(self.store, self.worker_id, interval_s=interval_s, info={
            "queue": settings.queue_name, "model": settings.model_name, "gpu": self.metrics.labels.gpu,
            "pid": os.getpid(), "engine": settings.worker_engine,
            "limits": self.engine.request_limits.to_json_dict()},  # what the API checks submissions against
            live_info=lambda: {"load": self.metrics.load_snapshot()})  # /readyz's worker_load, read at each beat
        self.leases = LeaseKeeper(
            self.store, self.worker_id, self.outage,
            progress_of=lambda job_id: self.loop.progress_of(job_id),
            loop_stalled_s=lambda: self.loop.seconds_since_iteration(),
            on_cancel=lambda job_id: self.loop.post(Cancel(job_id)),
            on_lease_lost=lambda job_id: self.loop.post(LeaseLost(job_id)),
            heartbeat=self._beat,
            reap_orphans=(lambda: reap_and_resend(self.store, resend_job)) if resend_job is not None else None,
            interval_s=interval_s, cancel_poll_s=settings.worker_cancel_poll_seconds,
            reap_grace_s=float(settings.job_lease_seconds), hung_after_s=settings.worker_hung_loop_seconds)
        self.reporter = JobReporter(self.store, self.writer, self.metrics, self.leases, self.worker_id)
        self.model_info = model_info_of(self.engine)
        self.loop = EngineLoop(self.engine, self.reporter, self.metrics, LivenessFile(settings.heartbeat_path))
        self._metrics_server: Any = None
        self._dead_worker_signalled = False

    def start(self) -> None:
        self.writer.start()
        self.loop.start()
        self.leases.start()
        self._metrics_server = self.metrics.serve(self.settings.worker_metrics_port, self.settings.worker_metrics_host)
        logger.info("worker %s serving %s on %s; metrics on :%d", self.worker_id, self.settings.queue_name,
                    self.device, self.settings.worker_metrics_port)

    def begin_shutdown(self) -> None:
        self.loop.post(Shutdown(self.settings.worker_shutdown_grace_seconds))

    def stop(self) -> None:
        self.loop.stop(timeout_s=self.settings.worker_shutdown_grace_seconds + 30)
        self.leases.stop()
        self.writer.submit(self.heartbeat.remove)  # after every job write: /readyz stops counting us
        self.writer.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()

    # -- the task body ---------------------------------------------------------------------------------
    def run_job(self, job_id: str, batch: bool = False) -> str:
        """Run one job to its terminal state; returns the outcome, raises HandBack / RetryLater.

        The message is a turn, not a claim on `job_id`: it runs the job the store's fair pick gives
        (`start_next`: API keys in turn, the message's class first; docs/architecture.md, "Tenant fairness"),
        which may be `job_id` or another key's. Only when no job is waiting in the lanes does it try `job_id`
        itself (a redelivery of a running or finished job, a job published outside the lanes).
        Never raises for a user's bad input: that fails the job with the validation message.
        """
        # Jobs still in flight here are not picked again: one requeued while this worker looked dead must
        # first lose its lease here (at the next renewal), as for a redelivery of its own message below.
        decision = self._store_call(lambda: self.store.start_next(self.worker_id, batch=batch,
                                                                  exclude=self.loop.in_flight_ids()))
        if decision is None:
            if self.loop.is_in_flight(job_id):
                # A second message for a job running here: kombu restored our own unacked message (after a
                # broker reconnect, or a visibility timeout shorter than this run). Do not start the job a
                # second time, but keep a message alive in case this worker dies.
                raise RetryLater(float(self.settings.job_lease_seconds))
            decision = self._store_call(lambda: self.store.try_start(job_id, self.worker_id))
        job = decision.job
        job_id = job.id if job is not None else job_id
        try:
            prepared = prepare_job(job.request, self.model_info) if decision.should_run and job else None
        except ValueError as err:  # a stored payload this worker cannot read or run (pydantic errors included)
            self.store.fail(job_id, "invalid_request", f"the job's request cannot be run: {err}")
            return JobOutcome.FAILED.value
        if decision.outcome == "running_elsewhere":
            raise RetryLater(float(self.settings.job_lease_seconds))
        if prepared is None or job is None:
            logger.info("job %s not run: %s", job_id, decision.outcome)
            return decision.outcome
        ticket = JobTicket(job_id=job_id, kind=job.kind, prepared=prepared, created_at=job.created_at,
                           deadline_at=job.deadline_at)
        try:
            self.loop.submit(ticket)
        except RuntimeError as err:
            self._shut_down_dead_worker()
            raise HandBack(str(err)) from err
        outcome = ticket.future.result()
        if outcome is JobOutcome.HANDED_BACK:
            # The job was released to `queued` (or, if that write failed, its lease lapses and a reaper
            # requeues it); the rejected message goes back on the queue and starts it elsewhere.
            raise HandBack(f"job {job_id} handed back at shutdown")
        if outcome is JobOutcome.LEASE_LOST:
            # Another attempt owns the job now; keep a message alive until it is finished, as for
            # running_elsewhere (the retry acks once the store says the job is finished).
            raise RetryLater(float(self.settings.job_lease_seconds))
        return outcome.value

    def _store_call(self, start: Callable[[], T]) -> T:
        """`start()` (a store call that starts a job), waiting out a store outage of up to
        `START_OUTAGE_WAIT_S` (the message was delivered just before Redis went away); past that the outage
        error propagates and the task retries."""
        deadline = time.monotonic() + START_OUTAGE_WAIT_S
        delay = 0.1
        while True:
            try:
                decision = start()
            except STORE_UNREACHABLE as err:
                self.outage.failed(err)
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(2 * delay, 2.0)
                continue
            self.outage.answered()
            return decision

    def _shut_down_dead_worker(self) -> None:
        """The engine loop is gone (it crashed): stop this worker so its supervisor starts a fresh one, rather
        than keep taking jobs it can only hand back."""
        if not self._dead_worker_signalled:
            self._dead_worker_signalled = True
            logger.critical("the engine loop is not running; shutting this worker down")
            os.kill(os.getpid(), signal.SIGTERM)

    def _beat(self) -> None:
        # On the lease keeper's thread, every interval: the memory gauges and the registry record.
        sample_memory(self.metrics, self.device)
        self.heartbeat.beat()

def load_engine(settings: WorkerSettings, device: Any) -> Any:
    """The engine on this worker's device, sized so one decoder forward holds every job Celery hands us
    (`worker_engine=simulated`: the simulated engine, see `load_simulated_engine`)."""
    if settings.worker_engine == "simulated":
        return load_simulated_engine(settings, device)
    engine_options: dict[str, Any] = {
        "max_canvases_in_flight": settings.worker_concurrency,
        "max_tokens_per_forward": settings.worker_max_tokens_per_forward,
        "max_context": settings.worker_max_context,
    }
    if settings.worker_kv_cache_bytes is not None:
        engine_options["kv_cache_bytes"] = settings.worker_kv_cache_bytes
    return Engine.from_pretrained(settings.model, device=device,
                                  dtype=resolve_dtype(settings.worker_dtype, device), **engine_options)


def load_simulated_engine(settings: WorkerSettings, device: Any) -> EngineLike:
    """`worker.simulated_engine.SimulatedEngine` with the checkpoint's tokenizer and limits and as many batch rows
    as Celery threads. A GPU worker is a production worker: there it needs `worker_allow_simulated_engine` as
    well, so that a stray setting cannot answer real users with placeholder text."""
    if getattr(device, "type", str(device)) == "cuda" and not settings.worker_allow_simulated_engine:
        raise ValueError("worker_engine: 'simulated' writes placeholder text and is refused on a GPU worker; set "
                         "DGSERVE_WORKER_ALLOW_SIMULATED_ENGINE=1 as well to run it there on purpose")
    batch_time = BatchTimeModel.parse(settings.worker_simulated_step_ms, settings.worker_simulated_step_scale)
    logger.warning("SIMULATED ENGINE: no model runs in this worker; jobs get placeholder text after %s",
                   settings.worker_simulated_step_ms)
    return SimulatedEngine.from_checkpoint(settings.model, max_batch=settings.worker_concurrency,
                                           max_context=settings.worker_max_context, batch_time=batch_time)


def model_info_of(engine: Any) -> ModelInfo:
    return ModelInfo(tokenizer=engine.tokenizer, canvas_length=engine.config.canvas_length,
                     default_max_new_tokens=engine.generation_defaults.max_new_tokens)


_runtime: WorkerRuntime | None = None


def start_runtime(settings: WorkerSettings, hostname: str | None = None,
                  resend_job: Callable[[str], None] | None = None) -> WorkerRuntime:
    global _runtime
    if _runtime is None:
        _runtime = WorkerRuntime(settings, hostname, resend_job)
        _runtime.start()
    return _runtime


def get_runtime() -> WorkerRuntime:
    if _runtime is None:
        raise RuntimeError("the worker runtime is not started (the Celery worker_init signal did not run)")
    return _runtime


def stop_runtime() -> None:
    global _runtime
    if _runtime is not None:
        _runtime.stop()
        _runtime = None


def begin_shutdown() -> None:
    """SIGTERM arrived: stop admitting jobs, give in-flight ones the grace period."""
    if _runtime is not None:
        _runtime.begin_shutdown()
