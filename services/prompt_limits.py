"""Everything the API checks at submit beyond the wire schema, so that an accepted job is one the engine runs.

Two sources of limits:

* **Deployment limits** from `Settings` (`max_new_tokens_limit`, `max_document_chars`, `max_prompt_tokens`),
  prompt length counted with the model's own tokenizer (torch-free, from `dgtext`).
* **The served model's limits** (`dgtext.request_rules.ModelLimits`: context positions per request, canvas
  length, sampler defaults), checked with the same `dgtext.request_rules` functions `Engine.add_request`
  calls. Workers publish theirs with every heartbeat (`limits` in the heartbeat info); the API takes the
  most restrictive of the live workers of its queue (any of them may get the job), refreshed every
  `REFRESH_SECONDS`. Before any worker has published (none started yet), the API uses the checkpoint's own
  limits from its `config.json` and `generation_config.json` (the folder the tokenizer comes from): the
  model's position table, canvas length and sampler defaults. The one thing it cannot know then is a
  worker's smaller `max_context` setting; a job accepted in that window that needs more positions than the
  worker holds fails with `invalid_request` when the worker prepares it. Without a `config.json` (a
  tokenizer-only folder) only the wire schema and the deployment limits apply until a worker publishes.

`RequestLimits.check(request)` runs before anything is stored or enqueued.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from dgtext.checkpoint_files import TOKENIZER_FILE_PATTERNS, resolve_model_dir
from dgtext.edits import plan_edits, require_something_to_write
from dgtext.request_rules import (
    ModelLimits,
    RequestFieldError,
    check_generate_positions,
    check_infill_positions,
    resolve_sampling,
    sampling_defaults_from_generation_config,
)
from dgtext.tokenizer import PromptTokenizer
from services.schemas import EditJobCreate, GenerateJobCreate
from services.settings import Settings

logger = logging.getLogger(__name__)
REFRESH_SECONDS = 1.0  # published limits are re-read at most this often (one Redis read, not one per submit)
# Fallbacks of engine/config.py for a config.json that leaves these out.
DEFAULT_CANVAS_LENGTH = 256
DEFAULT_MAX_POSITION_EMBEDDINGS = 262_144


class LimitExceeded(ValueError):
    """A request over a deployment limit; `field` names the offending field, `reason` is the metric label."""

    def __init__(self, field: str, message: str, reason: str = "invalid"):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.reason = reason


class WorkerDirectory(Protocol):
    """Where the workers' heartbeats are read (`services.jobs.JobStore`)."""

    def live_workers(self) -> list[dict[str, Any]]: ...


