"""Deployment limits on a job request that the wire schema cannot know: they come from `Settings`, and
prompt length is counted in tokens with the model's own tokenizer (torch-free, from `dgtext`).

The API calls `RequestLimits.check(request)` before anything is stored or enqueued.
"""

from __future__ import annotations

import threading

from dgtext.checkpoint_files import TOKENIZER_FILE_PATTERNS, resolve_model_dir
from dgtext.tokenizer import PromptTokenizer
from services.schemas import EditJobCreate, GenerateJobCreate
from services.settings import Settings


class LimitExceeded(ValueError):
    """A request over a deployment limit; `field` names the offending field, `reason` is the metric label."""

    def __init__(self, field: str, message: str, reason: str = "invalid"):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.reason = reason


class RequestLimits:
    """Checks requests against `Settings` limits; loads the tokenizer once, on first use."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._tokenizer: PromptTokenizer | None = None
        self._lock = threading.Lock()

    def tokenizer(self) -> PromptTokenizer:
        """The model's tokenizer (raises `dgtext.checkpoint_files.CheckpointError` if it cannot be found)."""
        with self._lock:
            if self._tokenizer is None:
                folder = resolve_model_dir(self.settings.model, allow_patterns=TOKENIZER_FILE_PATTERNS)
                self._tokenizer = PromptTokenizer.from_dir(folder)
            return self._tokenizer

    def check(self, request: GenerateJobCreate | EditJobCreate) -> None:
        """Raise `LimitExceeded` for the first limit the request breaks."""
        limit = self.settings.max_new_tokens_limit
        if request.max_new_tokens is not None and request.max_new_tokens > limit:
            raise LimitExceeded("max_new_tokens", f"{request.max_new_tokens} is above this server's limit of "
                                f"{limit} (max_new_tokens_limit)")
        if isinstance(request, GenerateJobCreate):
            self._check_prompt(request)
        else:
            self._check_edit(request)

    def _too_long(self, field: str, what: str, count: int) -> LimitExceeded:
        return LimitExceeded(field, f"{what} is {count} tokens with the model's tokenizer; this server accepts "
                             f"at most {self.settings.max_prompt_tokens} (max_prompt_tokens)",
                             reason="prompt_too_long")

    def _check_prompt(self, request: GenerateJobCreate) -> None:
        if request.prompt_token_ids is not None:
            self._check_token_ids(request.prompt_token_ids)
            return
        field = "prompt" if request.prompt is not None else "messages"
        messages = None if request.messages is None else [m.model_dump() for m in request.messages]
        try:
            count = len(self.tokenizer().encode_prompt(request.prompt, messages))
        except ValueError as exc:
            raise LimitExceeded(field, str(exc)) from exc
        if count > self.settings.max_prompt_tokens:
            raise self._too_long(field, "the prompt" if field == "prompt" else "the rendered chat", count)

    def _check_token_ids(self, ids: list[int]) -> None:
        vocab_size = self.tokenizer().vocab_size
        for index, token in enumerate(ids):
            if token >= vocab_size:
                raise LimitExceeded(f"prompt_token_ids[{index}]", f"token id {token} is outside the model's "
                                    f"vocabulary (ids 0..{vocab_size - 1})")
        if len(ids) > self.settings.max_prompt_tokens:
            raise self._too_long("prompt_token_ids", "the prompt", len(ids))

    def _check_edit(self, request: EditJobCreate) -> None:
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
