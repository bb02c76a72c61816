"""Runs one job against its Redis record: claim it, stream its events, write its terminal state.

Everything a caller sees comes from here: the job hash (for polling) and the job's event stream (for
sync waits and SSE), which always ends with exactly one `done` or `error` event.
"""

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from enum import IntEnum
from typing import Any

import redis

from shared.config import Settings
from shared.histograms import JOB_DURATION, QUEUE_WAIT, TIME_TO_FIRST_TOKEN
from shared.job_record import CLAIM_SCRIPT, FINISH_SCRIPT, SEND_HELD_TOKENS_SCRIPT, cancelled_error
from shared.redis_keys import RedisKeys
from shared.schemas import ErrorType, EventType, GenerationOutcome, JobError, JobStatus
from worker.engine.base import InvalidGenerationInput
from worker.metrics import inference_figures
from worker.redis_outage import UNREACHABLE, RedisUnreachable, retry_until_reachable

log = logging.getLogger(__name__)

#: While Redis is unreachable, a running job tries it again this often (tokens and cancel checks).
REDIS_RETRY_INTERVAL_S = 1.0
#: A job whose tokens are not streamed asks Redis for a cancel at most this often (a streamed job learns it with
#: each token's write): a round trip per token would cost more than the token on a fast model.
CANCEL_CHECK_INTERVAL_S = 0.05


def wants_token_events(params: dict[str, Any]) -> bool:
    """Whether an inference job's tokens go out as events: only a streamed response reads them. Read from the
    raw parameters at the claim; they are validated within the claimed block, so that bad ones fail the job."""
    return params.get("stream_tokens", True) is not False