def checkpoint_limits(folder: Path) -> ModelLimits | None:
    """The limits a checkpoint folder states itself (None without a `config.json`)."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        return None
    config = json.loads(config_path.read_text(encoding="utf-8"))
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    generation_path = folder / "generation_config.json"
    generation = json.loads(generation_path.read_text(encoding="utf-8")) if generation_path.is_file() else {}
    return ModelLimits(canvas_length=int(config.get("canvas_length") or DEFAULT_CANVAS_LENGTH),
                       max_positions=int(text.get("max_position_embeddings") or DEFAULT_MAX_POSITION_EMBEDDINGS),
                       sampling_defaults=sampling_defaults_from_generation_config(generation))


def published_limits(workers: list[dict[str, Any]], queue: str) -> ModelLimits | None:
    """The most restrictive limits published by live workers of `queue` (malformed entries are skipped)."""
    found = []
    for worker in workers:
        if worker.get("queue") not in (None, queue) or not isinstance(worker.get("limits"), dict):
            continue
        try:
            found.append(ModelLimits.from_json_dict(worker["limits"]))
        except ValueError:
            logger.warning("worker %s published malformed limits; ignored", worker.get("worker_id"))
    return ModelLimits.most_restrictive(found)


class RequestLimits:
    """Checks requests against `Settings` and the served model's limits; loads the tokenizer once."""

    def __init__(self, settings: Settings, workers: WorkerDirectory | None = None):
        self.settings = settings
        self.workers = workers
        self._tokenizer: PromptTokenizer | None = None
        self._checkpoint_limits: ModelLimits | None = None
        self._published: tuple[float, ModelLimits | None] = (float("-inf"), None)
        self._lock = threading.Lock()

    def tokenizer(self) -> PromptTokenizer:
        """The model's tokenizer (raises `dgtext.checkpoint_files.CheckpointError` if it cannot be found)."""
        with self._lock:
            if self._tokenizer is None:
                folder = resolve_model_dir(self.settings.model, allow_patterns=TOKENIZER_FILE_PATTERNS)
                self._checkpoint_limits = checkpoint_limits(folder)
                self._tokenizer = PromptTokenizer.from_dir(folder)
            return self._tokenizer

    def model_limits(self) -> ModelLimits | None:
        """The limits submissions are checked against now (see the module docstring for the order)."""
        self.tokenizer()
        if self.workers is not None:
            read_at, limits = self._published
            if time.monotonic() - read_at > REFRESH_SECONDS:
                limits = published_limits(self.workers.live_workers(), self.settings.queue_name)
                self._published = (time.monotonic(), limits)
            if limits is not None:
                return limits
        return self._checkpoint_limits

    def check(self, request: GenerateJobCreate | EditJobCreate) -> int:
        """Raise `LimitExceeded` for the first limit the request breaks; else return the request's token
        cost for the per-key tokens-per-minute limit (services/key_limits.py): its prompt tokens plus the
        generation budget it asks for."""
        limit = self.settings.max_new_tokens_limit
        if request.max_new_tokens is not None and request.max_new_tokens > limit:
            raise LimitExceeded("max_new_tokens", f"{request.max_new_tokens} is above this server's limit of "
                                f"{limit} (max_new_tokens_limit)")
        model = self.model_limits()
        try:
            sampling = None if model is None else resolve_sampling(request.sampling_params(), model.sampling_defaults)
        except RequestFieldError as exc:
            raise LimitExceeded(exc.field, exc.message) from exc
        budget = int(sampling["max_new_tokens"]) if sampling is not None else (request.max_new_tokens or 0)
        if isinstance(request, GenerateJobCreate):
            return self._check_prompt(request, model, sampling) + budget
        prompt_tokens = self._check_edit(request, model, sampling)
        return prompt_tokens + sum(edit.max_tokens or budget for edit in request.edits)

    def _too_long(self, field: str, what: str, count: int) -> LimitExceeded:
        return LimitExceeded(field, f"{what} is {count} tokens with the model's tokenizer; this server accepts "
                             f"at most {self.settings.max_prompt_tokens} (max_prompt_tokens)",
                             reason="prompt_too_long")

    def _check_prompt(self, request: GenerateJobCreate, model: ModelLimits | None,
                      sampling: dict[str, Any] | None) -> int:
        if request.prompt_token_ids is not None:
            field, count = "prompt_token_ids", self._check_token_ids(request.prompt_token_ids)
        else:
            field, count = self._count_prompt(request)
        if model is not None and sampling is not None:
            try:
                check_generate_positions(count, sampling["max_new_tokens"], model, prompt_field=field)
            except RequestFieldError as exc:
                raise LimitExceeded(exc.field, exc.message, reason="prompt_too_long") from exc
        return count

    def _count_prompt(self, request: GenerateJobCreate) -> tuple[str, int]:
        field = "prompt" if request.prompt is not None else "messages"
        messages = None if request.messages is None else [m.model_dump() for m in request.messages]
        try:
            count = len(self.tokenizer().encode_prompt(request.prompt, messages))
        except ValueError as exc:
            raise LimitExceeded(field, str(exc)) from exc
        if count > self.settings.max_prompt_tokens:
            raise self._too_long(field, "the prompt" if field == "prompt" else "the rendered chat", count)
        return field, count

    def _check_token_ids(self, ids: list[int]) -> int:
        vocab_size = self.tokenizer().vocab_size
        for index, token in enumerate(ids):
            if token >= vocab_size:
                raise LimitExceeded(f"prompt_token_ids[{index}]", f"token id {token} is outside the model's "
                                    f"vocabulary (ids 0..{vocab_size - 1})")
        if len(ids) > self.settings.max_prompt_tokens:
            raise self._too_long("prompt_token_ids", "the prompt", len(ids))
        return len(ids)

    def _check_edit(self, request: EditJobCreate, model: ModelLimits | None,
                    sampling: dict[str, Any] | None) -> int:
        max_chars = self.settings.max_document_chars
        if len(request.document) > max_chars:
            raise LimitExceeded("document", f"{len(request.document)} characters is above this server's limit of "
                                f"{max_chars} (max_document_chars)", reason="too_large")
        for index, edit in enumerate(request.edits):
            if edit.max_tokens is not None and edit.max_tokens > self.settings.max_new_tokens_limit:
                raise LimitExceeded(f"edits[{index}]", f"max_tokens {edit.max_tokens} is above this server's "
                                    f"limit of {self.settings.max_new_tokens_limit} (max_new_tokens_limit)")
        tokenizer = self.tokenizer()
        count = len(tokenizer.encode(request.document))
        count += sum(len(tokenizer.encode(edit.instruction)) for edit in request.edits if edit.instruction)
        if count > self.settings.max_prompt_tokens:
            raise self._too_long("document", "the document with its instructions", count)
        if model is not None and sampling is not None:
            self._check_edit_plan(request, model, sampling["max_new_tokens"])
        return count

    def _check_edit_plan(self, request: EditJobCreate, model: ModelLimits, insertion_tokens: int) -> None:
        """Plan the edit exactly as the worker will (`dgtext.edits.plan_edits`) and check what it needs."""
        plan = plan_edits(request.document, request.resolved_edits(), self.tokenizer(), model.canvas_length,
                          insertion_tokens)
        leading = sum(len(canvas.leading_token_ids) for canvas in plan.canvases)
        try:
            require_something_to_write(plan)
            check_infill_positions(len(plan.prompt_token_ids), leading, len(plan.canvases), model)
        except RequestFieldError as exc:
            reason = "prompt_too_long" if exc.field == "document" else "invalid"
            raise LimitExceeded(exc.field, exc.message, reason=reason) from exc
