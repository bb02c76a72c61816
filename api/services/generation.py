"""One generation job, whichever API asked for it: submit it, stream its text, wait for its outcome.

Every dialect (the native /inference, OpenAI's, Anthropic's) runs its jobs through here, so that leaving
early cancels the job and a request's deadline behaves the same everywhere.
"""

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

import redis.exceptions
from starlette.requests import Request
from starlette.responses import Response

from api.errors import APIError, from_job_error, redis_unavailable
from api.services.auth import Caller
from api.services.jobs import JobService, WaitTimeout
from shared.config import Settings
from shared.schemas import ErrorType, EventType, GenerationOutcome, GenerationParams, JobError, JobKind

#: How long past a request's deadline to wait for the worker to stop at its next token and report.
DEADLINE_GRACE_S = 10.0

T = TypeVar("T")


@dataclass(frozen=True)
class TextDelta:
    text: str


GenerationEvent = TextDelta | GenerationOutcome
#: A job's events as they come; closing it early cancels the job.
GenerationStream = AsyncGenerator[GenerationEvent, None]


@dataclass(frozen=True)
class GenerationJob:
    id: str
    created: int  # epoch seconds, as OpenAI's `created`
    deadline: float | None  # epoch seconds; None = only the worker's JOB_TIMEOUT_S


class ClientDisconnected(Exception):
    """The client went away before its answer was ready; its job was cancelled."""


async def client_gone(_: Request, __: Exception) -> Response:
    return Response(status_code=499)  # nginx's "client closed request": nobody reads it, the logs do


def never_started() -> APIError:
    return APIError(
        504, ErrorType.TIMEOUT, "the request's timeout passed before its job left the queue", param="timeout"
    )


class GenerationJobs:
    def __init__(self, jobs: JobService, settings: Settings):
        self.jobs = jobs
        self.settings = settings

    async def submit(self, params: GenerationParams, caller: Caller) -> GenerationJob:
        job_id = await self.jobs.submit(JobKind.INFERENCE, params.model_dump(), caller)
        return GenerationJob(job_id, int(time.time()), params.deadline)

    def _wait_s(self, job: GenerationJob) -> float:
        if job.deadline is None:
            return self.settings.sync_wait_timeout_s
        return max(0.0, job.deadline - time.time()) + DEADLINE_GRACE_S

    async def _expire_in_queue_at_deadline(self, job: GenerationJob, deadline: float) -> None:
        await asyncio.sleep(max(0.0, deadline - time.time()))
        error = JobError(type=ErrorType.TIMEOUT, message=never_started().message, param="timeout")
        await self.jobs.expire_if_queued(job.id, error)  # a running job the worker stops at its deadline

    async def events(self, job: GenerationJob) -> GenerationStream:
        """Text deltas, then the outcome. A failed job raises its APIError (504 for one still going past the
        wait); a caller that stops reading before the end cancels the job."""
        finished = False
        wait_s = self._wait_s(job)
        expiry = (
            asyncio.create_task(self._expire_in_queue_at_deadline(job, job.deadline))
            if job.deadline is not None
            else None
        )
        try:
            async for event, data in self.jobs.events(job.id, wait_s):
                if event is EventType.TOKEN:
                    yield TextDelta(data["text"])
                    continue
                finished = True
                if event is EventType.ERROR:
                    raise from_job_error(JobError.model_validate(data))
                outcome = GenerationOutcome.model_validate(data)
                if outcome.finish_reason == "timeout" and outcome.tokens_generated == 0:
                    raise never_started()
                yield outcome
        except WaitTimeout:
            finished = True  # still going, and still there to poll at /jobs/{id}
            raise APIError(504, ErrorType.TIMEOUT, f"no result within {wait_s:.0f} s; poll /jobs/{job.id}") from None
        except redis.exceptions.RedisError as error:
            # Redis went away mid-job: the job goes on (the worker waits for Redis) and its caller gets an
            # error it can read, a stream's last event included, instead of a dropped connection.
            finished = True  # nothing can flag a cancel meanwhile
            raise redis_unavailable(error) from None
        finally:
            if expiry is not None:
                expiry.cancel()
            if not finished:
                # The caller went away mid-job (a disconnect): stop generating for nobody.
                await asyncio.shield(self.jobs.request_cancel(job.id))

    async def outcome(self, job: GenerationJob, request: Request) -> GenerationOutcome:
        """Wait for the job's outcome; a client that disconnects meanwhile cancels it (ClientDisconnected)."""
        return await until_disconnected(request, _last(self.events(job)))

    async def open_stream(self, job: GenerationJob, request: Request) -> GenerationStream:
        """The job's events, once the first has arrived: a job that fails before its first token raises here,
        while the response can still carry an error status."""
        events = self.events(job)
        first = await until_disconnected(request, anext(events))
        return _prepend(first, events)


async def _last(events: AsyncIterator[GenerationEvent]) -> GenerationOutcome:
    async for event in events:
        if isinstance(event, GenerationOutcome):
            return event
    raise AssertionError("a job's events end with its outcome")


async def _prepend(first: GenerationEvent, rest: GenerationStream) -> GenerationStream:
    try:
        yield first
        async for event in rest:
            yield event
    finally:
        await rest.aclose()  # cancels the job if the stream's reader left early


async def _disconnect(request: Request) -> None:
    # The body is read already, so the next ASGI message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or ClientDisconnected (with `work` cancelled) if the client leaves first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task  # lets the job's events run their cleanup: the job is cancelled
    raise ClientDisconnected
