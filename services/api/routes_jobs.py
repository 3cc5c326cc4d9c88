"""The job routes: submit, read, follow (SSE), cancel."""

from __future__ import annotations

import re
import time
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from services.api.deps import OwnerDep, ServicesDep
from services.api.errors import ApiError
from services.api.openapi_doc import SSE_EVENT_SCHEMA
from services.api.sse import SSE_HEADERS, job_event_stream
from services.api.submission import accept_job
from services.job_record import JobRecord
from services.jobs import is_job_id
from services.schemas import ErrorBody, JobAccepted, JobCreate, JobPublic

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
# A Redis stream id is two unsigned 64-bit integers; up to 19 digits each is always in range (ids are
# millisecond times and small sequence numbers), and the rule is one regular expression the OpenAPI
# document can state exactly.
STREAM_ID_PATTERN = r"^[0-9]{1,19}-[0-9]{1,19}$"
_STREAM_ID = re.compile(STREAM_ID_PATTERN)
# The error statuses every route shares are documented by services/api/openapi_doc.py; here only the
# route's own answers.
_SUBMITTED: dict[int | str, dict[str, Any]] = {202: {"headers": {
    "Location": {"description": "the job's URL, `/v1/jobs/{id}`", "required": True, "schema": {"type": "string"}},
    "Idempotent-Replayed": {"description": "`true` when an earlier job of the same Idempotency-Key and body is "
                            "returned (nothing was enqueued again)", "schema": {"type": "string", "enum": ["true"]}},
}}}
_EVENT_STREAM: dict[int | str, dict[str, Any]] = {200: {
    "description": "`text/event-stream`: frames `id`, `event`, `data` (JSON); `: keep-alive` comments",
    "content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}}}}


class EventStreamResponse(StreamingResponse):
    media_type = "text/event-stream"


def _no_such_job() -> ApiError:
    return ApiError(404, "not_found", "no such job (it does not exist, expired, or belongs to another API key)")


def _owned_job(services: ServicesDep, job_id: str, owner: str) -> JobRecord:
    """The caller's job, or 404. Anything that is not a job id is 404 before Redis is asked (so a path like
    `<id>:events` never reaches another key), and another key's job reads exactly like an unknown one."""
    record = services.store.get_for_owner(job_id, owner) if is_job_id(job_id) else None
    if record is None:
        raise _no_such_job()
    return _expire_if_overdue(services, record)


def _resume_point(last_event_id: str | None) -> str:
    """The stream id to resume after; 422 for anything Redis would not take as one."""
    resume_from = last_event_id or "0-0"
    if _STREAM_ID.match(resume_from) is None:
        raise ApiError(422, "invalid_request", "Last-Event-ID: must be an event id received from this stream, "
                       "like 1712345678901-0", field="Last-Event-ID")
    return resume_from


def _expire_if_overdue(services: ServicesDep, record: JobRecord) -> JobRecord:
    """A job nobody finished by its deadline reads as `expired`, even with no worker left to notice: a
    queued one at once, a running one after its worker had time to fail it itself (two lease periods)."""
    grace = 0.0 if record.status == "queued" else 2.0 * services.settings.job_lease_seconds
    if record.is_finished or time.time() <= record.deadline_at + grace:
        return record
    what = "started" if record.status == "queued" else "finished"
    services.store.expire(record.id, f"the job was not {what} before its deadline")
    return services.store.get(record.id) or record


@router.post("", status_code=202, response_model=JobAccepted, responses=_SUBMITTED,
             summary="Submit a generate or edit job")
def submit_job(job: Annotated[JobCreate, Body()], services: ServicesDep, owner: OwnerDep, response: Response,
               idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", min_length=1,
                                                             max_length=255)] = None) -> JobAccepted:
    """Validate, store and enqueue a job. 202 + `Location`; nothing is enqueued for a refused request."""
    record, created = accept_job(services, job, owner, idempotency_key)
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    location = f"/v1/jobs/{record.id}"
    response.headers["Location"] = location
    return JobAccepted.model_validate({"id": record.id, "kind": record.kind, "status": record.status,
                                       "created_at": record.created_at, "expires_at": record.expires_at,
                                       "location": location})


@router.get("/{job_id}", response_model=JobPublic, summary="Status, progress and result")
def get_job(job_id: str, services: ServicesDep, owner: OwnerDep) -> JobPublic:
    return _owned_job(services, job_id, owner).to_public()


@router.delete("/{job_id}", status_code=202, response_model=JobPublic,
               responses={409: {"model": ErrorBody}}, summary="Cancel a job")
def cancel_job(job_id: str, services: ServicesDep, owner: OwnerDep) -> JobPublic:
    """Queued jobs are cancelled at once; running ones at the worker's next step. 409 if already finished."""
    _owned_job(services, job_id, owner)
    outcome = services.store.cancel(job_id)
    if outcome == "not_found":
        raise _no_such_job()
    record = services.store.get(job_id)
    if outcome == "finished" and record is not None:
        raise ApiError(409, "job_finished", f"job {job_id} already finished with status {record.status!r}")
    if record is None:
        raise _no_such_job()
    return record.to_public()


@router.get("/{job_id}/events", response_class=EventStreamResponse, responses=_EVENT_STREAM,
            summary="Server-Sent Events of the job (resumable with Last-Event-ID)")
async def job_events(job_id: str, request: Request, services: ServicesDep, owner: OwnerDep,
                     last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", description=(
                         "resume after this event id"), json_schema_extra={"pattern": STREAM_ID_PATTERN})] = None,
                     last_event_id_query: Annotated[str | None, Query(alias="last_event_id", description=(
                         "the same, for clients that cannot set headers (EventSource)"),
                         json_schema_extra={"pattern": STREAM_ID_PATTERN})] = None,
                     ) -> EventStreamResponse:
    """Events `queued`, `started`, `draft`, `canvas`, then one of `done`/`failed`/`cancelled`/`expired`,
    which ends the stream. Each event's `id` is its Redis stream id; send it back as `Last-Event-ID`
    (header, or `last_event_id` query parameter) to resume after it."""
    await run_in_threadpool(_owned_job, services, job_id, owner)  # an unknown job is 404 whatever else is wrong
    resume_from = _resume_point(last_event_id or last_event_id_query)
    stream = job_event_stream(request.app.state.async_redis, job_id, resume_from,
                              services.settings.sse_keepalive_seconds)
    return EventStreamResponse(stream, headers=SSE_HEADERS)
