"""Running an OpenAI request's jobs for the synchronous routes: accept every choice's job, then wait for
their results (JSON answer) or follow their event streams (event-stream answer).

If a later choice is refused (e.g. the queue fills up at choice 3 of 4), the choices already accepted are
cancelled and the refusal is returned: a request is answered whole or not at all. If the HTTP client goes
away, accepted jobs still run to their end (they are ordinary jobs, readable under GET /v1/jobs/{id}).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from services.api.deps import AppServices
from services.api.errors import ApiError
from services.api.sse import SSE_HEADERS, StreamEvent, follow_job_events
from services.api.submission import accept_job
from services.job_record import JobRecord
from services.openai.errors import openai_error
from services.openai.shapes import DRAFT_FIELD, ChoiceStream, ResponseShape, choice_text, usage_of
from services.openai.translate import Plan

_ID_PREFIX = {"completions": "cmpl", "chat": "chatcmpl", "fim": "fim"}


def job_error(event: StreamEvent) -> ApiError:
    """The answer for a job that ended without a result: failed → 500, expired → 504, cancelled → 409."""
    error = event.data.get("error") or {}
    status = {"failed": 500, "expired": 504, "cancelled": 409}.get(event.type, 500)
    return ApiError(status, str(error.get("code") or f"job_{event.type}"),
                    str(error.get("message") or f"the job was {event.type}"))


def accept_choices(services: AppServices, plan: Plan, owner: str) -> list[JobRecord]:
    """Store and enqueue one job per choice; all or none."""
    records: list[JobRecord] = []
    try:
        for choice in plan.choices:
            records.append(accept_job(services, choice.job, owner)[0])
    except ApiError:
        for record in records:
            services.store.cancel(record.id)
        raise
    return records


async def _result_of(client: aioredis.Redis, job_id: str, idle: float, deadline: float) -> dict[str, Any]:
    async for event in follow_job_events(client, job_id, "0-0", idle):
        if event is not None and event.type == "done":
            return event.data.get("result") or {}
        if event is not None and event.is_terminal:
            raise job_error(event)
        if time.monotonic() > deadline:
            break
    raise ApiError(504, "job_timeout", f"job {job_id} did not finish in time; see GET /v1/jobs/{job_id}")


async def run_plan(request: Request, services: AppServices, owner: str, plan: Plan) -> Any:
    """Accept the plan's jobs and answer: the completed body, or a StreamingResponse when `stream`."""
    records = await run_in_threadpool(accept_choices, services, plan, owner)
    shape = ResponseShape(plan, f"{_ID_PREFIX[plan.endpoint]}-{records[0].id}", int(records[0].created_at),
                          services.settings.model_name)
    client, idle = request.app.state.async_redis, services.settings.sse_keepalive_seconds
    if plan.request.stream:
        return StreamingResponse(_stream(client, shape, records, idle), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    deadline = time.monotonic() + services.settings.job_deadline_seconds + 60
    results = [await _result_of(client, record.id, idle, deadline) for record in records]
    return shape.complete(results)


async def _stream(client: aioredis.Redis, shape: ResponseShape, records: list[JobRecord],
                  idle: float) -> AsyncIterator[str]:
    """Each choice's chunks in turn (chunks carry their choice `index`), then usage, then `[DONE]`."""
    results: list[dict[str, Any]] = []
    for index, record in enumerate(records):
        outcome: list[dict[str, Any]] = []
        async for frame in _stream_choice(client, shape, index, record.id, idle, outcome):
            yield frame
        if not outcome:
            yield "data: [DONE]\n\n"
            return
        results.append(outcome[0])
    if shape.plan.request.include_usage:
        yield shape.chunk([], usage=usage_of(results, shape.plan.choices))
    yield "data: [DONE]\n\n"


async def _stream_choice(client: aioredis.Redis, shape: ResponseShape, index: int, job_id: str, idle: float,
                         outcome: list[dict[str, Any]]) -> AsyncIterator[str]:
    """One choice's frames; appends its result to `outcome` when the job succeeded (else an error frame)."""
    text = ChoiceStream(shape.plan.stops)
    planned = shape.plan.choices[index]
    if planned.echo_text:
        yield shape.chunk([shape.delta(index, planned.echo_text)])
    async for event in follow_job_events(client, job_id, "0-0", idle):
        if event is None:
            yield ": keep-alive\n\n"
        elif event.type == "draft":
            draft = {"index": index, **event.data}
            yield shape.chunk([shape.delta(index, None if shape.chat else "")], **{DRAFT_FIELD: draft})
        elif event.type == "canvas" and "text" in event.data:
            piece = text.add_canvas(str(event.data["text"]))
            if piece:
                yield shape.chunk([shape.delta(index, piece)])
        elif event.type == "done":
            result = event.data.get("result") or {}
            final_text, reason = choice_text(result, shape.plan.stops)
            piece = text.finish(final_text)
            if piece:
                yield shape.chunk([shape.delta(index, piece)])
            logprobs = shape.logprobs_of(result, planned.echo_text)
            yield shape.chunk([shape.delta(index, None, reason=reason, logprobs=logprobs)])
            outcome.append(result)
        elif event.is_terminal:
            error = job_error(event)
            yield f"data: {_error_json(error)}\n\n"


def _error_json(error: ApiError) -> str:
    return json.dumps(openai_error(error.status, error.message, code=error.code))
