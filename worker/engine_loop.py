"""The single thread that owns the Engine: admits jobs between steps, steps, reports, enforces limits.

Everything that other threads want from the loop arrives through one queue of commands (`post`): a job to run
(`Submit`, from a Celery task thread), a cancel flag seen set or a lease lost (`Cancel`, `LeaseLost`, from
the lease keeper), the start of shutdown (`Shutdown`, from the SIGTERM handler). Nothing else crosses threads
into the loop, and nothing but this thread touches the engine, so the engine needs no locks. One iteration:

    apply every queued command (admit: engine.add_request, a ValueError fails only that job; cancel /
    lease lost: engine.abort and report)
    stop the jobs whose deadline passed, or (after Shutdown) whose grace period ended
    engine.step()  -> draft / canvas / finished outputs -> JobReporter (store writes on the writer thread)
    load metrics

Continuous batching is the engine's: requests added between two steps join the next decoder forward.

Shutdown (`Shutdown(grace_s)`, on SIGTERM): jobs submitted afterwards are handed back at once, jobs in flight
keep running until the grace period ends, then they are aborted and handed back: released to `queued` in the
store at once, and their tasks reject the message with requeue so another worker starts them now.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, replace

from engine.types import StepOutput
from worker.job_reporter import JobReporter
from worker.liveness import LivenessFile
from worker.metrics import WorkerMetrics
from worker.protocols import EngineLike
from worker.tickets import JobTicket

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05  # how long an idle loop waits for a command; bounds how stale the load gauges get


@dataclass(frozen=True)
class Submit:
    ticket: JobTicket


@dataclass(frozen=True)
class Cancel:
    job_id: str


@dataclass(frozen=True)
class LeaseLost:
    job_id: str


@dataclass(frozen=True)
class Shutdown:
    grace_s: float


Command = Submit | Cancel | LeaseLost | Shutdown


class EngineLoop:
    """Owner of one engine (see `worker.protocols.EngineLike`); `reporter` writes job state."""

    def __init__(self, engine: EngineLike, reporter: JobReporter, metrics: WorkerMetrics,
                 liveness: LivenessFile | None = None) -> None:
        self.engine = engine
        self.liveness = liveness  # touched after every iteration: the worker's liveness probe reads it
        self.reporter = reporter
        self.metrics = metrics
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._in_flight: dict[str, JobTicket] = {}  # by job id
        self._by_request: dict[str, JobTicket] = {}  # by engine request id (one per attempt)
        self._shutdown_deadline: float | None = None  # loop thread only
        self._stop = threading.Event()
        self._last_iteration_end = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="dgserve-engine-loop", daemon=True)

    # -- called from other threads -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def post(self, command: Command) -> None:
        """Queue a command for the next step boundary (the only way into the loop)."""
        if isinstance(command, Submit) and not self._thread.is_alive():
            raise RuntimeError("the engine loop is not running")
        self._commands.put(command)

    def submit(self, ticket: JobTicket) -> JobTicket:
        """Queue a job; wait on `ticket.future` for its outcome."""
        self.post(Submit(ticket))
        return ticket

    def stop(self, timeout_s: float = 30.0) -> None:
        """End the thread after handing back whatever is still in flight."""
        self.post(Shutdown(0.0))
        self._stop.set()
        self._thread.join(timeout_s)

    def is_in_flight(self, job_id: str) -> bool:
        """True while the job is admitted here (a dict membership test: safe from other threads)."""
        return job_id in self._in_flight

    def in_flight_ids(self) -> list[str]:
        """The ids of the jobs admitted here (`list(dict)` copies the keys without running Python code, so it is
        safe from other threads under the GIL)."""
        return list(self._in_flight)

    def progress_of(self, job_id: str) -> tuple[int, int]:
        """(canvas, step) last reported for a job in flight; (0, 0) before its first output."""
        ticket = self._in_flight.get(job_id)
        return (0, 0) if ticket is None else ticket.progress

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def seconds_since_iteration(self) -> float:
        """How long ago the loop last completed an iteration (one step, or an idle wait): grows without bound
        when the loop hangs inside the engine, which is how lease keeping learns to stop."""
        return time.monotonic() - self._last_iteration_end if self.is_alive else float("inf")

    # -- the loop thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not (self._stop.is_set() and not self._in_flight):
                self._apply_commands(wait_s=0.0 if self._in_flight else IDLE_WAIT_S)
                self._stop_overdue()
                if self._in_flight:
                    self._step()
                self._last_iteration_end = time.monotonic()
                if self.liveness is not None:
                    self.liveness.touch()
                self.metrics.set_load(self.engine.num_running(), self.engine.num_waiting())
                self.metrics.set_kv(self.engine.kv_stats())
        except Exception:
            logger.exception("engine loop crashed; failing the jobs in flight")
            for ticket in list(self._in_flight.values()):
                self._forget(ticket)
                self.reporter.failed(ticket, "worker_error", "the worker's engine loop crashed; see worker logs")
        finally:
            self._hand_back_submitted()

    def _apply_commands(self, wait_s: float) -> None:
        try:
            command = self._commands.get(timeout=wait_s) if wait_s > 0 else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, command: Command) -> None:
        if isinstance(command, Submit):
            self._admit(command.ticket)
        elif isinstance(command, Shutdown):
            deadline = time.monotonic() + max(command.grace_s, 0.0)
            if self._shutdown_deadline is None or deadline < self._shutdown_deadline:
                self._shutdown_deadline = deadline
        else:
            ticket = self._in_flight.get(command.job_id)
            if ticket is None:
                return  # finished meanwhile: the job's terminal write is already queued
            self._abort(ticket)
            if isinstance(command, Cancel):
                self.reporter.cancelled(ticket)
            else:
                self.reporter.lease_lost(ticket)

    def _admit(self, ticket: JobTicket) -> None:
        if self._shutdown_deadline is not None:
            self.reporter.handed_back(ticket)
            return
        if ticket.job_id in self._in_flight:
            # The same job twice in one worker (a redelivery racing its first delivery): keep the first,
            # and keep its lease (no release).
            self.reporter.handed_back(ticket, release_it=False)
            return
        try:
            self.engine.add_request(ticket.prepared.request, request_id=ticket.request_id)
        except ValueError as err:
            self.reporter.failed(ticket, "invalid_request", str(err))
            return
        ticket.admitted_at = time.time()
        self._in_flight[ticket.job_id] = ticket
        self._by_request[ticket.request_id] = ticket
        self.reporter.started(ticket)

    def _stop_overdue(self) -> None:
        """Deadlines and the shutdown grace period, checked between steps."""
        now = time.time()
        grace_over = self._shutdown_deadline is not None and time.monotonic() >= self._shutdown_deadline
        for ticket in list(self._in_flight.values()):
            if ticket.is_past_deadline(now):
                self._abort(ticket)
                self.reporter.expired(ticket)
            elif grace_over:
                self._abort(ticket)
                self.reporter.handed_back(ticket)

    def _step(self) -> None:
        outputs: list[StepOutput] = self.engine.step()
        stats = self.engine.last_step_stats
        self.metrics.observe_step(stats.num_denoising_canvases, stats.forward_seconds)
        for out in outputs:
            ticket = self._by_request.get(out.request_id)
            if ticket is None:
                continue  # aborted here already (cancel, deadline, lease lost): the engine reports its end
            if out.kind == "draft":
                self.reporter.draft(ticket, out)
            elif out.kind == "canvas":
                self.reporter.canvas(ticket, out)
                if ticket.prepared.stop_reached(ticket.canvas_token_ids):  # a stop string: end it here
                    self._abort(ticket)
                    self.reporter.succeeded(ticket, replace(out, kind="finished", finish_reason="stop", stats=None))
            else:
                # Only "stop", "length" or "error" reach here: every "aborted" end is of a request this
                # loop aborted itself, whose ticket was forgotten when it did.
                self._forget(ticket)
                if out.finish_reason == "error":
                    self.reporter.failed(ticket, "engine_error", out.error or "the engine failed on this request")
                else:
                    self.reporter.succeeded(ticket, out)

    def _abort(self, ticket: JobTicket) -> None:
        self._forget(ticket)
        self.engine.abort(ticket.request_id)  # unknown ids are ignored by the engine's contract

    def _forget(self, ticket: JobTicket) -> None:
        self._in_flight.pop(ticket.job_id, None)
        self._by_request.pop(ticket.request_id, None)

    def _hand_back_submitted(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, Submit):
                self.reporter.handed_back(command.ticket)