class JobContext:
    """A claimed job as its work sees it: the `GenerationControl` handed to the engine (token events out,
    cancel and deadline in), progress, and `finish` with the job's result.

    While Redis is unreachable the job goes on: its tokens are held back and sent once Redis answers (if the
    job is still this worker's), and its end is retried until Redis answers, within `REDIS_RETRY_S`."""

    def __init__(
        self,
        client: redis.Redis,
        keys: RedisKeys,
        job_id: str,
        deadline: float,
        ttl_s: int,
        owner: str,
        retry_s: float,
        stream_tokens: bool = True,
        params: dict[str, Any] | None = None,
    ):
        self.client = client
        self.keys = keys
        self.job_id = job_id
        self.deadline = deadline
        self.ttl_s = ttl_s
        self.owner = owner
        self.retry_s = retry_s
        self.stream_tokens = stream_tokens
        self.params = params or {}  # the job's parameters as its record holds them (validated by the task)
        self.finished = False
        self.lost = False  # another worker took the job over while Redis was out of this one's reach
        self.first_token_at: float | None = None  # wall clock, for the time-to-first-token histogram
        self._cancel_seen: bool | None = None  # fresh answer from the last emit, used once
        self._cancel_checked_at = time.monotonic()  # the claim has just looked
        self._held_back: list[str] = []  # token event data not yet in the stream
        self._unreachable_until = 0.0  # monotonic time before which Redis is not tried again
        self._outage_logged = False

    def emit(self, text: str) -> None:
        if not self.stream_tokens or self.lost:
            return
        if self.first_token_at is None:
            self.first_token_at = time.time()
        data = json.dumps({"text": text})
        if self._held_back or self._redis_resting():
            self._held_back.append(data)
            self._send_held_back()
            return
        events = self.keys.job_events(self.job_id)
        try:
            # One round trip per token: publish it and learn whether a cancel arrived.
            with self.client.pipeline(transaction=False) as pipe:
                pipe.xadd(events, {"type": EventType.TOKEN.value, "data": data})
                pipe.expire(events, self.ttl_s)
                pipe.exists(self.keys.job_cancel(self.job_id))
                self._cancel_seen = bool(pipe.execute()[-1])
        except UNREACHABLE as error:
            self._held_back.append(data)
            self._lose_redis(error)

    def _send_held_back(self, now: bool = False) -> None:
        if self._redis_resting() and not now:
            return
        try:
            answer = self.client.register_script(SEND_HELD_TOKENS_SCRIPT)(
                keys=[self.keys.job(self.job_id), self.keys.job_events(self.job_id), self.keys.job_cancel(self.job_id)],
                args=[self.owner, self.ttl_s, *self._held_back],
            )
        except UNREACHABLE as error:
            self._lose_redis(error)
            return
        if answer == -1:
            log.warning(
                "job %s: Redis answers again, but another worker has taken the job over; this attempt stops",
                self.job_id,
            )
            self.lost = True
        else:
            log.warning("job %s: Redis answers again; %d held-back tokens sent", self.job_id, len(self._held_back))
        self._held_back.clear()
        self._cancel_seen = answer == 1

    def _redis_resting(self) -> bool:
        return time.monotonic() < self._unreachable_until

    def _lose_redis(self, error: Exception) -> None:
        if not self._outage_logged:
            log.warning("job %s: Redis is unreachable (%s); the job goes on, its tokens held back", self.job_id, error)
            self._outage_logged = True
        self._unreachable_until = time.monotonic() + REDIS_RETRY_INTERVAL_S

    def cancel_requested(self) -> bool:
        seen, self._cancel_seen = self._cancel_seen, None
        if seen is None:
            if self._redis_resting():
                return False  # asked again once Redis answers
            if time.monotonic() - self._cancel_checked_at < CANCEL_CHECK_INTERVAL_S:
                return False
            try:
                seen = bool(self.client.exists(self.keys.job_cancel(self.job_id)))
            except UNREACHABLE as error:
                self._lose_redis(error)
                return False
        self._cancel_checked_at = time.monotonic()
        return seen

    def stop_reason(self) -> str | None:
        if self.lost:
            return "cancelled"  # the attempt that took the job over answers for it
        if self.cancel_requested():
            return "cancelled"
        if time.monotonic() > self.deadline:
            return "timeout"
        return None

    def set_progress(self, done: int, total: int) -> None:
        try:
            self.client.hset(self.keys.job(self.job_id), "progress", f"{done}/{total}")
        except UNREACHABLE as error:
            self._lose_redis(error)  # progress is only informative; the next one replaces it

    def finish(self, result: dict[str, Any], finish_reason: str, counted: GenerationOutcome | None = None) -> bool:
        """The job's end: succeeded with `result`, or cancelled (keeping what it made) if that is why it stopped.
        `counted`: an inference's outcome, added to the service's counters with the end. True when written; see
        `end`."""
        figures = "" if counted is None else inference_figures(counted, self.first_token_at)
        if finish_reason == "cancelled":
            return self.end(JobStatus.CANCELLED, result=result, error=cancelled_error(), figures=figures)
        return self.end(JobStatus.SUCCEEDED, result=result, figures=figures)

    def end(
        self,
        status: JobStatus,
        result: dict[str, Any] | None = None,
        error: JobError | None = None,
        figures: str = "",
    ) -> bool:
        """Write the held-back tokens, the terminal state and the one terminal event, retried while Redis is
        unreachable. False when not written: the job was taken over by another worker, or Redis did not answer
        within `REDIS_RETRY_S` (the watchdog then re-queues it, see `shared.job_record.is_orphaned`)."""
        self.finished = True

        def write() -> bool:
            if self._held_back and not self.lost:
                self._send_held_back(now=True)
                if self._held_back:
                    raise redis.ConnectionError("Redis is still unreachable")
            if self.lost:
                return False
            return write_terminal_state(
                self.client,
                self.keys,
                self.job_id,
                self.ttl_s,
                status,
                result,
                error,
                owner=self.owner,
                figures=figures,
            )

        try:
            written = retry_until_reachable(write, f"job {self.job_id}: writing its end", self.retry_s)
        except RedisUnreachable:
            return False
        if not written:
            log.warning("job %s: its end was not written: the job is no longer this worker's", self.job_id)
        return written


