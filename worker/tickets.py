"""What a Celery task hands the engine loop, and what it gets back.

A `JobTicket` carries one job from the task thread to the engine-loop thread; the loop resolves its
`future` with a `JobOutcome` once the job's terminal state is committed to the job store (or, for
`HANDED_BACK`, once the loop has decided not to finish it so the broker redelivers it).
"""

from __future__ import annotations

import enum
import itertools
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from worker.requests import PreparedJob


class JobOutcome(str, enum.Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    HANDED_BACK = "handed_back"  # not finished here: the task must not ack, so the broker redelivers it
    LEASE_LOST = "lease_lost"  # requeued or taken over meanwhile (this worker was presumed dead): stopped here


@dataclass
class JobTicket:
    """One job on its way through the engine loop.

    `created_at` and `deadline_at` are wall-clock epoch seconds from the job record (the API's clock; the
    worker's clock is assumed NTP-synced); `deadline_at` None means no deadline. The remaining fields are
    the loop's bookkeeping and are only touched on the loop thread.
    """

    job_id: str
    kind: str
    prepared: PreparedJob  # the engine request and how to report its outputs
    created_at: float
    deadline_at: float | None = None
    future: Future[JobOutcome] = field(default_factory=Future)
    admitted_at: float | None = None
    canvas_token_ids: list[tuple[int, ...]] = field(default_factory=list)
    progress: tuple[int, int] = (0, 0)  # (canvas, step) of the last output
    # The engine's id for this attempt: unique, so a later attempt of the same job in this worker never
    # receives the "aborted" output of an earlier one.
    request_id: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self.request_id = f"{self.job_id}#{next(_ATTEMPT_NUMBERS)}"

    def is_past_deadline(self, now: float | None = None) -> bool:
        return self.deadline_at is not None and (time.time() if now is None else now) > self.deadline_at

    def resolve(self, outcome: JobOutcome) -> None:
        """Resolve the future once (a second resolution is ignored: the first decision stands)."""
        if not self.future.done():
            self.future.set_result(outcome)


_ATTEMPT_NUMBERS = itertools.count(1)  # next() is atomic under the GIL: safe from the task threads
