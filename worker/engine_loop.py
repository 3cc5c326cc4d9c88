"""The single thread that owns the Engine: admits jobs between steps, steps, reports, enforces limits.

Celery task threads call `submit(ticket)` and wait on `ticket.future`; nothing but this thread touches the
engine, so the engine needs no locks. One iteration:

    admit new tickets (engine.add_request; a ValueError fails only that job)
    abort jobs whose lease was lost, whose cancel flag is set, whose deadline passed, or (after SIGTERM)
    whose shutdown grace period ended
    engine.step()  -> draft / canvas / finished outputs -> JobReporter (store writes on the writer thread)
    metrics + heartbeat

Continuous batching is the engine's: requests added between two steps join the next decoder forward.

Shutdown (`begin_shutdown(grace_s)`, on SIGTERM): tickets not yet admitted are handed back at once, jobs in
flight keep running until the grace period ends, then they are aborted and handed back: released to `queued`
in the store at once, and their tasks reject the message with requeue so another worker starts them now.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from engine.types import StepOutput
from worker.heartbeat import Heartbeat
from worker.job_reporter import JobReporter
from worker.metrics import WorkerMetrics
from worker.tickets import JobTicket

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05  # how long an idle loop sleeps waiting for a ticket; bounds heartbeat/shutdown latency


class EngineLoop:
    """Owner of one `engine.Engine` (anything with add_request/step/abort/has_unfinished/num_*).

    `reporter` writes job state; `cancel_requested(job_id)` answers from the writer's polled cache;
    `sample_memory()` refreshes the memory gauges (called at most every `memory_sample_s`).
    """

    def __init__(self, engine: Any, reporter: JobReporter, metrics: WorkerMetrics, heartbeat: Heartbeat,
                 cancel_requested: Callable[[str], bool], sample_memory: Callable[[], None] | None = None,
                 memory_sample_s: float = 5.0) -> None:
        self.engine = engine
        self.reporter = reporter
        self.metrics = metrics
        self.heartbeat = heartbeat
        self.cancel_requested = cancel_requested
        self.sample_memory = sample_memory
        self.memory_sample_s = memory_sample_s
        self._inbox: queue.SimpleQueue[JobTicket] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._in_flight: dict[str, JobTicket] = {}  # by job id
        self._by_request: dict[str, JobTicket] = {}  # by engine request id (one per attempt)
        self._leases_lost: set[str] = set()  # added by the writer thread, consumed here
        self._leases_lost_lock = threading.Lock()
        self._shutdown_deadline: float | None = None
        self._stop = threading.Event()
        self._last_memory_sample = float("-inf")
        self._last_iteration_end = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="dgserve-engine-loop", daemon=True)

    # -- called from other threads -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, ticket: JobTicket) -> JobTicket:
        """Queue a job for the next step boundary; wait on `ticket.future` for its outcome."""
        if not self._thread.is_alive():
            raise RuntimeError("the engine loop is not running")
        self._inbox.put(ticket)
        self._wakeup.set()
        return ticket

    def begin_shutdown(self, grace_s: float) -> None:
        """Stop admitting work; in-flight jobs get `grace_s` seconds to finish before being handed back."""
        if self._shutdown_deadline is None:
            self._shutdown_deadline = time.monotonic() + max(grace_s, 0.0)
            self._wakeup.set()

    def stop(self, timeout_s: float = 30.0) -> None:
        """End the thread (after handing back whatever is still in flight)."""
        self.begin_shutdown(0.0)
        self._stop.set()
        self._wakeup.set()
        self._thread.join(timeout_s)

    def is_in_flight(self, job_id: str) -> bool:
        """True while the job is admitted here (a dict membership test: safe from other threads)."""
        return job_id in self._in_flight

    def progress_of(self, job_id: str) -> tuple[int, int]:
        """(canvas, step) last reported for a job in flight; (0, 0) before its first output."""
        ticket = self._in_flight.get(job_id)
        return (0, 0) if ticket is None else ticket.progress

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def lease_lost(self, job_id: str) -> None:
        """The store refused to renew this worker's lease on `job_id` (requeued by a reaper while this worker
        looked dead, or finished elsewhere): stop running it here at the next step boundary."""
        with self._leases_lost_lock:
            self._leases_lost.add(job_id)
        self._wakeup.set()

    def seconds_since_iteration(self) -> float:
        """How long ago the loop last completed an iteration (one step, or an idle wait): grows without bound
        when the loop hangs inside the engine, which is how lease renewal learns to stop."""
        return time.monotonic() - self._last_iteration_end

    # -- the loop thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not (self._stop.is_set() and not self._in_flight):
                self._admit_new()
                self._enforce_limits()
                if self._in_flight:
                    self._step()
                else:
                    self._wakeup.wait(IDLE_WAIT_S)
                    self._wakeup.clear()
                self._housekeeping()
        except Exception:
            logger.exception("engine loop crashed; failing the jobs in flight")
            for ticket in list(self._in_flight.values()):
                self._finish(ticket)
                self.reporter.failed(ticket, "worker_error", "the worker's engine loop crashed; see worker logs")
        finally:
            self._hand_back_inbox()

    def _admit_new(self) -> None:
        while True:
            try:
                ticket = self._inbox.get_nowait()
            except queue.Empty:
                return
            if self._shutdown_deadline is not None:
                self.reporter.handed_back(ticket)
                continue
            self._admit(ticket)

    def _admit(self, ticket: JobTicket) -> None:
        if ticket.job_id in self._in_flight:
            # The same job twice in one worker (a redelivery racing its first delivery): keep the first,
            # and keep its lease (no release).
            self.reporter.handed_back(ticket, release=False)
            return
        try:
            self.engine.add_request(ticket.prepared.request, request_id=ticket.request_id)
        except ValueError as err:
            self.reporter.failed(ticket, "invalid_request", str(err))
            return
        ticket.admitted_at = time.time()
        self._in_flight[ticket.job_id] = ticket
        self._by_request[ticket.request_id] = ticket
        self.reporter.writer.watch(ticket.job_id)

    def _enforce_limits(self) -> None:
        """Lost leases, cancel flags, deadlines and the shutdown grace period, all checked between steps."""
        now = time.time()
        grace_over = self._shutdown_deadline is not None and time.monotonic() >= self._shutdown_deadline
        with self._leases_lost_lock:
            lost, self._leases_lost = self._leases_lost, set()
        for ticket in list(self._in_flight.values()):
            if ticket.job_id in lost:
                self._abort(ticket)
                self.reporter.lease_lost(ticket)
            elif self.cancel_requested(ticket.job_id):
                self._abort(ticket)
                self.reporter.cancelled(ticket)
            elif ticket.is_past_deadline(now):
                self._abort(ticket)
                self.reporter.expired(ticket)
            elif grace_over:
                self._abort(ticket)
                self.reporter.handed_back(ticket)

    def _step(self) -> None:
        started = time.perf_counter()
        outputs: list[StepOutput] = self.engine.step()
        stats = getattr(self.engine, "last_step_stats", None)
        forward_seconds = stats.forward_seconds if stats is not None else time.perf_counter() - started
        self.metrics.observe_step(stats.num_denoising_canvases if stats is not None else 0, forward_seconds)
        for out in outputs:
            ticket = self._by_request.get(out.request_id)
            if ticket is None:
                continue  # a job already aborted here; the engine may still report its end
            self._dispatch(ticket, out)

    def _dispatch(self, ticket: JobTicket, out: StepOutput) -> None:
        if out.kind == "draft":
            self.reporter.draft(ticket, out)
        elif out.kind == "canvas":
            self.reporter.canvas(ticket, out)
            if ticket.prepared.stop_reached(ticket.canvas_token_ids):  # a stop string: end it here
                self._abort(ticket)
                self.reporter.succeeded(ticket, replace(out, kind="finished", finish_reason="stop", stats=None))
        elif out.kind == "finished":
            self._finish(ticket)
            if out.finish_reason == "error":
                self.reporter.failed(ticket, "engine_error", out.text or "the engine failed on this request")
            elif out.finish_reason == "aborted":
                self.reporter.failed(ticket, "aborted", "the engine aborted this request")
            else:
                self.reporter.succeeded(ticket, out)

    def _abort(self, ticket: JobTicket) -> None:
        self._finish(ticket)
        try:
            self.engine.abort(ticket.request_id)
        except (KeyError, ValueError):
            logger.debug("engine had already dropped %s", ticket.request_id)

    def _finish(self, ticket: JobTicket) -> None:
        self._in_flight.pop(ticket.job_id, None)
        self._by_request.pop(ticket.request_id, None)

    def _housekeeping(self) -> None:
        self._last_iteration_end = time.monotonic()
        self.metrics.set_load(self.engine.num_running(), self.engine.num_waiting())
        kv_stats = getattr(self.engine, "kv_stats", None)
        if kv_stats is not None:
            self.metrics.set_kv(kv_stats())
        self.heartbeat.beat()
        now = time.monotonic()
        if self.sample_memory is not None and now - self._last_memory_sample >= self.memory_sample_s:
            self._last_memory_sample = now
            self.sample_memory()

    def _hand_back_inbox(self) -> None:
        while True:
            try:
                self.reporter.handed_back(self._inbox.get_nowait())
            except queue.Empty:
                return
