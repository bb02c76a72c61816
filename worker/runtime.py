"""The worker process's one-time state: its id, Redis client, heartbeat and the loaded engine.

Built once when the Celery worker starts (see `worker.main`), before it takes its first job.
"""

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import redis

from shared.config import Settings, get_settings
from shared.redis_keys import RedisKeys
from shared.schemas import GenerationParams, WorkerState
from worker.engine import Engine
from worker.engine.base import SilentControl
from worker.engine_factory import create_engine
from worker.heartbeat import Heartbeat
from worker.job_runner import JobContext, JobRunner
from worker.model_store import resolve_model_path
from worker.redis_outage import connect
from worker.settings import OffloadSettings, get_engine_settings

log = logging.getLogger(__name__)


@dataclass
class WorkerRuntime:
    settings: Settings
    keys: RedisKeys
    client: redis.Redis
    worker_id: str
    heartbeat: Heartbeat
    runner: JobRunner
    engine: Engine | None = None

    def require_engine(self) -> Engine:
        if self.engine is None:
            raise RuntimeError(f"the model is not loaded on this worker ({self.heartbeat.load_error})")
        return self.engine

    @contextmanager
    def job(self, job_id: str, stream_tokens: bool | None = None) -> Iterator[JobContext | None]:
        """`JobRunner.claimed`, with the job shown in this worker's heartbeat while it runs."""
        self.heartbeat.current_job = job_id
        try:
            with self.runner.claimed(job_id, stream_tokens) as job:
                yield job
        finally:
            self.heartbeat.current_job = ""


_runtime: WorkerRuntime | None = None


def start_runtime() -> WorkerRuntime:
    """Announce the worker (state: loading), then load the engine and warm it up."""
    global _runtime
    settings, engine_settings = get_settings(), get_engine_settings()
    if engine_settings.torch_threads:
        import torch

        torch.set_num_threads(engine_settings.torch_threads)
    if settings.log_requests:
        log.warning("LOG_REQUESTS is on: every job's request is written to this worker's log")
    keys = RedisKeys(settings.key_prefix)
    client = connect(settings.redis_url)
    worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    heartbeat = Heartbeat(client, keys, settings, worker_id, engine_settings.model_id)
    heartbeat.start()
    runtime = WorkerRuntime(settings, keys, client, worker_id, heartbeat, JobRunner(client, keys, settings, worker_id))
    _runtime = runtime
    try:
        engine = build_engine()
        engine.load()
        warm_up(engine)
    except Exception as error:
        heartbeat.state = WorkerState.FAILED
        heartbeat.load_error = f"{type(error).__name__}: {error}"
        heartbeat.beat()
        log.exception("loading %s failed", engine_settings.model_id)
        raise
    runtime.engine = heartbeat.engine = engine
    heartbeat.state = WorkerState.READY
    heartbeat.beat()
    return runtime


def build_engine() -> Engine:
    """The engine the environment's settings ask for, its model fetched or converted if needed; not loaded."""
    settings = get_engine_settings()
    return create_engine(resolve_model_path(settings), settings, OffloadSettings())


def warm_up(engine: Engine) -> None:
    """One short generation, so the first real request does not pay for lazy initialisation."""
    engine.generate(GenerationParams(prompt="Hello", max_tokens=2, temperature=0.0), SilentControl())


def get_runtime() -> WorkerRuntime:
    if _runtime is None:
        raise RuntimeError("worker runtime not started")
    return _runtime


def stop_runtime() -> None:
    if _runtime is not None:
        _runtime.heartbeat.stop()
