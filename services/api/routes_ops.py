"""Operational routes: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from typing import Any

import redis
from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from services.api.deps import ServicesDep
from services.schemas import Readiness, WorkerLoad

router = APIRouter(tags=["operations"])
_LOAD_COUNTS = frozenset(WorkerLoad.model_fields) - {"worker_id", "gpu", "last_seen"}


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
            "queue": services.settings.queue_name, "model": services.settings.model_name,
            "worker_load": [worker_load(worker) for worker in workers]}
    if not workers:
        body["reason"] = (f"no worker heartbeat in the last {services.settings.heartbeat_ttl_seconds} s; "
                          "start one with `dgserve worker`")
    return JSONResponse(body, status_code=200 if workers else 503)


def worker_load(worker: dict[str, Any]) -> dict[str, Any]:
    """What /readyz shows of one live worker: its card and the load numbers of its last heartbeat
    (`WorkerMetrics.load_snapshot`: tokens generated since start, requests in flight and waiting, memory)."""
    reported = worker.get("load")
    load: dict[str, Any] = reported if isinstance(reported, dict) else {}
    counts = {name: value for name, value in load.items()  # only the documented fields (`WorkerLoad`)
              if name in _LOAD_COUNTS and isinstance(value, int) and not isinstance(value, bool) and value >= 0}
    return {"worker_id": worker.get("worker_id"), "gpu": worker.get("gpu"), "last_seen": worker.get("last_seen"),
            **counts}


@router.get("/metrics", summary="Prometheus metrics of the API", response_class=Response, responses={
    200: {"description": "Prometheus text exposition", "content": {"text/plain": {"schema": {"type": "string"}}}}})
def metrics(services: ServicesDep) -> Response:
    try:
        depth, workers = services.store.queue_depth(), len(services.store.live_workers())
    except redis.RedisError:
        depth, workers = -1, 0  # still expose the counters; -1 marks the depth as unknown
    return Response(services.metrics.render(depth, workers), media_type=CONTENT_TYPE_LATEST)
