"""Runs one job against its Redis record: claim it, stream its events, write its terminal state.

Everything a caller sees comes from here: the job hash (for polling) and the job's event stream (for
sync waits and SSE), which always ends with exactly one `done` or `error` event.
"""

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import IntEnum
from typing import Any

import redis

from shared.config import Settings
from shared.job_record import CLAIM_SCRIPT, cancelled_error, jobs_finished_field
from shared.redis_keys import RedisKeys
from shared.schemas import ErrorType, EventType, JobError, JobStatus
from worker.engine.base import InvalidGenerationInput

log = logging.getLogger(__name__)


class JobContext:
    """A claimed job as its work sees it: the `GenerationControl` handed to the engine (token events out,
    cancel and deadline in), progress, and `finish` with the job's result."""

    def __init__(
        self, client: redis.Redis, keys: RedisKeys, job_id: str, deadline: float, ttl_s: int, stream_tokens: bool = True
    ):
        self.client = client
        self.keys = keys
        self.job_id = job_id
        self.deadline = deadline
        self.ttl_s = ttl_s
        self.stream_tokens = stream_tokens
        self.finished = False
        self.first_token_at: float | None = None  # wall clock, for the time-to-first-token histogram
        self._cancel_seen: bool | None = None  # fresh answer from the last emit, used once

    def emit(self, text: str) -> None:
        if not self.stream_tokens:
            return
        if self.first_token_at is None:
            self.first_token_at = time.time()
        events = self.keys.job_events(self.job_id)
        # One round trip per token: publish it and learn whether a cancel arrived.
        with self.client.pipeline(transaction=False) as pipe:
            pipe.xadd(events, {"type": EventType.TOKEN.value, "data": json.dumps({"text": text})})
            pipe.expire(events, self.ttl_s)
            pipe.exists(self.keys.job_cancel(self.job_id))
            self._cancel_seen = bool(pipe.execute()[-1])

    def cancel_requested(self) -> bool:
        seen, self._cancel_seen = self._cancel_seen, None
        if seen is None:
            seen = bool(self.client.exists(self.keys.job_cancel(self.job_id)))
        return seen

    def stop_reason(self) -> str | None:
        if self.cancel_requested():
            return "cancelled"
        if time.monotonic() > self.deadline:
            return "timeout"
        return None

    def set_progress(self, done: int, total: int) -> None:
        self.client.hset(self.keys.job(self.job_id), "progress", f"{done}/{total}")

    def finish(self, result: dict[str, Any], finish_reason: str) -> None:
        """The job's end: succeeded with `result`, or cancelled (keeping what it made) if that is why it stopped."""
        if finish_reason == "cancelled":
            self.end(JobStatus.CANCELLED, result=result, error=cancelled_error())
        else:
            self.end(JobStatus.SUCCEEDED, result=result)

    def end(self, status: JobStatus, result: dict[str, Any] | None = None, error: JobError | None = None) -> None:
        """Write the terminal state and the one terminal event in one transaction."""
        write_terminal_state(self.client, self.keys, self.job_id, self.ttl_s, status, result, error)
        self.finished = True


def write_terminal_state(
    client: redis.Redis,
    keys: RedisKeys,
    job_id: str,
    ttl_s: int,
    status: JobStatus,
    result: dict[str, Any] | None = None,
    error: JobError | None = None,
) -> None:
    job_key, events = keys.job(job_id), keys.job_events(job_id)
    fields: dict[Any, Any] = {"status": status.value, "finished_at": repr(time.time())}
    if result is not None:
        fields["result"] = json.dumps(result)
    if error is not None:
        fields["error"] = error.model_dump_json()
    event: dict[Any, Any] = (
        {"type": EventType.ERROR.value, "data": error.model_dump_json()}
        if error is not None
        else {"type": EventType.DONE.value, "data": json.dumps(result)}
    )
    with client.pipeline() as pipe:
        pipe.hset(job_key, mapping=fields)
        pipe.xadd(events, event)
        pipe.expire(events, ttl_s)
        pipe.expire(job_key, ttl_s)
        pipe.srem(keys.running_jobs(), job_id)
        pipe.hincrby(keys.metrics(), jobs_finished_field(status), 1)
        pipe.delete(keys.job_cancel(job_id))
        pipe.execute()


class Claim(IntEnum):
    """What CLAIM_SCRIPT answered."""

    EXHAUSTED = -1
    NOT_CLAIMABLE = 0
    CLAIMED = 1
    CANCEL_PENDING = 2  # claimed, but a cancel arrived before the job started


class JobRunner:
    def __init__(self, client: redis.Redis, keys: RedisKeys, settings: Settings, worker_id: str):
        self.client = client
        self.keys = keys
        self.settings = settings
        self.worker_id = worker_id
        self._claim = client.register_script(CLAIM_SCRIPT)

    def claim(self, job_id: str) -> Claim:
        claimed = Claim(
            self._claim(
                keys=[self.keys.job(job_id), self.keys.running_jobs(), self.keys.job_cancel(job_id)],
                args=[
                    self.worker_id,
                    repr(time.time()),
                    self.settings.max_job_attempts,
                    self.keys.worker_heartbeat_prefix(),
                    job_id,
                ],
            )
        )
        if claimed is Claim.EXHAUSTED:
            attempts = self.settings.max_job_attempts
            log.error("job %s failed: its worker died on each of %d attempts", job_id, attempts)
            self._end(
                job_id,
                JobStatus.FAILED,
                error=JobError(
                    type=ErrorType.INFERENCE,
                    message=f"the job stopped its worker on each of {attempts} attempts; not retried again",
                ),
            )
        return claimed

    @contextmanager
    def claimed(self, job_id: str, stream_tokens: bool = True) -> Iterator[JobContext | None]:
        """The job claimed for the block, or None when there is nothing to run (cancelled, finished, owned by a
        live worker, out of attempts: already settled). The block ends it with `job.finish(...)`. Input the
        model refuses (`InvalidGenerationInput`) fails the job as a client error and goes no further; any other
        exception fails it and propagates, for Celery to record."""
        claimed = self.claim(job_id)
        if claimed is Claim.CANCEL_PENDING:
            self._end(job_id, JobStatus.CANCELLED, error=cancelled_error())
        if claimed is not Claim.CLAIMED:
            if claimed is Claim.NOT_CLAIMABLE:
                log.info("job %s skipped: no longer queued (cancelled, finished or owned elsewhere)", job_id)
            yield None
            return
        job = JobContext(
            self.client,
            self.keys,
            job_id,
            deadline=time.monotonic() + self.settings.job_timeout_s,
            ttl_s=self.settings.job_ttl_s,
            stream_tokens=stream_tokens,
        )
        try:
            yield job
        except InvalidGenerationInput as error:
            job.end(
                JobStatus.FAILED, error=JobError(type=ErrorType.INVALID_REQUEST, message=str(error), param=error.param)
            )
            return
        except Exception as error:
            if not job.finished:
                log.exception("job %s failed", job_id)
                job.end(
                    JobStatus.FAILED,
                    error=JobError(type=ErrorType.INFERENCE, message=f"{type(error).__name__}: {error}"),
                )
            raise
        if not job.finished:
            job.end(
                JobStatus.FAILED, error=JobError(type=ErrorType.INFERENCE, message="the job ended without a result")
            )

    def _end(self, job_id: str, status: JobStatus, error: JobError) -> None:
        write_terminal_state(self.client, self.keys, job_id, self.settings.job_ttl_s, status, error=error)
