"""A daemon thread that writes this worker's heartbeat hash every few seconds, with a TTL.

It runs apart from the job thread, so a long generation never makes a live worker look dead.
"""

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from shared.config import Settings
from shared.redis_keys import RedisKeys
from shared.schemas import WorkerHeartbeat, WorkerState
from worker.engine.base import Engine
from worker.redis_outage import retry_until_reachable
from worker.system_stats import GpuProbe, host_memory

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(self, client: redis.Redis, keys: RedisKeys, settings: Settings, worker_id: str, model: str):
        self.client = client
        self.keys = keys
        self.settings = settings
        self.worker_id = worker_id
        self.model = model
        self.state = WorkerState.LOADING
        self.load_error = ""
        self.current_job = ""
        self.tokens_per_second = 0.0  # of the last inference this worker finished
        self.engine: Engine | None = None
        # Run after each beat once the worker is ready (the orphaned-job watchdog).
        self.on_tick: Callable[[], object] | None = None
        self.started_at = time.time()
        self._gpu = GpuProbe()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def snapshot(self) -> WorkerHeartbeat:
        gpu = self._gpu.read()
        engine = self.engine
        return WorkerHeartbeat(
            worker_id=self.worker_id,
            hostname=socket.gethostname(),
            pid=os.getpid(),
            model=self.model,
            state=self.state,
            device=engine.device if engine is not None else "",
            dtype=engine.dtype if engine is not None else "",
            context_length=engine.context_length if engine is not None else 0,
            started_at=self.started_at,
            last_heartbeat=time.time(),
            current_job=self.current_job,
            tokens_per_second=self.tokens_per_second,
            load_error=self.load_error,
            gpu_name=gpu.name if gpu else "",
            gpu_memory_used_gb=gpu.used_gb if gpu else 0.0,
            gpu_memory_total_gb=gpu.total_gb if gpu else 0.0,
            expert_offload=engine.expert_offload_stats() if engine is not None else None,
            **host_memory(),
        )

    def beat(self) -> None:
        key = self.keys.worker_heartbeat(self.worker_id)
        with self.client.pipeline() as pipe:
            pipe.hset(key, mapping=dict[Any, Any](self.snapshot().to_redis()))
            pipe.expire(key, max(1, int(self.settings.heartbeat_stale_s)))
            pipe.sadd(self.keys.workers(), self.worker_id)
            pipe.execute()

    def _run(self) -> None:
        failing = False  # logged once per outage, not once per beat
        while not self._stop.is_set():
            try:
                self.beat()
                if failing:
                    log.warning("heartbeat: Redis answers again")
                    failing = False
                if self.on_tick is not None:
                    self.on_tick()
            except redis.RedisError as error:
                if not failing:
                    log.warning(
                        "heartbeat failed: %s (retried every %.1f s, logged again once it works)",
                        error,
                        self.settings.heartbeat_interval_s,
                    )
                failing = True
            except Exception:
                log.exception("heartbeat tick failed")
            self._stop.wait(self.settings.heartbeat_interval_s)

    def start(self) -> None:
        """The first beat, waiting up to REDIS_RETRY_S for Redis (a worker may start before it, or while it
        loads its data), then the thread; `RedisUnreachable` if Redis never answered."""
        retry_until_reachable(self.beat, "worker start: first heartbeat", self.settings.redis_retry_s)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.client.delete(self.keys.worker_heartbeat(self.worker_id))
            self.client.srem(self.keys.workers(), self.worker_id)
        except redis.RedisError:
            pass
