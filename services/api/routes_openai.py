"""OpenAI-compatible surface: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`.

Each request becomes an ordinary generate job (same limits, admission, queue, metrics); the route then
follows the job's event stream. With `stream: true` every committed canvas is sent as one delta chunk,
then a final chunk with `finish_reason` and `usage`, then `data: [DONE]`. Diffusion knobs
(`max_denoising_steps`, `entropy_bound`, `t_min`, `t_max`, `confidence_threshold`, `stability_threshold`,
`seed`) go in the body next to the OpenAI fields. If the HTTP client goes away the job still runs to its end.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import Field, ValidationError
from starlette.concurrency import run_in_threadpool

from services.api.deps import AppServices, OwnerDep, ServicesDep
from services.api.errors import ApiError, validation_error_response
from services.api.sse import SSE_HEADERS, StreamEvent, follow_job_events
from services.api.submission import accept_job
from services.job_record import JobRecord
from services.schemas import MAX_PROMPT_CHARS, ChatMessage, DiffusionKnobs, GenerateJobCreate

router = APIRouter(tags=["openai-compatible"])
_FINISH_REASONS = {"stop": "stop", "length": "length"}  # aborted/error end as failed jobs instead


class _OpenAIRequest(DiffusionKnobs):
    model: str | None = Field(default=None, description="must name the served model when given")
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    stream: bool = False
    n: Literal[1] = Field(default=1, description="only one choice per request")
    user: str | None = Field(default=None, max_length=256)


class CompletionCreate(_OpenAIRequest):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)


class ChatCompletionCreate(_OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=512)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000)


@router.get("/v1/models", summary="The served model (OpenAI-compatible)")
def list_models(services: ServicesDep, owner: OwnerDep) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": services.settings.model_name, "object": "model", "created": 0,
                                        "owned_by": "dgserve"}]}


def _as_job(services: AppServices, body: _OpenAIRequest, **text: Any) -> GenerateJobCreate:
    served = services.settings
    if body.model is not None and body.model not in (served.model_name, served.model):
        raise ApiError(404, "model_not_found", f"model {body.model!r} is not served here; this server serves "
                       f"{served.model_name!r} (GET /v1/models)", field="model")
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
    return GenerateJobCreate(max_new_tokens=max_tokens, **text, **body.knob_values())


def _usage(result: dict[str, Any]) -> dict[str, int]:
    usage = result.get("usage") or {}
    prompt, completion = int(usage.get("prompt_tokens", 0)), int(usage.get("generated_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _job_error(event: StreamEvent) -> ApiError:
    error = event.data.get("error") or {}
    status = {"failed": 500, "expired": 504, "cancelled": 409}.get(event.type, 500)
    return ApiError(status, f"job_{event.type}", str(error.get("message") or f"the job was {event.type}"))


class _Shape:
    """How one endpoint words its responses (text completion vs chat)."""

    def __init__(self, chat: bool, record: JobRecord, model: str):
        self.chat, self.model, self.created = chat, model, int(record.created_at)
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{record.id}"

    def _envelope(self, choice: dict[str, Any], chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [choice]}

    def complete(self, result: dict[str, Any]) -> dict[str, Any]:
        reason = _FINISH_REASONS.get(str(result.get("finish_reason")), "stop")
        text = str(result.get("text", ""))
        content = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
        body = self._envelope({"index": 0, **content, "finish_reason": reason}, chunk=False)
        return {**body, "usage": _usage(result)}

    def chunk(self, text: str | None, reason: str | None = None, usage: dict | None = None) -> str:
        if self.chat:
            content: dict[str, Any] = {"delta": {} if text is None else {"role": "assistant", "content": text}}
        else:
            content = {"text": text or ""}
        body = self._envelope({"index": 0, **content, "finish_reason": reason}, chunk=True)
        return f"data: {json.dumps({**body, 'usage': usage} if usage else body)}\n\n"


async def _stream(request: Request, shape: _Shape, job_id: str, idle: float) -> AsyncIterator[str]:
    async for event in follow_job_events(request.app.state.async_redis, job_id, "0-0", idle):
        if event is None:
            yield ": keep-alive\n\n"
        elif event.type == "canvas":
            yield shape.chunk(str(event.data.get("text", "")))
        elif event.type == "done":
            result = event.data.get("result") or {}
            reason = _FINISH_REASONS.get(str(result.get("finish_reason")), "stop")
            yield shape.chunk(None, reason=reason, usage=_usage(result))
        elif event.is_terminal:
            error = _job_error(event)
            yield f"data: {json.dumps({'error': {'code': error.code, 'message': error.message}})}\n\n"
    yield "data: [DONE]\n\n"


async def _run(request: Request, services: AppServices, owner: str, body: _OpenAIRequest, chat: bool,
               **text: Any) -> Any:
    try:
        job = _as_job(services, body, **text)
    except ValidationError as exc:
        return validation_error_response([dict(error) for error in exc.errors()])
    record, _ = await run_in_threadpool(accept_job, services, job, owner)
    shape = _Shape(chat, record, services.settings.model_name)
    idle = services.settings.sse_keepalive_seconds
    if body.stream:
        return StreamingResponse(_stream(request, shape, record.id, idle), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    deadline = time.monotonic() + services.settings.job_deadline_seconds + 60
    async for event in follow_job_events(request.app.state.async_redis, record.id, "0-0", idle):
        if event is not None and event.type == "done":
            return shape.complete(event.data.get("result") or {})
        if event is not None and event.is_terminal:
            raise _job_error(event)
        if time.monotonic() > deadline:
            break
    raise ApiError(504, "job_timeout", f"job {record.id} did not finish in time; see GET /v1/jobs/{record.id}")


@router.post("/v1/completions", summary="Text completion (OpenAI-compatible)")
async def completions(body: CompletionCreate, request: Request, services: ServicesDep, owner: OwnerDep) -> Any:
    return await _run(request, services, owner, body, chat=False, prompt=body.prompt)


@router.post("/v1/chat/completions", summary="Chat completion (OpenAI-compatible)")
async def chat_completions(body: ChatCompletionCreate, request: Request, services: ServicesDep,
                           owner: OwnerDep) -> Any:
    return await _run(request, services, owner, body, chat=True, messages=body.messages)
