"""The FastAPI app: `uvicorn api.main:app`. Routers gathered here; logic lives in `api/services`."""

import time
from contextlib import asynccontextmanager

from celery import Celery
from fastapi import FastAPI
from redis.asyncio import Redis

from api.errors import install_error_handlers
from api.middleware import FormBodyAsJSON
from api.routes import benchmark, inference, jobs, status
from api.services.jobs import XREAD_BLOCK_MS, JobService
from shared.celery_app import create_celery_app
from shared.config import Settings, get_settings
from shared.redis_keys import RedisKeys


def create_app(
    settings: Settings | None = None, redis_client: Redis | None = None, celery: Celery | None = None
) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Must outlive the longest XREAD BLOCK, or waiting callers see a read timeout.
        client = redis_client or Redis.from_url(
            settings.redis_url, decode_responses=True, socket_timeout=XREAD_BLOCK_MS / 1000 + 10
        )
        app.state.settings = settings
        app.state.started_at = time.time()
        app.state.jobs = JobService(
            client, RedisKeys(settings.key_prefix), settings, celery or create_celery_app(settings)
        )
        yield
        if redis_client is None:
            await client.aclose()

    app = FastAPI(
        title="moeserve",
        version="0.1.0",
        lifespan=lifespan,
        description="Queue-backed LLM inference: FastAPI -> Redis -> one GPU-bound Celery worker.",
    )
    app.add_middleware(FormBodyAsJSON)
    install_error_handlers(app)
    for module in (inference, jobs, benchmark, status):
        app.include_router(module.router)
    return app


app = create_app()
