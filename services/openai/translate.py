"""OpenAI requests → ordinary jobs. One choice is one job: `n` choices of each prompt run as `n` jobs with
seeds `seed, seed + 1, ...` (without a seed the engine draws a random one per job, so they differ too).

Used by the synchronous routes and by the Batch API for each line, so a line is validated and planned
exactly as the route would do it. Raises pydantic's ValidationError (invalid fields) or `ApiError`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from services.api.errors import ApiError, describe_validation_error
from services.openai.schemas import (
    ChatCompletionCreate,
    CompletionCreate,
    FimCreate,
    OpenAIRequest,
    chat_messages,
)
from services.schemas import EditJobCreate, FieldValueError, GenerateJobCreate
from services.settings import Settings

Endpoint = Literal["completions", "chat", "fim"]
ENDPOINT_PATHS: dict[str, Endpoint] = {"/v1/completions": "completions", "/v1/chat/completions": "chat",
                                       "/v1/fim/completions": "fim"}
REQUEST_MODELS: dict[Endpoint, type[OpenAIRequest]] = {
    "completions": CompletionCreate, "chat": ChatCompletionCreate, "fim": FimCreate}


@dataclass(frozen=True)
class PlannedChoice:
    """One choice: its job, the text `echo` puts before it, and whether its prompt counts in `usage`
    (the first choice of each prompt: OpenAI counts a prompt once, whatever `n`)."""

    job: GenerateJobCreate | EditJobCreate
    echo_text: str = ""
    counts_prompt: bool = True


@dataclass(frozen=True)
class Plan:
    """What a request runs and how its answer is worded."""

    endpoint: Endpoint
    request: OpenAIRequest
    choices: list[PlannedChoice]
    stops: list[str]

    @property
    def chat_shaped(self) -> bool:
        """Chat and FIM answer as chat completions (Codestral's FIM shape); completions as text completions."""
        return self.endpoint != "completions"


def check_model(body: OpenAIRequest, settings: Settings) -> None:
    """404 `model_not_found` unless `model` is absent or names the served model."""
    if body.model is not None and body.model not in (settings.model_name, settings.model):
        raise ApiError(404, "model_not_found", f"model {body.model!r} is not served here; this server serves "
                       f"{settings.model_name!r} (GET /v1/models)", field="model")


def _seeded(options: dict[str, Any], choice: int) -> dict[str, Any]:
    seed = options.get("seed")
    return options if seed is None or choice == 0 else {**options, "seed": (seed + choice) % 2**63}


def _fim_job(prompt: str, suffix: str, options: dict[str, Any], max_tokens: int | None) -> EditJobCreate:
    """An insertion edit at the end of `prompt` in `prompt + suffix`: the model sees both sides and the text
    around the insertion is the edit path's byte-identical outside text. Stop strings cut the middle in the
    API (edit jobs take none)."""
    options = {name: value for name, value in options.items() if name != "stop"}
    return EditJobCreate.model_validate({"document": prompt + suffix, "max_new_tokens": max_tokens, **options,
                                         "edits": [{"start": len(prompt), "end": len(prompt)}]})


def plan_completion(body: CompletionCreate, decode: Callable[[Sequence[int]], str]) -> Plan:
    options, choices = body.job_options(), []
    for prompt in body.prompt_list():
        prompt_text = prompt if isinstance(prompt, str) else decode(prompt)
        for choice in range(body.n):
            seeded = _seeded(options, choice)
            if body.suffix is not None:
                job: GenerateJobCreate | EditJobCreate = _fim_job(prompt_text, body.suffix, seeded, body.max_tokens)
            elif isinstance(prompt, str):
                job = GenerateJobCreate(prompt=prompt, max_new_tokens=body.max_tokens, logprobs=body.logprobs,
                                        **seeded)
            else:
                job = GenerateJobCreate(prompt_token_ids=prompt, max_new_tokens=body.max_tokens,
                                        logprobs=body.logprobs, **seeded)
            choices.append(PlannedChoice(job, prompt_text if body.echo else "", counts_prompt=choice == 0))
    return Plan("completions", body, choices, body.stop_list())


def plan_chat(body: ChatCompletionCreate) -> Plan:
    options, messages = body.job_options(), chat_messages(body.messages)
    max_tokens = body.max_completion_tokens or body.max_tokens
    choices = [PlannedChoice(GenerateJobCreate(messages=messages, max_new_tokens=max_tokens,
                                               logprobs=body.top_logprob_count(), **_seeded(options, choice)),
                             counts_prompt=choice == 0)
               for choice in range(body.n)]
    return Plan("chat", body, choices, body.stop_list())


def plan_fim(body: FimCreate) -> Plan:
    job = _fim_job(body.prompt, body.suffix, body.job_options(), body.max_tokens)
    return Plan("fim", body, [PlannedChoice(job)], body.stop_list())


def invalid(exc: ValidationError | FieldValueError) -> ApiError:
    """The 422 `invalid_request` (400 in OpenAI's shape) of a validation failure, naming the first field."""
    if isinstance(exc, FieldValueError):
        return ApiError(422, "invalid_request", str(exc), field=exc.field)
    described = [describe_validation_error(dict(error)) for error in exc.errors()] or [("body", "invalid")]
    return ApiError(422, "invalid_request", "; ".join(text for _, text in described[:5]), field=described[0][0])


def plan_request(endpoint: Endpoint, body: OpenAIRequest, settings: Settings,
                 decode: Callable[[Sequence[int]], str]) -> Plan:
    """The plan of a validated request (model checked first); ApiError for anything invalid."""
    check_model(body, settings)
    try:
        if isinstance(body, ChatCompletionCreate):
            return plan_chat(body)
        if isinstance(body, FimCreate):
            return plan_fim(body)
        if isinstance(body, CompletionCreate):
            return plan_completion(body, decode)
    except (ValidationError, FieldValueError) as exc:
        raise invalid(exc) from exc
    raise TypeError(f"no plan for {type(body).__name__} ({endpoint})")
