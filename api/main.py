"""The FastAPI app: `uvicorn api.main:app`. Routers gathered here; logic lives in `api/services`."""

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from celery import Celery
from fastapi import FastAPI
from redis.asyncio import BlockingConnectionPool, Redis

from api.anthropic.errors import anthropic_error_response
from api.errors import install_error_handlers
from api.middleware import FormBodyAsJSON
from api.openai.errors import openai_error_response
from api.routes import anthropic, benchmark, inference, jobs, openai, status
from api.services.auth import KeyRing
from api.services.generation import ClientDisconnected, client_gone
from api.services.jobs import XREAD_BLOCK_MS, JobService
from shared.celery_app import create_celery_app
from shared.config import Settings, get_settings
from shared.redis_keys import RedisKeys


def create_app(
    settings: Settings | None = None, redis_client: Redis | None = None, celery: Celery | None = None
) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = redis_client or Redis.from_pool(_connection_pool(settings))  # closed with the client
        app.state.settings = settings
        app.state.keys = KeyRing.from_settings(settings)
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
    install_error_handlers(app, {"/v1/": openai_error_response, "/v1/messages": anthropic_error_response})
    app.add_exception_handler(ClientDisconnected, client_gone)
    for module in (inference, jobs, benchmark, status, openai, anthropic):
        app.include_router(module.router)
    return app


def _connection_pool(settings: Settings) -> BlockingConnectionPool:
    """Every waiting caller holds a connection through its XREAD BLOCK; past REDIS_MAX_CONNECTIONS a request
    waits for a free one (up to SYNC_WAIT_TIMEOUT_S) rather than failing, as redis-py's default pool would."""
    return BlockingConnectionPool.from_url(
        settings.redis_url,
        decode_responses=True,
        max_connections=settings.redis_max_connections,
        timeout=settings.sync_wait_timeout_s,
        # Must outlive the longest XREAD BLOCK, or waiting callers see a read timeout.
        socket_timeout=XREAD_BLOCK_MS / 1000 + 10,
    )


app = create_app()
