"""One error shape for every non-2xx answer: `{"error": {"code", "message", "field"?}}` (`ErrorBody`)."""

from __future__ import annotations

import logging
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from services.schemas import ErrorBody, FieldValueError

logger = logging.getLogger(__name__)

# Discriminator tags of the job union appear in pydantic locations; clients never wrote them.
_UNION_TAGS = frozenset({"generate", "edit"})
# Routes that create jobs: their refusals count in dgserve_api_jobs_rejected_total.
SUBMIT_PATHS = frozenset({"/v1/jobs", "/v1/completions", "/v1/chat/completions"})
_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 409: "conflict", 413: "body_too_large", 415: "unsupported_media_type",
               422: "invalid_request", 429: "queue_full", 503: "unavailable"}


class ApiError(Exception):
    """Raise from a route to answer `status` with the one error shape (and optional headers)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.headers = headers or {}


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorBody.model_validate({"error": {"code": code, "message": message, "field": field}})
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


def field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    """('body', 'edit', 'edits', 2, 'start') → 'edits[2].start'."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "header", "path"):
        parts = parts[1:]
    if parts and parts[0] in _UNION_TAGS:
        parts = parts[1:]
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


def describe_validation_error(error: dict[str, Any]) -> tuple[str, str]:
    """(field, message) of one pydantic error, preferring the field a `FieldValueError` names."""
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, FieldValueError):
        return cause.field, str(cause)
    field = field_path(error.get("loc", ()))
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    if error.get("type") == "invalid_kind":  # the union's discriminator: its location is the body itself
        return "kind", f"kind: {message}"
    if error.get("type") == "json_invalid":
        return "body", f"body is not valid JSON ({message})"
    return field, f"{field}: {message}"


def validation_error_response(errors: list[dict[str, Any]]) -> JSONResponse:
    described = [describe_validation_error(error) for error in errors] or [("body", "invalid request")]
    message = "; ".join(text for _, text in described[:5])
    if len(described) > 5:
        message += f"; and {len(described) - 5} more"
    return error_response(422, "invalid_request", message, field=described[0][0])


def store_unavailable(retry_after_seconds: int) -> ApiError:
    """503 for a job store (Redis) that is down, restarting or stalled: the client should retry."""
    return ApiError(503, "store_unavailable", f"the job store (Redis) is unavailable; retry in "
                    f"{retry_after_seconds} s", headers={"Retry-After": str(retry_after_seconds)})


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        on_submit = request.url.path in SUBMIT_PATHS and request.method == "POST"
        metrics = getattr(request.app.state, "metrics", None)
        if on_submit and metrics is not None:
            metrics.job_rejected("invalid")
        return validation_error_response(list(exc.errors()))

    @app.exception_handler(redis.RedisError)
    async def _store_down(request: Request, exc: redis.RedisError) -> JSONResponse:
        # One line, no traceback: an outage answers many requests; a redis-py timeout or refused connection
        # is the expected failure, not a bug.
        logger.warning("%s %s: job store unavailable (%s: %s)", request.method, request.url.path,
                       type(exc).__name__, exc)
        services = getattr(request.app.state, "services", None)
        retry_after = services.settings.retry_after_seconds if services is not None else 5
        error = store_unavailable(retry_after)
        return error_response(error.status, error.code, error.message, headers=error.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette still logs the traceback; the client gets the one error shape, never text/plain.
        return error_response(500, "internal_error", "the server failed to answer this request; see its log")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI could not decode the body (e.g. not UTF-8): as for bad JSON
            return error_response(422, "invalid_request", f"body is not valid JSON ({exc.detail})", field="body")
        code = _HTTP_CODES.get(exc.status_code, "error")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(request))
        return error_response(exc.status_code, code, str(exc.detail), headers=headers)


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (Starlette's 405 names only the first route's)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"}) if isinstance(route, Route) else (None, None)
        if match is not None and match != Match.NONE:
            methods |= route.methods or set()
    return sorted(methods)
