"""Python client of the dgserve job API, sync (`DgserveClient`) and async (`AsyncDgserveClient`).

    with DgserveClient("http://127.0.0.1:8000", api_key="...") as client:
        job = client.generate("Write a haiku", max_new_tokens=64)
        for event in client.events(job.id):
            print(event.event, event.data)
        print(client.wait(job.id).result)

Every non-2xx answer raises `DgserveError` carrying the server's error body (code, message, field).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from services.schemas import TERMINAL_EVENTS, TERMINAL_STATUSES, JobAccepted, JobPublic

DEFAULT_URL = "http://127.0.0.1:8000"
EVENTS_READ_SLICE_SECONDS = 2.0  # longest single read of an event stream when the caller set a timeout


class DgserveError(Exception):
    """A refused request: `status` (HTTP), `code`, `message`, `field`, and `retry_after` for 429/503."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 retry_after: float | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.field, self.retry_after = status, code, message, field, retry_after


@dataclass(frozen=True)
class JobEvent:
    """One Server-Sent Event of a job: `id` (pass back to resume), `event` type, decoded `data`."""

    id: str
    event: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def is_terminal(self) -> bool:
        return self.event in TERMINAL_EVENTS


def _raise_for_error(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        detail = response.json()["error"]
        code, message, field_name = detail["code"], detail["message"], detail.get("field")
    except (ValueError, KeyError, TypeError):
        code, message, field_name = "http_error", response.text[:500] or response.reason_phrase, None
    retry_after = response.headers.get("Retry-After")
    raise DgserveError(response.status_code, code, message, field_name,
                       float(retry_after) if retry_after and retry_after.isdigit() else None)


def parse_sse(lines: Iterable[str]) -> Iterator[JobEvent]:
    """Turn SSE lines into events (comments, `retry:` hints and frames without `event:` are skipped)."""
    fields: dict[str, str] = {}
    for line in lines:
        if line == "":
            if "event" in fields:
                yield JobEvent(fields.get("id", ""), fields["event"], json.loads(fields.get("data") or "{}"))
            fields = {}
        elif not line.startswith(":") and ":" in line:
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def generate_body(prompt: str | None, messages: list[dict] | None, params: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"kind": "generate", **params}
    if prompt is not None:
        body["prompt"] = prompt
    if messages is not None:
        body["messages"] = messages
    return body


def edit_body(document: str, edits: list[dict[str, Any]], params: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "edit", "document": document, "edits": edits, **params}


class DgserveClient:
    """Blocking client (httpx). Safe to share between threads."""

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None):
        self.http = httpx.Client(base_url=base_url, headers=_headers(api_key), timeout=timeout, transport=transport)

    def __enter__(self) -> DgserveClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def submit(self, body: dict[str, Any], idempotency_key: str | None = None) -> JobAccepted:
        """POST /v1/jobs with a raw body (see `services.schemas.JobCreate`)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        response = self.http.post("/v1/jobs", json=body, headers=headers)
        _raise_for_error(response)
        return JobAccepted.model_validate(response.json())

    def generate(self, prompt: str | None = None, messages: list[dict] | None = None,
                 idempotency_key: str | None = None, **params: Any) -> JobAccepted:
        """Submit a generate job; `params` are sampler fields (max_new_tokens, seed, stream_drafts, ...)."""
        return self.submit(generate_body(prompt, messages, params), idempotency_key)

    def edit(self, document: str, edits: list[dict[str, Any]], idempotency_key: str | None = None,
             **params: Any) -> JobAccepted:
        """Submit an edit job: `edits` items have `start`/`end` or `find`, optional `instruction`, `max_tokens`."""
        return self.submit(edit_body(document, edits, params), idempotency_key)

    def get(self, job_id: str) -> JobPublic:
        response = self.http.get(f"/v1/jobs/{job_id}")
        _raise_for_error(response)
        return JobPublic.model_validate(response.json())

    def cancel(self, job_id: str) -> JobPublic:
        response = self.http.delete(f"/v1/jobs/{job_id}")
        _raise_for_error(response)
        return JobPublic.model_validate(response.json())

    def wait(self, job_id: str, timeout: float = 600.0, poll_interval: float = 0.2) -> JobPublic:
        """Poll until the job is finished; TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job.status in TERMINAL_STATUSES:
                return job
            if time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {job.status} after {timeout:.0f} s")
            time.sleep(poll_interval)

    def events(self, job_id: str, last_event_id: str | None = None, max_reconnects: int = 5,
               timeout: float | None = None) -> Iterator[JobEvent]:
        """Follow the job's events until a terminal one; reconnects (resuming by id) on dropped connections.

        With `timeout`, raises TimeoutError once that many seconds have passed without a terminal event
        (an idle stream is read in slices of at most `EVENTS_READ_SLICE_SECONDS`, so the overshoot is small).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        reconnects = 0
        while True:
            headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
            read_s = None if deadline is None else max(0.05, min(EVENTS_READ_SLICE_SECONDS, deadline - time.monotonic()))
            try:
                with self.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers,
                                      timeout=httpx.Timeout(self.http.timeout.connect, read=read_s)) as response:
                    if not response.is_success:
                        response.read()
                        _raise_for_error(response)
                    for event in parse_sse(_lines_before(response.iter_lines(), job_id, deadline, timeout)):
                        last_event_id = event.id
                        yield event
                        if event.is_terminal:
                            return
                return  # the server closed a stream of a finished job
            except httpx.ReadTimeout:
                _check_deadline(job_id, deadline, timeout)  # an idle slice: read on from the last event
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.ConnectError):
                reconnects += 1
                if reconnects > max_reconnects:
                    raise
                time.sleep(min(2.0, 0.2 * reconnects))
            _check_deadline(job_id, deadline, timeout)


def _lines_before(lines: Iterator[str], job_id: str, deadline: float | None, timeout: float | None
                  ) -> Iterator[str]:
    """`lines`, checking the deadline at each one (keep-alive comments included, which parse_sse hides)."""
    for line in lines:
        _check_deadline(job_id, deadline, timeout)
        yield line


def _check_deadline(job_id: str, deadline: float | None, timeout: float | None) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise TimeoutError(f"job {job_id} did not finish within {timeout:g} s")


class AsyncDgserveClient:
    """asyncio client with the same methods as `DgserveClient` (coroutines; `events` is an async iterator)."""

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.http = httpx.AsyncClient(base_url=base_url, headers=_headers(api_key), timeout=timeout,
                                      transport=transport)

    async def __aenter__(self) -> AsyncDgserveClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def submit(self, body: dict[str, Any], idempotency_key: str | None = None) -> JobAccepted:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        response = await self.http.post("/v1/jobs", json=body, headers=headers)
        _raise_for_error(response)
        return JobAccepted.model_validate(response.json())

    async def generate(self, prompt: str | None = None, messages: list[dict] | None = None,
                       idempotency_key: str | None = None, **params: Any) -> JobAccepted:
        return await self.submit(generate_body(prompt, messages, params), idempotency_key)

    async def edit(self, document: str, edits: list[dict[str, Any]], idempotency_key: str | None = None,
                   **params: Any) -> JobAccepted:
        return await self.submit(edit_body(document, edits, params), idempotency_key)

    async def get(self, job_id: str) -> JobPublic:
        response = await self.http.get(f"/v1/jobs/{job_id}")
        _raise_for_error(response)
        return JobPublic.model_validate(response.json())

    async def cancel(self, job_id: str) -> JobPublic:
        response = await self.http.delete(f"/v1/jobs/{job_id}")
        _raise_for_error(response)
        return JobPublic.model_validate(response.json())

    async def wait(self, job_id: str, timeout: float = 600.0, poll_interval: float = 0.2) -> JobPublic:
        deadline = time.monotonic() + timeout
        while True:
            job = await self.get(job_id)
            if job.status in TERMINAL_STATUSES:
                return job
            if time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {job.status} after {timeout:.0f} s")
            await asyncio.sleep(poll_interval)

    async def events(self, job_id: str, last_event_id: str | None = None) -> AsyncIterator[JobEvent]:
        """Follow the job's events until a terminal one (one connection; resume with `last_event_id`)."""
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        async with self.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers,
                                    timeout=httpx.Timeout(self.http.timeout.connect, read=None)) as response:
            if not response.is_success:
                await response.aread()
                _raise_for_error(response)
            buffer: list[str] = []
            async for line in response.aiter_lines():
                buffer.append(line)
                if line == "":
                    for event in parse_sse(buffer):
                        yield event
                        if event.is_terminal:
                            return
                    buffer = []
