"""The OpenAI error shape, `{"error": {"message", "type", "param", "code"}}`, on every OpenAI route.

Services raise errors in dgserve's own shape (`{"error": {"code", "message", "field"}}`, services/api/errors.py)
from many places: auth dependencies, the body-size middleware, request validation, admission, the routes.
Rather than catch each, `OpenAIErrorShapeMiddleware` rewrites any JSON error answer on an OpenAI path into
the OpenAI shape with `translate_error`, which the Batch API also uses for the lines that fail, so a bad
batch line gets exactly the error the synchronous route gives.

Statuses are the ones the official SDK maps to its exception classes: 400 BadRequestError (invalid
parameters: OpenAI answers these with 400, so dgserve's 422 `invalid_request` becomes 400 here),
401 AuthenticationError, 404 NotFoundError, 409 ConflictError, 413, 422 UnprocessableEntityError
(idempotency conflicts), 429 RateLimitError, 500+ InternalServerError (503 with Retry-After).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import redis
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)
OPENAI_PATH_PREFIXES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/fim/", "/v1/files",
                        "/v1/batches")
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
          413: "invalid_request_error", 415: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 503: "service_unavailable_error", 504: "timeout_error"}
# Job fields whose OpenAI name differs (the job is built from the OpenAI request).
_PARAM_NAMES = {"max_new_tokens": "max_tokens", "prompt_token_ids": "prompt"}


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, not_found_error, "
                                  "conflict_error, rate_limit_error, server_error, service_unavailable_error")
    param: str | None = Field(default=None, description="the offending request field, e.g. `stop` or "
                                                         "`messages[1].content[0]`")
    code: str | None = Field(default=None, description="machine-readable, e.g. model_not_found, queue_full")


class OpenAIErrorBody(BaseModel):
    """Every non-2xx answer of the OpenAI routes."""

    error: OpenAIErrorDetail


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PATH_PREFIXES)


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The OpenAI error body for `status` (type derived from the status)."""
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _openai_param(field: str | None) -> str | None:
    if field is None:
        return None
    head, sep, rest = field.partition("[")
    return _PARAM_NAMES.get(head, head) + sep + rest


def translate_error(status: int, body: Any) -> tuple[int, dict[str, Any]]:
    """(status, body) of a dgserve error answer → the OpenAI answer. A body already in OpenAI's shape is kept."""
    detail = body.get("error") if isinstance(body, dict) else None
    if not isinstance(detail, dict):
        return status, openai_error(status, str(body)[:500] or "error")
    if "type" in detail:
        return status, body
    code, field = detail.get("code"), detail.get("field")
    message = str(detail.get("message", "error"))
    param = _openai_param(field)
    if field and param != field:
        message = message.replace(field.partition("[")[0], param.partition("[")[0] if param else "")
    if status == 422 and code == "invalid_request":
        status = 400
    return status, openai_error(status, message, param, code)


class OpenAIErrorShapeMiddleware:
    """Pure ASGI: on OpenAI paths, buffer JSON error answers (status >= 400) and rewrite them with
    `translate_error`. Successful answers and event streams pass through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_openai_path(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        held: dict[str, Any] = {}

        async def rewrite(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                if message["status"] >= 400 and headers.get(b"content-type", b"").startswith(b"application/json"):
                    held.update(start=message, body=b"")
                    return
                held["sent_start"] = True
            elif message["type"] == "http.response.body" and "start" in held:
                held["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return
                await _send_translated(send, held["start"], held["body"])
                return
            await send(message)

        try:
            await self.app(scope, receive, rewrite)
        except Exception as exc:  # unhandled: answer in OpenAI's shape if nothing was sent yet
            if held.get("sent_start"):
                raise
            logger.exception("unhandled error on %s", scope.get("path"))
            await _send_unhandled(send, exc)


async def _send_unhandled(send: Send, exc: Exception) -> None:
    """500, or 503 + Retry-After when Redis (job store and broker) is unreachable."""
    unavailable = isinstance(exc, redis.ConnectionError | redis.TimeoutError)
    headers = [(b"content-type", b"application/json")]
    if unavailable:
        headers.append((b"retry-after", b"5"))
        body = openai_error(503, "the job store is unavailable; retry later", code="unavailable")
    else:
        body = openai_error(500, "internal server error", code="internal_error")
    start = {"type": "http.response.start", "status": 503 if unavailable else 500, "headers": headers}
    await _send_translated(send, start, json.dumps(body).encode())


async def _send_translated(send: Send, start: Message, raw: bytes) -> None:
    try:
        decoded = json.loads(raw)
    except ValueError:
        decoded = raw.decode("utf-8", "replace")
    status, body = translate_error(start["status"], decoded)
    data = json.dumps(body).encode()
    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
    headers.append((b"content-length", str(len(data)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries: the OpenAI error shape for each status."""
    meaning = {400: "invalid parameter (param names it)", 401: "missing or unknown API key",
               404: "unknown model, file, batch or job (or another key's)", 409: "the job was cancelled or the "
               "batch is finished", 413: "body over DGSERVE_MAX_BODY_BYTES", 422: "Idempotency-Key reused with "
               "another body", 429: "queue full, key rate or key limit (Retry-After)", 500: "the job failed",
               503: "Redis, the queue or the tokenizer unavailable (Retry-After)", 504: "the job expired"}
    return {status: {"model": OpenAIErrorBody, "description": meaning.get(status, "error")} for status in statuses}
