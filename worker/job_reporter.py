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
from typing import Protocol

from engine.types import StepOutput
from worker.metrics import WorkerMetrics
from worker.outage import STORE_UNREACHABLE
from worker.protocols import JobStoreLike
from worker.store_writer import StoreWriter
from worker.tickets import JobOutcome, JobTicket

logger = logging.getLogger(__name__)


class Watchlist(Protocol):
    """The jobs whose leases and cancel flags this worker keeps (`worker.leases.LeaseKeeper`)."""

    def watch(self, job_id: str) -> None: ...

    def unwatch(self, job_id: str) -> None: ...


class JobReporter:
    """Writes one worker's job events and results (through `writer`, in order) and tells `watchlist` which
    jobs are in flight here."""

    def __init__(self, store: JobStoreLike, writer: StoreWriter, metrics: WorkerMetrics, watchlist: Watchlist,
                 worker_id: str = "") -> None:
        self.store = store
        self.writer = writer
        self.metrics = metrics
        self.watchlist = watchlist
        self.worker_id = worker_id  # the lease holder's id: progress renews and releases only our own leases

    def started(self, ticket: JobTicket) -> None:
        """The engine admitted the job: keep its lease and watch its cancel flag from now on."""
        self.watchlist.watch(ticket.job_id)

    def draft(self, ticket: JobTicket, out: StepOutput) -> None:
        ticket.progress = (out.canvas_index, out.step)
        self._submit_event(ticket, "draft", out)

    def canvas(self, ticket: JobTicket, out: StepOutput) -> None:
        ticket.canvas_token_ids.append(out.token_ids)
        ticket.progress = (out.canvas_index, out.step)
        ticket.prepared.record_canvas(out)
        self.metrics.observe_canvas(ticket.kind, ticket.prepared.produced_tokens(out), out.step)
        self._submit_event(ticket, "canvas", out)

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

    def handed_back(self, ticket: JobTicket, release_it: bool = True) -> None:
        """Not finished here: with `release_it`, the job goes back to `queued` at once (`store.release`, a no-op
        unless this worker holds it), so the requeued message starts it elsewhere without waiting for the
        lease to lapse. `release_it=False` when another ticket of this worker still runs the same job (whose
        lease and cancel flag stay watched)."""
        if release_it:
            self.watchlist.unwatch(ticket.job_id)
        job_id, worker_id = ticket.job_id, self.worker_id

        def release() -> None:
            if release_it and worker_id:
                self.store.release(job_id, worker_id, "worker_shutdown")

        # A release that fails (not an outage) leaves the lease to lapse: a live worker's reaper requeues it.
        self.writer.submit(_then_resolve(release, ticket, JobOutcome.HANDED_BACK))

    def lease_lost(self, ticket: JobTicket) -> None:
        """Nothing is written: the job belongs to another attempt now (the store refused our lease renewal)."""
        self.watchlist.unwatch(ticket.job_id)
        self.writer.submit(lambda: ticket.resolve(JobOutcome.LEASE_LOST))

    def _submit_event(self, ticket: JobTicket, event: str, out: StepOutput) -> None:
        # The event's data (text decoded from the output's ids) is made on the writer thread, off the engine
        # loop's critical path.
        job_id, prepared, worker_id = ticket.job_id, ticket.prepared, self.worker_id or None
        make_data = prepared.draft_event if event == "draft" else prepared.canvas_event

        def write() -> None:
            self.store.append_event_with_progress(job_id, event, make_data(out), out.canvas_index, out.step,
                                                  worker_id=worker_id)

        self.writer.submit(write)

    def _terminal(self, ticket: JobTicket, outcome: JobOutcome, write: Callable[[], object]) -> None:
        finished_at = time.time()
        self.watchlist.unwatch(ticket.job_id)
        self._observe_job(ticket, outcome, finished_at)

        self.writer.submit(_then_resolve(write, ticket, outcome))

    def _observe_job(self, ticket: JobTicket, outcome: JobOutcome, finished_at: float) -> None:
        admitted = ticket.admitted_at
        self.metrics.observe_job(
            ticket.kind, outcome.value,
            e2e_seconds=finished_at - ticket.created_at,
            queue_wait_seconds=None if admitted is None else admitted - ticket.created_at,
            run_seconds=None if admitted is None else finished_at - admitted,
        )


def _then_resolve(write: Callable[[], object], ticket: JobTicket, outcome: JobOutcome) -> Callable[[], None]:
    """A store write that resolves the ticket's future once it has gone through.

    An outage error propagates (the writer retries the write until the store answers, so a task never acks a
    job whose result is not committed). Any other failure resolves too: the job then stays as the store has
    it (its lease lapses and a reaper requeues it), which beats blocking the task thread forever.
    """

    def write_then_resolve() -> None:
        try:
            write()
        except STORE_UNREACHABLE:
            raise
        except Exception:
            ticket.resolve(outcome)
            raise
        ticket.resolve(outcome)

    return write_then_resolve
