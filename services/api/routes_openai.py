"""OpenAI-compatible completions and chat: `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/completions`,
`POST /v1/chat/completions`, as the official SDK sends them (docs/api.md, OpenAI section).

Each choice becomes an ordinary generate job (same limits, admission, queue, metrics); errors answer in
OpenAI's shape (`services.openai.errors`). Diffusion knobs are extra body fields (the SDK's `extra_body`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from services.api.deps import AppServices, OwnerDep, ServicesDep
from services.api.errors import ApiError
from services.api.openai_jobs import run_plan
from services.openai.errors import error_responses
from services.openai.schemas import ChatCompletionCreate, CompletionCreate, OpenAIRequest
from services.openai.translate import Endpoint, plan_request

router = APIRouter(tags=["openai-compatible"])
COMPLETION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the completion (JSON), or with `stream: true` an event stream of chunks ending with "
                         "`data: [DONE]`", "content": {"text/event-stream": {"schema": {"type": "string"}}}},
    **error_responses(400, 401, 404, 409, 413, 422, 429, 500, 503, 504),
}


def _model_card(services: AppServices) -> dict[str, Any]:
    return {"id": services.settings.model_name, "object": "model", "created": 0, "owned_by": "dgserve"}


@router.get("/v1/models", summary="The served model (OpenAI-compatible)", responses=error_responses(401))
def list_models(services: ServicesDep, owner: OwnerDep) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(services)]}


@router.get("/v1/models/{model_id:path}", summary="One model (OpenAI-compatible)",
            responses=error_responses(401, 404))
def retrieve_model(model_id: str, services: ServicesDep, owner: OwnerDep) -> dict[str, Any]:
    if model_id not in (services.settings.model_name, services.settings.model):
        raise ApiError(404, "model_not_found", f"model {model_id[:200]!r} is not served here; this server "
                       f"serves {services.settings.model_name!r}", field="model")
    return _model_card(services)


def tokenizer_decode(services: AppServices) -> Callable[[Sequence[int]], str]:
    """Decode token ids with the served model's tokenizer (loaded lazily; 503 if it cannot be)."""
    def decode(ids: Sequence[int]) -> str:
        return services.limits.tokenizer().decode(ids)

    return decode


async def answer(request: Request, services: AppServices, owner: str, endpoint: Endpoint,
                 body: OpenAIRequest) -> Any:
    """Plan the request's jobs (validation errors name the field), run them and answer."""
    plan = await run_in_threadpool(plan_request, endpoint, body, services.settings, tokenizer_decode(services))
    return await run_plan(request, services, owner, plan)


@router.post("/v1/completions", summary="Text completion (OpenAI-compatible)", responses=COMPLETION_RESPONSES)
async def completions(body: CompletionCreate, request: Request, services: ServicesDep, owner: OwnerDep) -> Any:
    """`prompt` as a string, strings, token ids or token-id lists; `n` choices per prompt; `echo`, `stop`,
    `logprobs`, `suffix` (fill-in-the-middle), `stream` with `stream_options.include_usage`."""
    return await answer(request, services, owner, "completions", body)


@router.post("/v1/chat/completions", summary="Chat completion (OpenAI-compatible)", responses=COMPLETION_RESPONSES)
async def chat_completions(body: ChatCompletionCreate, request: Request, services: ServicesDep,
                           owner: OwnerDep) -> Any:
    """Roles system, developer (a system turn), user, assistant; text content parts."""
    return await answer(request, services, owner, "chat", body)
