"""Reading a job's Redis stream (`job:{id}:events`) as it grows, and the Server-Sent Events built on it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from services.jobs import JobStore
from services.schemas import TERMINAL_EVENTS, TERMINAL_STATUSES

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}
_BATCH = 256


@dataclass(frozen=True)
class StreamEvent:
    id: str
    type: str
    data_json: str

    @property
    def data(self) -> dict[str, Any]:
        return json.loads(self.data_json)

    @property
    def is_terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS


async def follow_job_events(client: aioredis.Redis, job_id: str, after_id: str,
                            idle_seconds: float) -> AsyncIterator[StreamEvent | None]:
    """Yield the job's events after `after_id`, then new ones as they arrive, ending after a terminal event
    or when the job is finished (or gone) with nothing left to read. Yields None after each
    `idle_seconds` without events (callers send keep-alives then)."""
    events_key, job_key = JobStore.events_key(job_id), JobStore.job_key(job_id)
    block_ms: int | None = None  # first read does not block: a finished job's replay ends at once
    finished = False
    while True:
        batches: Any = await client.xread({events_key: after_id}, count=_BATCH, block=block_ms)
        block_ms = int(idle_seconds * 1000)
        entries: list[tuple[str, dict[str, str]]] = batches[0][1] if batches else []
        for entry_id, fields in entries:
            event = StreamEvent(entry_id, fields.get("type", "message"), fields.get("data", "{}"))
            yield event
            after_id = entry_id
            if event.is_terminal:
                return
        if entries:
            continue
        if finished:  # one more read after seeing the job finished drained anything written meanwhile
            return
        status = await client.hget(job_key, "status")
        if status is None or status in TERMINAL_STATUSES:
            finished, block_ms = True, None
            continue
        yield None


def format_event(entry_id: str, event_type: str, data: str) -> str:
    """One SSE frame; `data` is JSON (no newlines: json.dumps never emits them)."""
    return f"id: {entry_id}\nevent: {event_type}\ndata: {data}\n\n"


async def job_event_stream(client: aioredis.Redis, job_id: str, after_id: str,
                           keepalive_seconds: float) -> AsyncIterator[str]:
    """SSE frames of the job's events (`id` = stream id, for Last-Event-ID), a comment line every
    `keepalive_seconds` of silence so proxies keep the connection; the client's disconnect cancels this."""
    yield "retry: 1000\n\n"
    async for event in follow_job_events(client, job_id, after_id, keepalive_seconds):
        yield ": keep-alive\n\n" if event is None else format_event(event.id, event.type, event.data_json)
