"""Turns engine outputs of one job into job-store writes (events, progress, the terminal state).

Every write goes through the `StoreWriter` thread in order; the ticket's future is resolved by the
terminal write's closure *after* the store call returns, so a Celery task never acks a job whose result is
not committed. Terminal writes are compare-and-set in the store: a job that some other attempt already
finished is never overwritten, which is what makes redelivery safe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from engine.types import StepOutput
from worker.metrics import WorkerMetrics
from worker.store_writer import StoreWriter
from worker.tickets import JobOutcome, JobTicket

logger = logging.getLogger(__name__)


class JobReporter:
    """Writes one worker's job events and results; `store` is a `services.jobs.JobStore`."""

    def __init__(self, store: Any, writer: StoreWriter, metrics: WorkerMetrics, worker_id: str = "") -> None:
        self.store = store
        self.writer = writer
        self.metrics = metrics
        self.worker_id = worker_id  # the lease holder's id: progress renews and releases only our own leases

    def draft(self, ticket: JobTicket, out: StepOutput) -> None:
        ticket.progress = (out.canvas_index, out.step)
        data = ticket.prepared.draft_event(out)
        job_id = ticket.job_id
        self.writer.submit(lambda: self._event_and_progress(job_id, "draft", data, out.canvas_index, out.step))

    def canvas(self, ticket: JobTicket, out: StepOutput) -> None:
        ticket.canvas_token_ids.append(out.token_ids)
        ticket.progress = (out.canvas_index, out.step)
        self.metrics.observe_canvas(ticket.kind, ticket.prepared.produced_tokens(out), out.step)
        data = ticket.prepared.canvas_event(out)
        job_id = ticket.job_id
        self.writer.submit(lambda: self._event_and_progress(job_id, "canvas", data, out.canvas_index, out.step))

    def succeeded(self, ticket: JobTicket, out: StepOutput) -> None:
        """Commit the result; a result that cannot be assembled (ValueError) fails the job instead."""
        try:
            result = ticket.prepared.result(ticket.canvas_token_ids, out)
        except ValueError as err:
            self.failed(ticket, "result_error", f"the engine's output could not be turned into a result: {err}")
            return
        self._terminal(ticket, JobOutcome.SUCCEEDED, lambda: self.store.succeed(ticket.job_id, result))

    def failed(self, ticket: JobTicket, code: str, message: str) -> None:
        self._terminal(ticket, JobOutcome.FAILED, lambda: self.store.fail(ticket.job_id, code, message))

    def expired(self, ticket: JobTicket) -> None:
        message = (f"the job ran past its deadline ({ticket.deadline_at - ticket.created_at:.0f} s after "
                   "submission) and was stopped" if ticket.deadline_at is not None else "the job's deadline passed")
        self._terminal(ticket, JobOutcome.EXPIRED, lambda: self.store.expire(ticket.job_id, message))

    def cancelled(self, ticket: JobTicket) -> None:
        self._terminal(ticket, JobOutcome.CANCELLED, lambda: self.store.mark_cancelled(ticket.job_id))

    def handed_back(self, ticket: JobTicket, release: bool = True) -> None:
        """Not finished here: with `release`, the job goes back to `queued` at once (`store.release`, a no-op
        unless this worker holds it), so the requeued message starts it elsewhere without waiting for the
        lease to lapse. `release=False` when another ticket of this worker still runs the same job."""
        self.writer.unwatch(ticket.job_id)
        job_id, worker_id = ticket.job_id, self.worker_id

        def release_then_resolve() -> None:
            try:
                if release and worker_id:
                    self.store.release(job_id, worker_id, "worker_shutdown")
            finally:
                # A failed release leaves the lease to lapse: the orphan reaper of a live worker requeues it.
                ticket.resolve(JobOutcome.HANDED_BACK)

        self.writer.submit(release_then_resolve)

    def lease_lost(self, ticket: JobTicket) -> None:
        """Nothing is written: the job belongs to another attempt now (the store refused our lease renewal)."""
        self.writer.unwatch(ticket.job_id)
        self.writer.submit(lambda: ticket.resolve(JobOutcome.LEASE_LOST))

    def _event_and_progress(self, job_id: str, event: str, data: dict, canvas: int, step: int) -> None:
        self.store.append_event_with_progress(job_id, event, data, canvas, step, worker_id=self.worker_id or None)

    def _terminal(self, ticket: JobTicket, outcome: JobOutcome, write: Callable[[], object]) -> None:
        finished_at = time.time()
        self.writer.unwatch(ticket.job_id)
        self._observe_job(ticket, outcome, finished_at)

        def commit_then_resolve() -> None:
            try:
                write()
            finally:
                # Resolve even when the write failed: the task then re-raises nothing and the job stays as the
                # store has it; blocking the task thread forever would be worse.
                ticket.resolve(outcome)

        self.writer.submit(commit_then_resolve)

    def _observe_job(self, ticket: JobTicket, outcome: JobOutcome, finished_at: float) -> None:
        admitted = ticket.admitted_at
        self.metrics.observe_job(
            ticket.kind, outcome.value,
            e2e_seconds=finished_at - ticket.created_at,
            queue_wait_seconds=None if admitted is None else admitted - ticket.created_at,
            run_seconds=None if admitted is None else finished_at - admitted,
        )
