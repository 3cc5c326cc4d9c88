"""`POST /v1/fim/completions`: fill-in-the-middle with the request shape of Codestral's and Mercury's FIM
endpoints (`prompt`, `suffix`, `max_tokens`, `min_tokens`, `stop`, `stream`, `seed`, diffusion knobs).

It runs on the edit/infill path: one insertion edit at the end of `prompt` in `prompt + suffix`, so the
model sees both sides in one canvas and the suffix is never regenerated (byte-identical by construction).
The answer is a chat completion whose content is the middle (Codestral's shape).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from services.api.deps import OwnerDep, ServicesDep
from services.api.routes_openai import COMPLETION_RESPONSES, answer
from services.openai.schemas import FimCreate

router = APIRouter(tags=["openai-compatible"])


@router.post("/v1/fim/completions", summary="Fill-in-the-middle (Codestral / Mercury shape)",
             responses=COMPLETION_RESPONSES)
async def fim_completions(body: FimCreate, request: Request, services: ServicesDep, owner: OwnerDep) -> Any:
    return await answer(request, services, owner, "fim", body)
