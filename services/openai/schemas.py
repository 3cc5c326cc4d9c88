"""Wire schemas of the OpenAI-compatible routes: the fields the official SDK sends, plus dgserve's
diffusion knobs as extra body fields (the SDK's `extra_body`).

Every model forbids unknown fields (a 400 that names the field). Parameters a diffusion model cannot honour
are refused with a 400 naming them, never silently ignored (`_refuse_unsupported`); docs/api.md says why.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from services.schemas import (
    MAX_MESSAGES,
    MAX_PROMPT_CHARS,
    MAX_STOP_STRINGS,
    MAX_TOP_LOGPROBS,
    ChatMessage,
    DiffusionKnobs,
    FieldValueError,
    WireModel,
)

MAX_CHOICES = 16  # n x prompts: each choice is one job
MAX_PROMPTS = 64
_NO_HISTORY = ("a diffusion step scores every canvas position at once, so there is no left-to-right history "
               "to penalise; send 0 or leave it out")


class StreamOptions(WireModel):
    include_usage: bool = Field(default=False, description="a last chunk with `usage` and no choices")


class OpenAIRequest(DiffusionKnobs):
    """Fields shared by completions, chat and FIM."""

    model: str | None = Field(default=None, description="must name the served model (GET /v1/models)")
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stream_drafts: bool = Field(default=False, description=(
        "dgserve extension: with `stream`, a chunk per denoising step carries the step's draft in `dgserve_draft`"))
    n: int = Field(default=1, ge=1, le=MAX_CHOICES, description="choices: one job each, seeds seed, seed+1, ...")
    temperature: float | None = Field(default=None, ge=0, le=2, description=(
        "0 = greedy argmax; else multiplies every step of the diffusion temperature schedule"))
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=1, le=1024, description="dgserve extension (extra_body), at most 1024")
    stop: str | list[str] | None = Field(default=None, description="up to 16 strings; the text ends before the first")
    user: str | None = Field(default=None, max_length=256, description="end-user id; accepted, used for nothing")
    presence_penalty: float | None = Field(default=None, ge=-2, le=2, description="only 0 is accepted")
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2, description="only 0 is accepted")
    logit_bias: dict[str, float] | None = Field(default=None, description="only {} is accepted")

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> OpenAIRequest:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise FieldValueError(name, f"not supported: {_NO_HISTORY}")
        if self.logit_bias:
            raise FieldValueError("logit_bias", "not supported by this server; send {} or leave it out")
        if self.stream_options is not None and not self.stream:
            raise FieldValueError("stream_options", "only allowed when `stream` is true")
        stops = self.stop_list()
        if len(stops) > MAX_STOP_STRINGS:
            raise FieldValueError("stop", f"at most {MAX_STOP_STRINGS} stop strings")
        return self

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def job_options(self) -> dict[str, Any]:
        """Fields of the job request (`SamplingOptions`) every choice shares, unset ones left out."""
        options: dict[str, Any] = {**self.knob_values(), "temperature": self.temperature, "top_p": self.top_p,
                                   "top_k": self.top_k, "stop": self.stop_list() or None}
        if self.stream_drafts:
            options["stream_drafts"] = True
        return {name: value for name, value in options.items() if value is not None}


PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionCreate(OpenAIRequest):
    """`POST /v1/completions`."""

    prompt: PromptInput = Field(description="a string, a list of strings, token ids or a list of token-id lists")
    echo: bool = Field(default=False, description="prepend the prompt to each choice's text")
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS, description=(
        "log-probabilities of the committed tokens under the final denoising step, with this many alternatives"))
    best_of: int | None = Field(default=None, ge=1, le=MAX_CHOICES, description="only 1 (or n) is accepted")
    suffix: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS, description=(
        "text after the insertion: the request becomes a fill-in-the-middle job (POST /v1/fim/completions)"))

    @model_validator(mode="after")
    def _check_prompt(self) -> CompletionCreate:
        if self.best_of is not None and self.best_of != self.n:
            raise FieldValueError("best_of", "not supported: every choice is returned, so best_of must equal n")
        if self.echo and self.logprobs is not None:
            raise FieldValueError("echo", "echo with logprobs is not supported: prompt tokens are not scored")
        prompts = self.prompt_list()
        if not prompts or len(prompts) > MAX_PROMPTS:
            raise FieldValueError("prompt", f"give 1 to {MAX_PROMPTS} prompts")
        if len(prompts) * self.n > MAX_CHOICES:
            raise FieldValueError("n", f"prompts x n is {len(prompts) * self.n}; at most {MAX_CHOICES} choices")
        if self.suffix is not None and not all(isinstance(p, str) for p in prompts):
            raise FieldValueError("suffix", "fill-in-the-middle needs text prompts, not token ids")
        return self

    def prompt_list(self) -> list[str | list[int]]:
        """Each prompt of the request: a string or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(item, int) for item in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]


