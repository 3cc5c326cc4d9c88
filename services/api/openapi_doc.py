"""The OpenAPI document served at `/openapi.json`, made exact: the contract a client generator or a schema
fuzzer reads (tests/services/test_openapi_fuzz.py holds the server to it).

FastAPI documents what a route declares. What every route shares is added here, in one place, rather
than repeated on each decorator (the OpenAI-compatible routes included):

* the one error shape (`ErrorBody`) for every error status a route can answer: 401 with
  `WWW-Authenticate` on every `/v1` route (when the server has API keys), 404 for routes that take a job id
  or name a model, 413 / 422 / 429 (`Retry-After`) for requests with a body or parameters, 503
  (`Retry-After`) where the job store is read, 500 everywhere (the shape of an unexpected failure);
* security as optional (`[{}, {"HTTPBearer": []}]`): whether a key is needed is the deployment's choice;
* FastAPI's own validation-error schemas removed: a 422 is an `ErrorBody` like every other error.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from services.openai.errors import is_openai_path

ERROR_SCHEMA = {"$ref": "#/components/schemas/ErrorBody"}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying",
                               "schema": {"type": "integer", "minimum": 0}}}
WWW_AUTHENTICATE = {"WWW-Authenticate": {"description": "`Bearer`: send `Authorization: Bearer <key>`",
                                         "schema": {"type": "string"}}}
# One Server-Sent Event as OpenAPI 3.1 tools read a `text/event-stream` schema (each event, not the stream).
SSE_EVENT_SCHEMA: dict[str, Any] = {"type": "object", "properties": {
    "event": {"type": "string"}, "data": {"type": "string", "description": "JSON"}, "id": {"type": "string"},
    "retry": {"type": "integer"}}}
OPENAI_ERROR_SCHEMA = {"$ref": "#/components/schemas/OpenAIErrorBody"}
ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "invalid parameter (OpenAI routes): `error.param` names it",
    401: "missing or unknown API key (only when the server is configured with API keys)",
    404: "no such job (or another API key's job), or a model this server does not serve",
    409: "the job already finished (cancel) or was cancelled (OpenAI routes)",
    413: "the body is over the server's max_body_bytes",
    422: "invalid request: `error.field` names the offending field",
    429: "the model queue is full (`queue_full`), the key is past its rate (`rate_limited`) or at one of its "
         "own limits (`key_queued_limit`, `key_tokens_limit`)",
    500: "an unexpected failure (the job, if accepted, is unaffected)",
    503: "the job store (Redis) or the model's tokenizer is unavailable; retry after `Retry-After`",
    504: "the job did not finish within its deadline (OpenAI routes wait for it)",
}
_HEADERS_OF = {401: WWW_AUTHENTICATE, 429: RETRY_AFTER, 503: RETRY_AFTER}
# The routes that read the job store (503 when it is down) and those that may name a missing resource.
_STORE_PATHS = ("/v1/jobs", "/v1/completions", "/v1/chat/completions")
_OPENAI_JOB_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/fim/completions")


def error_response(status: int, schema: dict[str, Any] = ERROR_SCHEMA) -> dict[str, Any]:
    """The OpenAPI response object of one error status: `ErrorBody` (OpenAI routes: `OpenAIErrorBody`),
    with its headers."""
    response: dict[str, Any] = {"description": ERROR_DESCRIPTIONS[status],
                                "content": {"application/json": {"schema": schema}}}
    if status in _HEADERS_OF:
        response["headers"] = _HEADERS_OF[status]
    return response


def _error_statuses(path: str, method: str, operation: dict[str, Any]) -> set[int]:
    statuses = {500}
    if path.startswith("/v1/"):
        statuses.add(401)
    if operation.get("parameters") or operation.get("requestBody"):
        statuses.add(422)
    if method in ("post", "put", "patch"):
        statuses |= {413, 429}
    if path.startswith(_STORE_PATHS):
        statuses.add(503)
    if "{job_id}" in path:
        statuses.add(404)
    if path in _OPENAI_JOB_PATHS:
        statuses |= {404, 409, 504}
    return statuses


def _openai_error_statuses(path: str, method: str, operation: dict[str, Any]) -> set[int]:
    """OpenAI routes (services/openai/errors.py): invalid input is 400, not 422; Redis is read everywhere."""
    statuses = {401, 500, 503}
    if operation.get("parameters") or operation.get("requestBody"):
        statuses.add(400)
    if method in ("post", "put", "patch"):
        statuses |= {413, 429}
    if "{" in path or path in _OPENAI_JOB_PATHS or path.startswith(("/v1/batches", "/v1/fim/")):
        statuses.add(404)
    if path in _OPENAI_JOB_PATHS or path.endswith("/cancel") or path.startswith("/v1/fim/"):
        statuses |= {409, 504}
    return statuses


def _document_openai_stream(operation: dict[str, Any]) -> None:
    # `stream: true` answers Server-Sent Events (`data: {chunk}` lines, then `data: [DONE]`).
    ok = operation["responses"].setdefault("200", {"description": "Successful Response"})
    ok.setdefault("content", {})["text/event-stream"] = {"schema": SSE_EVENT_SCHEMA}


def _without_null(parameter: dict[str, Any]) -> None:
    """A header or query value is text, never JSON null: an optional parameter is one that may be absent.
    FastAPI writes `str | None` as `anyOf [string, null]`; keep the string branch (with keys such as
    `pattern` that sit beside the `anyOf`)."""
    schema = parameter.get("schema", {})
    branches = [branch for branch in schema.get("anyOf", []) if branch.get("type") != "null"]
    if len(branches) == 1 and len(schema["anyOf"]) == 2:
        rest = {key: value for key, value in schema.items() if key != "anyOf"}
        parameter["schema"] = {**branches[0], **rest}


def exact_openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document of `app` with the shared error statuses, headers and optional security added."""
    document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            if is_openai_path(path):
                for status in _openai_error_statuses(path, method, operation):
                    responses[str(status)] = error_response(status, OPENAI_ERROR_SCHEMA)
            else:
                for status in _error_statuses(path, method, operation):
                    responses[str(status)] = error_response(status)
            for parameter in operation.get("parameters", []):
                _without_null(parameter)
            if "security" in operation:
                operation["security"] = [{}, *operation["security"]]
            if path in _OPENAI_JOB_PATHS:
                _document_openai_stream(operation)
    schemas = document.get("components", {}).get("schemas", {})
    for fastapi_only in ("HTTPValidationError", "ValidationError"):
        schemas.pop(fastapi_only, None)
    return document


def install_exact_openapi(app: FastAPI) -> None:
    """Serve `exact_openapi(app)` (built once, on the first request for it) at `/openapi.json`."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = exact_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
