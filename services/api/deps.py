"""FastAPI dependencies: the app's settings, job store and limits, and the caller's identity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.api.errors import ApiError
from services.job_messages import JobQueue
from services.jobs import JobStore
from services.metrics import ApiMetrics
from services.prompt_limits import RequestLimits
from services.settings import Settings


@dataclass
class AppServices:
    """Everything a route needs, built once by `create_app` and kept on `app.state.services`."""

    settings: Settings
    store: JobStore
    queue: JobQueue
    limits: RequestLimits
    metrics: ApiMetrics


async def get_services(request: Request) -> AppServices:
    # async (no I/O inside): FastAPI runs a plain `def` dependency in the thread pool, a hop per request.
    return request.app.state.services


ServicesDep = Annotated[AppServices, Depends(get_services)]
_bearer = HTTPBearer(auto_error=False, description="API key, when the server is configured with DGSERVE_API_KEYS")


async def get_owner(services: ServicesDep,
                    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    """The caller's owner id: the sha256 of its API key, or '' when the server has no keys configured.

    Keys are compared by hash and never logged; a job belongs to the key that created it. `async` although
    it does no I/O: a plain `def` dependency would cost a thread-pool hop on every request.
    """
    settings = services.settings
    if not settings.auth_enabled:
        return ""
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise ApiError(401, "unauthorized", "missing API key: send `Authorization: Bearer <key>`", headers=challenge)
    owner = settings.owner_of_key(credentials.credentials)
    if owner is None:
        raise ApiError(401, "unauthorized", "unknown API key", headers=challenge)
    return owner


OwnerDep = Annotated[str, Depends(get_owner)]
