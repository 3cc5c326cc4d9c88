"""Operational routes: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import redis
from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from services.api.deps import ServicesDep
from services.schemas import Readiness

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness: the API process answers")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness, "description": "not ready"}},
            summary="Readiness: Redis answers and at least one worker heartbeat is fresh")
def readyz(services: ServicesDep) -> JSONResponse:
    """200 when jobs can run now; 503 with the reason otherwise (load balancers take the API out)."""
    try:
        services.store.redis.ping()
        # Only workers of this API's model queue make it ready (others may share the Redis).
        workers = [worker for worker in services.store.live_workers()
                   if worker.get("queue") in (None, services.settings.queue_name)]
    except redis.RedisError as exc:
        return JSONResponse({"ready": False, "redis": False, "workers": 0,
                             "reason": f"redis unreachable: {type(exc).__name__}"}, status_code=503)
    body = {"ready": bool(workers), "redis": True, "workers": len(workers),
            "queue": services.settings.queue_name, "model": services.settings.model_name}
    if not workers:
        body["reason"] = (f"no worker heartbeat in the last {services.settings.heartbeat_ttl_seconds} s; "
                          "start one with `dgserve worker`")
    return JSONResponse(body, status_code=200 if workers else 503)


@router.get("/metrics", summary="Prometheus metrics of the API", response_class=Response, responses={
    200: {"description": "Prometheus text exposition", "content": {"text/plain": {"schema": {"type": "string"}}}}})
def metrics(services: ServicesDep) -> Response:
    try:
        depth, workers = services.store.queue_depth(), len(services.store.live_workers())
    except redis.RedisError:
        depth, workers = -1, 0  # still expose the counters; -1 marks the depth as unknown
    return Response(services.metrics.render(depth, workers), media_type=CONTENT_TYPE_LATEST)
