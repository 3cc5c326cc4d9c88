"""The typed seams of the worker: what it needs from the engine, the job store and the tokenizer.

`engine.engine.Engine`, `services.jobs.JobStore` and `dgtext.tokenizer.PromptTokenizer` implement these; tests
pass small real implementations (a deterministic fake engine, see tests/worker/fake_engine.py) where a
model would only cost time.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from dgtext.edits import EditTokenizer
from dgtext.request_rules import ModelLimits
from engine.block_manager import PrefixCacheStats
from engine.types import EngineRequest, StepOutput, StepStats
from services.jobs import StartDecision

TokenizerLike = EditTokenizer  # encode / decode / encode_prompt and the special ids


class EngineLike(Protocol):
    """The engine as the engine loop drives it (one thread calls every method)."""

    last_step_stats: StepStats

    @property
    def request_limits(self) -> ModelLimits: ...

    def add_request(self, req: EngineRequest, request_id: str | None = None) -> str: ...

    def step(self) -> list[StepOutput]: ...

    def abort(self, request_id: str) -> None: ...

    def has_unfinished(self) -> bool: ...

    def num_waiting(self) -> int: ...

    def num_running(self) -> int: ...

    def kv_stats(self) -> PrefixCacheStats: ...


class JobStoreLike(Protocol):
    """The job-store calls a worker makes (`services.jobs.JobStore`; contracts in its docstrings)."""

    def try_start(self, job_id: str, worker_id: str) -> StartDecision: ...

    def start_next(self, worker_id: str, batch: bool = ..., exclude: Iterable[str] = ...) -> StartDecision | None: ...

    def append_event_with_progress(self, job_id: str, type: str, data: dict[str, Any], canvas: int,
                                   step: int, worker_id: str | None = None) -> bool: ...

    def set_progress(self, job_id: str, canvas: int, step: int, worker_id: str | None = None) -> bool: ...

    def succeed(self, job_id: str, result: dict[str, Any]) -> bool: ...

    def fail(self, job_id: str, code: str, message: str) -> bool: ...

    def expire(self, job_id: str, message: str = ...) -> bool: ...

    def mark_cancelled(self, job_id: str) -> bool: ...

    def is_cancel_requested(self, job_id: str) -> bool: ...

    def release(self, job_id: str, worker_id: str, reason: str = ...) -> bool: ...

    def reclaim_orphans(self, now: float | None = None, limit: int = ...) -> list[str]: ...

    def heartbeat(self, worker_id: str, info: dict[str, Any]) -> None: ...

    def forget_worker(self, worker_id: str) -> None: ...
