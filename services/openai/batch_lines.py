"""Batch lines: each JSONL line of a batch's input file becomes ordinary jobs, validated and planned exactly
as the synchronous route would do it (`services.openai.translate`), so a bad line gets the same error.

A line is `{"custom_id", "method": "POST", "url": <the batch's endpoint>, "body": {...}}`. Its jobs are
created as batch lines (`JobStore.create(batch_id=...)`: admitted with the batch, the batch's completion
window as deadline) and published to the batch queue (`JobQueue.submit(batch=True)`), which workers read
only when the interactive queue is empty.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import ValidationError

from services.api.deps import AppServices
from services.api.errors import ApiError
from services.api.submission import check_limits
from services.openai.errors import translate_error
from services.openai.translate import ENDPOINT_PATHS, REQUEST_MODELS, Plan, invalid, plan_request


@dataclass
class LineEntry:
    """One input line as the batch stores it: its jobs, or the error that refused it."""

    custom_id: str | None
    body: dict[str, Any] | None = None
    job_ids: list[str] = field(default_factory=list)
    error: dict[str, Any] | None = None  # {"status_code", "body"}: the answer the route would have given

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> LineEntry:
        return cls(**json.loads(text))


class LineError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str = "invalid_request"):
        super().__init__(message)
        self.status, self.body = translate_error(status, {"error": {"code": code, "message": message,
                                                                    "field": param}})


def _custom_id_of(raw: str) -> str | None:
    """The line's custom_id if it has a usable one (error lines are keyed by it too)."""
    try:
        line = json.loads(raw)
    except ValueError:
        return None
    custom_id = line.get("custom_id") if isinstance(line, dict) else None
    return custom_id if isinstance(custom_id, str) else None


def _parse(raw: str, number: int, endpoint_path: str, seen: set[str]) -> tuple[str, dict[str, Any]]:
    try:
        line = json.loads(raw)
    except ValueError as exc:
        raise LineError(400, f"line {number} is not valid JSON ({exc})", "line") from exc
    if not isinstance(line, dict):
        raise LineError(400, f"line {number} must be a JSON object", "line")
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > 512:
        raise LineError(400, f"line {number}: custom_id must be a non-empty string", "custom_id")
    if custom_id in seen:
        raise LineError(400, f"line {number}: custom_id {custom_id!r} is not unique in this file", "custom_id")
    seen.add(custom_id)
    if line.get("method", "POST") != "POST":
        raise LineError(400, f"line {number}: method must be POST", "method")
    if line.get("url") != endpoint_path:
        raise LineError(400, f"line {number}: url must be the batch's endpoint {endpoint_path}", "url")
    if not isinstance(line.get("body"), dict):
        raise LineError(400, f"line {number}: body must be a JSON object", "body")
    return custom_id, line["body"]


def plan_line(services: AppServices, endpoint_path: str, body: dict[str, Any]) -> Plan:
    """The line's plan, as the synchronous route validates and plans it (ApiError when refused)."""
    endpoint = ENDPOINT_PATHS[endpoint_path]
    try:
        request = REQUEST_MODELS[endpoint].model_validate(body)
    except ValidationError as exc:
        raise invalid(exc) from exc
    if request.stream:
        raise ApiError(422, "invalid_request", "stream: batch lines cannot stream", field="stream")
    return plan_request(endpoint, request, services.settings, lambda ids: services.limits.tokenizer().decode(ids))


def _submit(services: AppServices, owner: str, batch_id: str, plan: Plan, deadline_seconds: float) -> list[str]:
    for choice in plan.choices:  # every choice within limits before any is stored: a line runs whole or not
        check_limits(services, choice.job)
    job_ids = []
    for choice in plan.choices:
        created = services.store.create(choice.job, owner=owner, batch_id=batch_id,
                                        deadline_seconds=deadline_seconds)
        try:
            services.queue.submit(created.job_id, batch=True)
        except Exception as exc:  # broker errors come in many types; the job must not stay queued forever
            services.store.fail(created.job_id, "enqueue_failed", "the job could not be handed to the queue")
            raise ApiError(503, "enqueue_failed", "the job queue is unavailable; retry later") from exc
        services.metrics.job_submitted(choice.job.kind)
        job_ids.append(created.job_id)
    return job_ids


def submit_lines(services: AppServices, owner: str, batch_id: str, endpoint_path: str, content: str,
                 deadline_seconds: float) -> list[LineEntry]:
    """Turn every non-blank line into jobs; a line that fails to parse, validate or pass the limits keeps
    its error instead and the rest of the batch runs."""
    entries: list[LineEntry] = []
    seen: set[str] = set()
    for number, raw in enumerate(content.splitlines(), start=1):
        if not raw.strip():
            continue
        custom_id = _custom_id_of(raw)
        try:
            custom_id, body = _parse(raw, number, endpoint_path, seen)
            plan = plan_line(services, endpoint_path, body)
            entries.append(LineEntry(custom_id, body, _submit(services, owner, batch_id, plan, deadline_seconds)))
        except LineError as exc:
            entries.append(LineEntry(custom_id, error={"status_code": exc.status, "body": exc.body}))
        except ApiError as exc:
            status, error_body = translate_error(exc.status, {"error": {"code": exc.code, "message": exc.message,
                                                                        "field": exc.field}})
            entries.append(LineEntry(custom_id, error={"status_code": status, "body": error_body}))
    return entries
