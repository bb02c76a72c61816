"""What the API knows of the workers: their heartbeat hashes and the service-wide metrics hash."""

import time
from dataclasses import dataclass

from redis.asyncio import Redis

from shared.config import Settings
from shared.redis_keys import RedisKeys
from shared.schemas import WorkerHeartbeat


@dataclass
class Fleet:
    workers: list[WorkerHeartbeat]  # fresh heartbeats only

    @property
    def ready(self) -> list[WorkerHeartbeat]:
        return [worker for worker in self.workers if worker.model_loaded]

    def not_ready_reason(self) -> str:
        if not self.workers:
            return "no worker is running (no fresh heartbeat in Redis)"
        failed = [w for w in self.workers if w.load_error]
        if failed:
            return f"the worker could not load the model: {failed[0].load_error}"
        loading = self.workers[0]
        return f"the model {loading.model} is still loading ({time.time() - loading.started_at:.0f} s so far)"


class FleetReader:
    def __init__(self, client: Redis, keys: RedisKeys, settings: Settings):
        self.client = client
        self.keys = keys
        self.settings = settings

    async def read(self) -> Fleet:
        worker_ids: list[str] = sorted(await self.client.smembers(self.keys.workers()))  # type: ignore[arg-type]
        if not worker_ids:
            return Fleet([])
        async with self.client.pipeline(transaction=False) as pipe:
            for worker_id in worker_ids:
                pipe.hgetall(self.keys.worker_heartbeat(worker_id))
            records = await pipe.execute()
        now, fresh, gone = time.time(), [], []
        for worker_id, record in zip(worker_ids, records, strict=True):
            heartbeat = WorkerHeartbeat.model_validate(record) if record else None
            if heartbeat is None:
                gone.append(worker_id)  # its TTL ran out: the worker is dead
            elif heartbeat.is_fresh(now, self.settings.heartbeat_stale_s):
                fresh.append(heartbeat)
        if gone:
            await self.client.srem(self.keys.workers(), *gone)
        return Fleet(fresh)

    async def metrics(self) -> dict[str, str]:
        counters: dict[str, str] = await self.client.hgetall(self.keys.metrics())  # type: ignore[assignment]
        return counters

    async def queue_depth(self) -> int:
        return int(await self.client.llen(self.keys.celery_queue(self.settings.queue_name)))

    async def running_jobs(self) -> int:
        return int(await self.client.scard(self.keys.running_jobs()))

    async def histograms(self, names: list[str]) -> list[dict[str, str]]:
        """Each named latency histogram's hash (`shared/histograms.py`), as stored."""
        async with self.client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(self.keys.histogram(name))
            hashes: list[dict[str, str]] = await pipe.execute()
        return hashes
