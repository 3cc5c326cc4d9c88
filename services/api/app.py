"""The FastAPI app factory. `uvicorn --factory services.api.app:create_app_from_env` serves it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.types import Scope

from dgtext.checkpoint_files import CheckpointError
from services.api import (
    routes_batches,
    routes_files,
    routes_fim,
    routes_jobs,
    routes_openai,
    routes_ops,
    routes_playground,
)
from services.api.deps import AppServices
from services.api.docs_offline import install_offline_docs
from services.api.errors import SUBMIT_PATHS, install_error_handlers
from services.api.middleware import BodyLimitMiddleware, RequestMetricsMiddleware
from services.api.openapi_doc import install_exact_openapi
from services.job_messages import JobQueue
from services.jobs import JobStore
from services.metrics import ApiMetrics
from services.openai.errors import OpenAIErrorShapeMiddleware
from services.prompt_limits import RequestLimits
from services.redis_options import async_redis_client
from services.settings import Settings

logger = logging.getLogger(__name__)


def create_app(settings: Settings) -> FastAPI:
    """Build the API around one `Settings`: job store and queue on `settings.redis_url`, limits, metrics."""
    metrics = ApiMetrics(model=settings.model_name, queue=settings.queue_name)
    store = JobStore.from_settings(settings)
    services = AppServices(settings=settings, store=store, queue=JobQueue(settings),
                           limits=RequestLimits(settings, workers=store), metrics=metrics)
    # Event streams block in XREAD for up to `sse_keepalive_seconds`; the socket timeout must outlast that
    # block (redis-py's default of 5 s would cut any stream idle for longer than 5 s).
    async_redis = async_redis_client(settings, socket_timeout=settings.sse_keepalive_seconds + 10.0)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:  # load the tokenizer now so the first request does not pay for it; failures surface as 503s
            services.limits.tokenizer()
        except CheckpointError as exc:
            logger.error("tokenizer of %s not available yet: %s", settings.model, exc)
        yield
        await async_redis.aclose()
        services.store.redis.close()
        services.queue.close()

    app = FastAPI(title="dgserve", version="1.0.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Job API for DiffusionGemma-class block-diffusion models: submit generate or "
                              "edit jobs, follow their events, fetch results.")
    app.state.services = services
    app.state.metrics = metrics
    app.state.async_redis = async_redis
    install_error_handlers(app)
    install_offline_docs(app)  # /docs and /redoc with bundled assets: no CDN
    install_exact_openapi(app)
    app.include_router(routes_jobs.router)
    app.include_router(routes_ops.router)
    app.include_router(routes_openai.router)
    app.include_router(routes_fim.router)
    app.include_router(routes_files.router)
    app.include_router(routes_batches.router)
    app.include_router(routes_playground.router)

    def count_oversized(scope: Scope) -> None:
        if scope.get("path") in SUBMIT_PATHS:
            metrics.job_rejected("too_large")

    # Last added runs first: metrics see every answer, including the 413s of the body limit.
    upload_limit = (settings.max_batch_file_bytes + 64 * 1024, "max_batch_file_bytes")  # + multipart framing
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, on_reject=count_oversized,
                       path_limits={"/v1/files": upload_limit})
    app.add_middleware(OpenAIErrorShapeMiddleware)  # OpenAI paths answer in OpenAI's error shape
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    return app


def create_app_from_env() -> FastAPI:
    """App configured from `DGSERVE_*` environment variables."""
    return create_app(Settings())
