"""Batch API files in Redis: `dgserve:file:{id}` hashes holding the bytes and their metadata.

Same TTL rules as jobs: a file lives `result_ttl_seconds` after its creation (or `expires_after.seconds`
when the upload asks for less); a batch's output and error files live as long as the finished batch.
A file belongs to the API key that created it (or wrote the batch); other keys see 404.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, cast

import redis

FILE_PURPOSES = ("batch", "batch_output")


@dataclass(frozen=True)
class StoredFile:
    id: str
    owner: str
    purpose: str
    filename: str
    bytes: int
    created_at: int
    expires_at: int

    def to_public(self) -> dict[str, Any]:
        """OpenAI's `file` object."""
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "expires_at": self.expires_at, "filename": self.filename, "purpose": self.purpose,
                "status": "processed", "status_details": None}


class FileStore:
    """Files of the Batch API; takes a `redis.Redis` created with `decode_responses=True`."""

    def __init__(self, client: redis.Redis, default_ttl_seconds: int):
        self.redis = client
        self.default_ttl_seconds = default_ttl_seconds

    @staticmethod
    def key(file_id: str) -> str:
        return f"dgserve:file:{file_id}"

    def create(self, owner: str, purpose: str, filename: str, content: str, ttl_seconds: int | None = None,
               file_id: str | None = None) -> StoredFile:
        """Store `content` (UTF-8 text) and return its metadata."""
        now = int(time.time())
        ttl = self.default_ttl_seconds if ttl_seconds is None else min(ttl_seconds, self.default_ttl_seconds)
        stored = StoredFile(id=file_id or f"file-{uuid.uuid4().hex}", owner=owner, purpose=purpose,
                            filename=filename, bytes=len(content.encode("utf-8")), created_at=now,
                            expires_at=now + ttl)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.key(stored.id), mapping={
            "owner": owner, "purpose": purpose, "filename": filename, "bytes": stored.bytes,
            "created_at": now, "expires_at": stored.expires_at, "content": content})
        pipe.expire(self.key(stored.id), ttl)
        pipe.execute()
        return stored

    def get(self, file_id: str, owner: str) -> StoredFile | None:
        """The file's metadata if it exists and belongs to `owner`."""
        raw = cast(dict[str, str], self.redis.hgetall(self.key(file_id))) if len(file_id) <= 80 else {}
        if not raw or raw.get("owner") != owner:
            return None
        return StoredFile(id=file_id, owner=owner, purpose=raw["purpose"], filename=raw["filename"],
                          bytes=int(raw["bytes"]), created_at=int(raw["created_at"]),
                          expires_at=int(raw["expires_at"]))

    def content(self, file_id: str) -> str:
        return cast(str, self.redis.hget(self.key(file_id), "content") or "")

    def delete(self, file_id: str) -> bool:
        return bool(self.redis.delete(self.key(file_id)))