class ChatMessageIn(WireModel):
    """An OpenAI chat message as sent; `chat_messages` turns it into one the chat template renders."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None


def _text_of(content: str | list[dict[str, Any]] | None, field: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        raise FieldValueError(field, "must be text (a string or text parts)")
    texts = []
    for index, part in enumerate(content):
        kind = part.get("type")
        if kind != "text" or not isinstance(part.get("text"), str):
            raise FieldValueError(f"{field}[{index}]", f"{kind!r} parts are not supported: this is a text-only "
                                  "model; send {\"type\": \"text\", \"text\": ...} parts")
        texts.append(part["text"])
    return "".join(texts)


def chat_messages(messages: list[ChatMessageIn]) -> list[ChatMessage]:
    """The messages the chat template renders. `developer` is a system turn (OpenAI's meaning); tool turns,
    tool calls and participant names are refused: the served template has no way to render them."""
    converted = []
    for index, message in enumerate(messages):
        field = f"messages[{index}]"
        if message.role in ("tool", "function"):
            raise FieldValueError(f"{field}.role", f"{message.role!r} turns are not supported: the model's chat "
                                  "template renders only system, developer, user and assistant turns")
        for extra in ("name", "tool_calls", "tool_call_id", "refusal"):
            if getattr(message, extra) is not None:
                raise FieldValueError(f"{field}.{extra}", "not supported: the chat template cannot render it")
        role = "system" if message.role == "developer" else message.role
        converted.append(ChatMessage.model_validate({"role": role,
                                                     "content": _text_of(message.content, f"{field}.content")}))
    return converted


class ChatCompletionCreate(OpenAIRequest):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessageIn] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    functions: list[dict[str, Any]] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _refuse_tools(self) -> ChatCompletionCreate:
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise FieldValueError("response_format", "not supported: the sampler cannot constrain output to a "
                                  "JSON schema; only {\"type\": \"text\"} is accepted")
        for name in ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls"):
            if getattr(self, name) is not None:
                raise FieldValueError(name, "not supported: the served model's chat template has no tool calls")
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldValueError("top_logprobs", "needs `logprobs: true`")
        return self

    def top_logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class FimCreate(OpenAIRequest):
    """`POST /v1/fim/completions`: the text between `prompt` and `suffix` (Codestral's / Mercury's shape)."""

    prompt: str = Field(max_length=MAX_PROMPT_CHARS, description="the text before the insertion")
    suffix: str = Field(default="", max_length=MAX_PROMPT_CHARS, description="the text after it, kept byte-identical")
    min_tokens: int | None = Field(default=None, ge=0, description="only 0 is accepted")

    @model_validator(mode="after")
    def _check_fim(self) -> FimCreate:
        if self.min_tokens:
            raise FieldValueError("min_tokens", "not supported: the infill canvas has max_tokens free positions "
                                  "and the model leaves the ones it does not need empty; no minimum is enforced")
        if self.n != 1:
            raise FieldValueError("n", "fill-in-the-middle returns one choice")
        return self
