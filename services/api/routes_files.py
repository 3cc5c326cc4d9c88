"""Batch API files: `POST /v1/files` (purpose `batch`, a JSONL upload), `GET /v1/files/{id}`,
`GET /v1/files/{id}/content`, `DELETE /v1/files/{id}`. Stored in Redis under the uploader's key
(`services.openai.files`); another key's file is 404."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from services.api.deps import AppServices, OwnerDep, ServicesDep
from services.api.errors import ApiError
from services.openai.errors import error_responses
from services.openai.files import FileStore, StoredFile

router = APIRouter(prefix="/v1/files", tags=["openai-batch"])


def file_store(services: AppServices) -> FileStore:
    return FileStore(services.store.redis, services.settings.result_ttl_seconds)


def owned_file(services: AppServices, file_id: str, owner: str) -> StoredFile:
    stored = file_store(services).get(file_id, owner)
    if stored is None:
        raise ApiError(404, "file_not_found", f"file {file_id[:80]!r} does not exist (or belongs to another "
                       "API key)", field="file_id")
    return stored


def _expiry_seconds(value: Any) -> int | None:
    if value in (None, ""):
        return None
    try:
        seconds = int(value)
    except (TypeError, ValueError) as exc:
        raise ApiError(422, "invalid_request", "expires_after[seconds] must be an integer",
                       field="expires_after") from exc
    if seconds < 1:
        raise ApiError(422, "invalid_request", "expires_after[seconds] must be positive", field="expires_after")
    return seconds


@router.post("", summary="Upload a batch input file (JSONL)", responses=error_responses(400, 401, 413, 503))
async def upload_file(request: Request, services: ServicesDep, owner: OwnerDep) -> dict[str, Any]:
    form = await request.form(max_files=1, max_fields=8, max_part_size=services.settings.max_batch_file_bytes)
    upload, purpose = form.get("file"), form.get("purpose")
    if purpose != "batch":
        raise ApiError(422, "invalid_request", f"purpose must be 'batch' (got {purpose!r})", field="purpose")
    if not isinstance(upload, UploadFile):
        raise ApiError(422, "invalid_request", "file: send the JSONL file as the multipart part `file`",
                       field="file")
    data = await upload.read()
    limit = services.settings.max_batch_file_bytes
    if len(data) > limit:
        raise ApiError(413, "file_too_large", f"file is {len(data)} bytes; this server accepts at most {limit} "
                       "(max_batch_file_bytes)", field="file")
    try:
        content = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(422, "invalid_request", f"file must be UTF-8 JSONL ({exc})", field="file") from exc
    ttl = _expiry_seconds(form.get("expires_after[seconds]"))
    stored = await run_in_threadpool(file_store(services).create, owner, "batch", upload.filename or "input.jsonl",
                                     content, ttl)
    return stored.to_public()


@router.get("/{file_id}", summary="A file's metadata", responses=error_responses(401, 404))
def get_file(file_id: str, services: ServicesDep, owner: OwnerDep) -> dict[str, Any]:
    return owned_file(services, file_id, owner).to_public()


@router.get("/{file_id}/content", summary="A file's bytes (JSONL)", responses=error_responses(401, 404),
            response_class=Response)
def file_content(file_id: str, services: ServicesDep, owner: OwnerDep) -> Response:
    owned_file(services, file_id, owner)
    return Response(file_store(services).content(file_id), media_type="application/jsonl")


@router.delete("/{file_id}", summary="Delete a file", responses=error_responses(401, 404))
def delete_file(file_id: str, services: ServicesDep, owner: OwnerDep) -> dict[str, Any]:
    owned_file(services, file_id, owner)
    deleted = file_store(services).delete(file_id)
    return {"id": file_id, "object": "file", "deleted": deleted}
