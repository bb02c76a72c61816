"""Submit jobs, wait on them, stream them, poll and cancel them: everything between a route and Redis.

A job is a Redis hash (its record) plus a Redis Stream (its events). Waiting is an `XREAD BLOCK` on the
stream through `redis.asyncio`, so a thousand waiting callers cost a thousand idle sockets, not threads.
"""

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import anyio
from celery import Celery
from redis.asyncio import Redis

from api.errors import APIError, from_job_error
from api.services.auth import Caller
from api.services.fleet import Fleet, FleetReader
from shared.config import Settings
from shared.job_record import (
    ADMIT_SCRIPT,
    CANCEL_QUEUED_SCRIPT,
    cancelled_error,
    jobs_finished_field,
    new_job_fields,
    parse_job,
)
from shared.redis_keys import RedisKeys
from shared.schemas import ErrorType, EventType, JobError, JobKind, JobStatus, JobView
from shared.task_names import TASK_FOR_KIND

XREAD_BLOCK_MS = 5_000  # re-check the deadline at least this often
FLEET_REUSE_S = 0.5  # how long admission trusts a read that found a ready worker


class WaitTimeout(Exception):
    """The job is still going; the caller should poll it instead."""


class JobService:
    def __init__(self, client: Redis, keys: RedisKeys, settings: Settings, celery: Celery):
        self.client = client
        self.keys = keys
        self.settings = settings
        self.celery = celery
        self.fleet = FleetReader(client, keys, settings)
        self._cancel_queued = client.register_script(CANCEL_QUEUED_SCRIPT)
        self._admit_script = client.register_script(ADMIT_SCRIPT)
        self._fleet_seen: tuple[float, Fleet] | None = None

    # ------------------------------------------------------------------ submit

    async def _ready_fleet(self) -> Fleet:
        """The workers, read again unless a read less than FLEET_REUSE_S ago found one ready: two round trips
        saved on most submissions, at the price of admitting for that long after the last worker went (its
        job then waits in the queue, as it would within HEARTBEAT_STALE_S anyway). A fleet with no ready worker
        is always read afresh, so the first request after a model loads is not refused."""
        now = time.monotonic()
        if self._fleet_seen is not None and now - self._fleet_seen[0] < FLEET_REUSE_S:
            return self._fleet_seen[1]
        fleet = await self.fleet.read()
        self._fleet_seen = (now, fleet) if fleet.ready else None
        return fleet

    async def _admit(self, job_id: str, fields: dict[str, str]) -> None:
        """Refuse work no worker can take (503) or that would overflow the queue (429); an admitted job's
        record is written in the same round trip."""
        fleet = await self._ready_fleet()
        if not fleet.ready:
            raise APIError(
                503,
                ErrorType.MODEL_NOT_READY,
                f"model not ready: {fleet.not_ready_reason()}",
                headers={"Retry-After": "5"},
            )
        queue = self.keys.celery_queue(self.settings.queue_name)
        record = [item for field in fields.items() for item in field]
        admitted, backlog = await self._admit_script(
            keys=[queue, self.keys.arriving_jobs(), self.keys.job(job_id)],
            args=[self.settings.max_queue_depth, repr(time.time()), job_id, self.settings.job_ttl_s, *record],
        )
        if not admitted:
            metrics = await self.fleet.metrics()
            done = int(metrics.get("total_inferences", 0))
            avg_job_s = float(metrics.get("total_generation_time", 0)) / done if done else 1.0
            retry_after = max(1, math.ceil(backlog * avg_job_s / len(fleet.ready)))
            raise APIError(
                429,
                ErrorType.QUEUE_FULL,
                f"the queue is full ({backlog} jobs waiting); retry in about {retry_after} s",
                headers={"Retry-After": str(retry_after)},
            )

    async def submit(self, kind: JobKind, params: dict[str, Any], caller: Caller) -> str:
        job_id = uuid.uuid4().hex
        await self._admit(job_id, new_job_fields(kind, params, caller.client_id))
        try:
            await self._enqueue(kind, job_id)
        finally:  # in the queue now, or failed: no longer arriving
            await self.client.zrem(self.keys.arriving_jobs(), job_id)
        return job_id

    async def _enqueue(self, kind: JobKind, job_id: str) -> None:
        send = partial(
            self.celery.send_task,
            TASK_FOR_KIND[kind],
            args=[job_id],  # the worker reads the parameters from the record: no request in the broker
            task_id=job_id,
            queue=self.settings.queue_name,
        )
        try:
            # Celery's producer is blocking I/O of about a millisecond: run it off the event loop.
            await anyio.to_thread.run_sync(send)
        except Exception as error:
            await self.client.hset(
                self.keys.job(job_id),
                mapping={
                    "status": JobStatus.FAILED.value,
                    "error": JobError(type=ErrorType.SERVICE_UNAVAILABLE, message=str(error)).model_dump_json(),
                },
            )
            raise APIError(503, ErrorType.SERVICE_UNAVAILABLE, f"could not enqueue the job: {error}") from error

    # ------------------------------------------------------------------ wait / stream

    async def events(self, job_id: str, timeout_s: float) -> AsyncIterator[tuple[EventType, dict[str, Any]]]:
        """The job's events from the first, ending after its terminal event; WaitTimeout past timeout_s."""
        stream = self.keys.job_events(job_id)
        deadline = asyncio.get_running_loop().time() + timeout_s
        last_id = "0-0"
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise WaitTimeout(job_id)
            block_ms = max(1, min(XREAD_BLOCK_MS, int(remaining * 1000)))
            reply: Any = await self.client.xread({stream: last_id}, block=block_ms, count=256)
            for _, entries in reply or ():
                for entry_id, fields in entries:
                    last_id = entry_id
                    event = EventType(fields["type"])
                    yield event, json.loads(fields["data"])
                    if event is not EventType.TOKEN:
                        return

    async def wait_result(self, job_id: str, timeout_s: float) -> dict[str, Any]:
        """The job's result, or the APIError its failure maps to; WaitTimeout if it runs past timeout_s."""
        async for event, data in self.events(job_id, timeout_s):
            if event is EventType.DONE:
                return data
            if event is EventType.ERROR:
                raise from_job_error(JobError.model_validate(data))
        raise WaitTimeout(job_id)  # the stream ended without a terminal event (expired)

    # ------------------------------------------------------------------ poll / cancel

    async def get(self, job_id: str, caller: Caller) -> JobView:
        """The job, if `caller` may see it: another client's job is as unknown as a job that never was."""
        fields: dict[str, str] = await self.client.hgetall(self.keys.job(job_id))  # type: ignore[assignment]
        if not fields or not caller.may_see(fields.get("client")):
            raise APIError(404, ErrorType.NOT_FOUND, f"no job with id '{job_id}' (unknown or expired)", param="job_id")
        return parse_job(job_id, fields)

    async def cancel(self, job_id: str, caller: Caller) -> JobView:
        job = await self.get(job_id, caller)
        if job.status.is_terminal:
            raise APIError(
                409, ErrorType.INVALID_REQUEST, f"job '{job_id}' already finished ({job.status})", param="job_id"
            )
        await self.request_cancel(job_id)
        return await self.get(job_id, caller)

    async def request_cancel(self, job_id: str) -> None:
        """Flag first, then cancel in place if still queued: a running job sees the flag at its next token."""
        await self.client.set(self.keys.job_cancel(job_id), "1", ex=self.settings.job_ttl_s)
        await self.expire_if_queued(job_id, cancelled_error())

    async def expire_if_queued(self, job_id: str, error: JobError) -> bool:
        """End a job that has not started with `error` (waking its waiters); False if it already left the queue."""
        return bool(
            await self._cancel_queued(
                keys=[self.keys.job(job_id), self.keys.job_events(job_id), self.keys.metrics()],
                args=[
                    repr(time.time()),
                    error.model_dump_json(),
                    self.settings.job_ttl_s,
                    jobs_finished_field(JobStatus.CANCELLED),
                ],
            )
        )
