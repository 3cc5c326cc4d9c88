"""The Batch API: `POST /v1/batches`, `GET /v1/batches/{id}`, `GET /v1/batches`,
`POST /v1/batches/{id}/cancel`. Each input line becomes ordinary jobs on the batch queue
(`services.openai.batch_lines`); the batch's state follows them (`services.openai.batches`)."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from services.api.deps import AppServices, OwnerDep, ServicesDep
from services.api.errors import ApiError
from services.api.routes_files import file_store, owned_file
from services.openai.batch_lines import submit_lines
from services.openai.batches import BatchStore, batch_public
from services.openai.errors import error_responses
from services.openai.translate import ENDPOINT_PATHS
from services.schemas import FieldValueError, WireModel

router = APIRouter(prefix="/v1/batches", tags=["openai-batch"])
_WINDOW = re.compile(r"^(\d{1,6})([smh])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}
MAX_WINDOW_SECONDS = 7 * 24 * 3600


class BatchCreate(WireModel):
    input_file_id: str = Field(max_length=80)
    endpoint: str = Field(description="/v1/completions, /v1/chat/completions or /v1/fim/completions")
    completion_window: str = Field(default="24h", description="24h (OpenAI's value), or N followed by s, m or h")
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    output_expires_after: dict[str, Any] | None = None

    def window_seconds(self) -> int:
        match = _WINDOW.match(self.completion_window)
        seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)] if match else 0
        if not 0 < seconds <= MAX_WINDOW_SECONDS:
            raise FieldValueError("completion_window", "must be like 24h (or N followed by s, m or h, up to 7 "
                                  f"days), got {self.completion_window!r}")
        return seconds


def batch_store(services: AppServices) -> BatchStore:
    return BatchStore(services, file_store(services))


def _owned(services: AppServices, batch_id: str, owner: str) -> dict[str, str]:
    record = batch_store(services).get(batch_id, owner)
    if record is None:
        raise ApiError(404, "batch_not_found", f"batch {batch_id[:80]!r} does not exist (or belongs to another "
                       "API key)", field="batch_id")
    return record


def _create(services: AppServices, owner: str, body: BatchCreate) -> dict[str, Any]:
    if body.endpoint not in ENDPOINT_PATHS:
        raise ApiError(422, "invalid_request", f"endpoint must be one of {', '.join(ENDPOINT_PATHS)}",
                       field="endpoint")
    try:
        window = body.window_seconds()
    except FieldValueError as exc:
        raise ApiError(422, "invalid_request", str(exc), field=exc.field) from exc
    owned_file(services, body.input_file_id, owner)
    content = file_store(services).content(body.input_file_id)
    line_count = sum(1 for line in content.splitlines() if line.strip())
    if not 0 < line_count <= services.settings.max_batch_lines:
        raise ApiError(422, "invalid_request", f"the input file has {line_count} requests; a batch takes 1 to "
                       f"{services.settings.max_batch_lines} (max_batch_lines)", field="input_file_id")
    store = batch_store(services)
    batch_id = store.new_id()
    entries = submit_lines(services, owner, batch_id, body.endpoint, content, window)
    fields = {"endpoint": body.endpoint, "input_file_id": body.input_file_id,
              "completion_window": body.completion_window, "metadata": json.dumps(body.metadata)}
    record = store.create(batch_id, owner, fields, entries, window)
    services.store.confirm_replicated()  # the batch and all its lines on a replica before the answer (or a 503)
    return batch_public(store.refresh(record))


@router.post("", summary="Create a batch from an uploaded JSONL file",
             responses=error_responses(400, 401, 404, 503))
async def create_batch(body: BatchCreate, services: ServicesDep, owner: OwnerDep) -> dict[str, Any]:
    return await run_in_threadpool(_create, services, owner, body)


@router.get("/{batch_id}", summary="A batch, its status and request_counts", responses=error_responses(401, 404))
def get_batch(batch_id: str, services: ServicesDep, owner: OwnerDep) -> dict[str, Any]:
    return batch_public(batch_store(services).refresh(_owned(services, batch_id, owner)))


@router.get("", summary="This key's batches, newest first", responses=error_responses(401))
def list_batches(services: ServicesDep, owner: OwnerDep, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                 after: Annotated[str | None, Query(max_length=80)] = None) -> dict[str, Any]:
    data = [batch_public(record) for record in batch_store(services).list_for(owner, limit + 1, after)]
    page = data[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(data) > limit}


@router.post("/{batch_id}/cancel", summary="Cancel a batch; finished lines keep their results",
             responses=error_responses(401, 404, 409))
def cancel_batch(batch_id: str, services: ServicesDep, owner: OwnerDep) -> dict[str, Any]:
    store = batch_store(services)
    return batch_public(store.cancel(store.refresh(_owned(services, batch_id, owner))))
