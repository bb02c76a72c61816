"""A caller that disconnects while it waits for a /v1 answer cancels the job (the streams' way as well)."""

import asyncio

import fakeredis
import pytest

from api.services.auth import OPEN
from api.services.generation import ClientDisconnected, GenerationJobs
from api.services.jobs import JobService
from shared.schemas import GenerationParams


class GoneRequest:
    """What a request sees whose client leaves while it waits: its next ASGI message is the disconnect."""

    async def receive(self) -> dict:
        await asyncio.sleep(0.2)
        return {"type": "http.disconnect"}


async def test_disconnecting_while_waiting_cancels_the_job(server, keys, settings, celery, heartbeat):
    celery.hold = True  # the job stays queued: only the disconnect can end it
    jobs = JobService(fakeredis.FakeAsyncRedis(server=server, decode_responses=True), keys, settings, celery)
    generations = GenerationJobs(jobs, settings)
    job = await generations.submit(GenerationParams(prompt="Hi", max_tokens=4, temperature=0.0), OPEN)
    with pytest.raises(ClientDisconnected):
        await generations.outcome(job, GoneRequest())
    assert (await jobs.get(job.id, OPEN)).status == "cancelled"
    assert await jobs.client.exists(keys.job_cancel(job.id))  # a running job would stop at its next token
