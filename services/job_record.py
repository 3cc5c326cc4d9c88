"""A job as stored in its `job:{id}` Redis hash, decoded (see `services.jobs` for the key layout)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any, cast

from services.schemas import (
    TERMINAL_STATUSES,
    EditJobCreate,
    GenerateJobCreate,
    JobKind,
    JobPublic,
    JobStatus,
    parse_job_create,
)


@dataclass(frozen=True)
class JobRecord:
    """A decoded `job:{id}` hash. `request` is the validated wire request the job was created from, parsed
    from `payload` on first use only: reading a job's status (GET, SSE open) never re-validates its request."""

    id: str
    kind: JobKind
    status: JobStatus
    owner: str
    payload: str  # the request as stored (JSON)
    created_at: float
    deadline_at: float
    expires_at: float
    started_at: float | None
    finished_at: float | None
    attempts: int
    worker_id: str | None
    progress: tuple[int, int] | None  # (canvas, step)
    result: dict[str, Any] | None
    error: tuple[str, str] | None  # (code, message)
    cancel_requested: bool

    @cached_property
    def request(self) -> GenerateJobCreate | EditJobCreate:
        """The parsed request (pydantic's ValidationError, a ValueError, for a payload this version refuses)."""
        return parse_job_create(json.loads(self.payload))

    @property
    def is_finished(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def to_public(self) -> JobPublic:
        queue_end = self.started_at if self.started_at is not None else self.finished_at
        timings = {
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "queue_seconds": None if queue_end is None else max(0.0, queue_end - self.created_at),
            "run_seconds": None if self.started_at is None or self.finished_at is None
            else max(0.0, self.finished_at - self.started_at),
        }
        return JobPublic.model_validate({
            "id": self.id, "kind": self.kind, "status": self.status, "result": self.result,
            "progress": None if self.progress is None else {"canvas": self.progress[0], "step": self.progress[1]},
            "timings": timings, "attempts": self.attempts, "expires_at": self.expires_at,
            "cancel_requested": self.cancel_requested,
            "error": None if self.error is None else {"code": self.error[0], "message": self.error[1]},
        })


def _optional_float(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None


def decode_record(job_id: str, raw: dict[str, str],
                  request: GenerateJobCreate | EditJobCreate | None = None) -> JobRecord:
    """The record of a `job:{id}` hash; `request`, when the caller holds it already, spares the parse."""
    canvas, step = raw.get("progress_canvas"), raw.get("progress_step")
    record = JobRecord(
        id=job_id, kind=cast(JobKind, raw["kind"]), status=cast(JobStatus, raw["status"]),
        owner=raw.get("owner", ""), payload=raw["payload"],
        created_at=float(raw["created_at"]), deadline_at=float(raw["deadline_at"]),
        expires_at=float(raw["expires_at"]),
        started_at=_optional_float(raw.get("started_at")), finished_at=_optional_float(raw.get("finished_at")),
        attempts=int(raw.get("attempts", "0")), worker_id=raw.get("worker_id") or None,
        progress=None if canvas is None or step is None else (int(canvas), int(step)),
        result=json.loads(raw["result"]) if raw.get("result") else None,
        error=(raw["error_code"], raw.get("error_message", "")) if raw.get("error_code") else None,
        cancel_requested=raw.get("cancel_requested") == "1",
    )
    if request is not None:
        record.__dict__["request"] = request  # what cached_property stores; the record stays frozen
    return record
