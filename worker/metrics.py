"""Service-wide counters and latency histograms in Redis, updated once per finished job."""

import time

import redis

from shared.histograms import COUNT_FIELD, JOB_DURATION, QUEUE_WAIT, SUM_FIELD, TIME_TO_FIRST_TOKEN, HistogramSpec
from shared.redis_keys import RECENT_TPS_WINDOW, RedisKeys
from shared.schemas import GenerationOutcome


def record_inference(
    client: redis.Redis, keys: RedisKeys, job_id: str, outcome: GenerationOutcome, first_token_at: float | None
) -> None:
    """After the job's terminal event, so nobody waits on it: the rolling tokens/s, the totals, and the job's
    queue wait, duration and time to first token (from the times its record holds)."""
    recent = keys.recent_tokens_per_second()
    with client.pipeline() as pipe:
        pipe.lpush(recent, outcome.tokens_per_second)
        pipe.ltrim(recent, 0, RECENT_TPS_WINDOW - 1)
        pipe.lrange(recent, 0, -1)
        pipe.hmget(keys.job(job_id), ["created_at", "started_at", "finished_at"])
        *_, window, times = pipe.execute()
    rolling = sum(float(value) for value in window) / len(window)
    created, started, finished = (float(value) if value else None for value in times)
    observations: list[tuple[HistogramSpec, float]] = []
    if created is not None and started is not None:
        observations.append((QUEUE_WAIT, started - created))
    if started is not None and finished is not None:
        observations.append((JOB_DURATION, finished - started))
    if created is not None and first_token_at is not None:
        observations.append((TIME_TO_FIRST_TOKEN, first_token_at - created))
    with client.pipeline() as pipe:
        pipe.hincrby(keys.metrics(), "total_inferences", 1)
        pipe.hincrby(keys.metrics(), "total_tokens", outcome.tokens_generated)
        pipe.hincrbyfloat(keys.metrics(), "total_generation_time", outcome.generation_time)
        pipe.hset(keys.metrics(), mapping={"avg_tokens_per_second": rolling, "last_inference_at": time.time()})
        for spec, value in observations:
            key = keys.histogram(spec.name)
            pipe.hincrby(key, spec.bucket_of(max(0.0, value)), 1)
            pipe.hincrbyfloat(key, SUM_FIELD, max(0.0, value))
            pipe.hincrby(key, COUNT_FIELD, 1)
        pipe.execute()