def write_terminal_state(
    client: redis.Redis,
    keys: RedisKeys,
    job_id: str,
    ttl_s: int,
    status: JobStatus,
    result: dict[str, Any] | None = None,
    error: JobError | None = None,
    owner: str = "",
    figures: str = "",
) -> bool:
    """The terminal state and event in one script, over a running job owned by `owner` ('' = any owner), with
    `figures` (`inference_figures`) added to the service's counters. True when written."""
    fields: dict[str, str] = {"status": status.value}
    if result is not None:
        fields["result"] = json.dumps(result)
    if error is not None:
        fields["error"] = error.model_dump_json()
    event_type, data = (
        (EventType.ERROR.value, error.model_dump_json())
        if error is not None
        else (EventType.DONE.value, json.dumps(result))
    )
    pairs = [item for field in fields.items() for item in field]
    histograms = [keys.histogram(spec.name) for spec in (QUEUE_WAIT, JOB_DURATION, TIME_TO_FIRST_TOKEN)]
    written = client.register_script(FINISH_SCRIPT)(
        keys=[
            keys.job(job_id),
            keys.job_events(job_id),
            keys.running_jobs(),
            keys.job_cancel(job_id),
            keys.metrics(),
            keys.recent_tokens_per_second(),
            *histograms,
        ],
        args=[owner, ttl_s, event_type, data, job_id, repr(time.time()), figures, *pairs],
    )
    return bool(written)


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
        """Retried while Redis is unreachable (the same claim answers the same: see CLAIM_SCRIPT); raises
        `RedisUnreachable` past `REDIS_RETRY_S`."""
        return self._claim_and_read(job_id)[0]

    def _claim_and_read(self, job_id: str) -> tuple[Claim, dict[str, Any]]:
        """The claim, and the job's parameters from its record in the same round trip: the task's message
        carries the job id alone, so that no broker message (nor Flower, which shows them) holds a request."""
        keys = [self.keys.job(job_id), self.keys.running_jobs(), self.keys.job_cancel(job_id)]
        args: list[str | int | float] = [
            self.worker_id,
            repr(time.time()),
            self.settings.max_job_attempts,
            self.keys.worker_heartbeat_prefix(),
            job_id,
            self.keys.job_recovery_lock_prefix(job_id),
        ]

        def claim_and_read() -> list:
            pipe = self.client.pipeline(transaction=False)
            self._claim(keys=keys, args=args, client=pipe)
            pipe.hget(self.keys.job(job_id), "params")
            return pipe.execute()

        code, raw_params = retry_until_reachable(claim_and_read, f"job {job_id}: claim", self.settings.redis_retry_s)
        claimed = Claim(code)
        if claimed is Claim.EXHAUSTED:
            attempts = self.settings.max_job_attempts
            log.error("job %s failed: its worker died on each of %d attempts", job_id, attempts)
            self._end(
                job_id,
                JobStatus.FAILED,
                owner="",
                error=JobError(
                    type=ErrorType.INFERENCE,
                    message=f"the job stopped its worker on each of {attempts} attempts; not retried again",
                ),
            )
        return claimed, json.loads(raw_params) if raw_params else {}

    @contextmanager
    def claimed(self, job_id: str, stream_tokens: bool | None = None) -> Iterator[JobContext | None]:
        """The job claimed for the block, or None when there is nothing to run (cancelled, finished, owned by a
        live worker, out of attempts: already settled); its parameters are `job.params`, as its record holds
        them. `stream_tokens` None: as an inference job's parameters ask (`wants_token_events`). The block
        ends it with `job.finish(...)`. Input the
        model refuses (`InvalidGenerationInput`) fails the job as a client error and goes no further; any other
        exception fails it and propagates, for Celery to record."""
        claimed, params = self._claim_and_read(job_id)
        if claimed is Claim.CANCEL_PENDING:
            self._end(job_id, JobStatus.CANCELLED, owner=self.worker_id, error=cancelled_error())
        if claimed is not Claim.CLAIMED:
            if claimed is Claim.NOT_CLAIMABLE:
                log.info("job %s skipped: no longer queued (cancelled, finished or owned elsewhere)", job_id)
            yield None
            return
        if self.settings.log_requests:
            log.info("job %s request: %s", job_id, json.dumps(params))
        job = JobContext(
            self.client,
            self.keys,
            job_id,
            deadline=time.monotonic() + self.settings.job_timeout_s,
            ttl_s=self.settings.job_ttl_s,
            owner=self.worker_id,
            retry_s=self.settings.redis_retry_s,
            stream_tokens=wants_token_events(params) if stream_tokens is None else stream_tokens,
            params=params,
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

    def _end(self, job_id: str, status: JobStatus, owner: str, error: JobError) -> None:
        """End a job that never ran here; if Redis stays unreachable the watchdog finds it again."""
        with suppress(RedisUnreachable):
            retry_until_reachable(
                lambda: write_terminal_state(
                    self.client, self.keys, job_id, self.settings.job_ttl_s, status, error=error, owner=owner
                ),
                f"job {job_id}: writing its end",
                self.settings.redis_retry_s,
            )
