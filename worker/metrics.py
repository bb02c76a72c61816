"""Service-wide counters in one Redis hash, updated once per finished job."""

import time

import redis

from shared.redis_keys import RECENT_TPS_WINDOW, RedisKeys
from shared.schemas import GenerationOutcome


def record_inference(client: redis.Redis, keys: RedisKeys, outcome: GenerationOutcome) -> None:
    recent = keys.recent_tokens_per_second()
    with client.pipeline() as pipe:
        pipe.lpush(recent, outcome.tokens_per_second)
        pipe.ltrim(recent, 0, RECENT_TPS_WINDOW - 1)
        pipe.lrange(recent, 0, -1)
        window = pipe.execute()[-1]
    rolling = sum(float(value) for value in window) / len(window)
    with client.pipeline() as pipe:
        pipe.hincrby(keys.metrics(), "total_inferences", 1)
        pipe.hincrbyfloat(keys.metrics(), "total_generation_time", outcome.generation_time)
        pipe.hset(
            keys.metrics(),
            mapping={
                "avg_tokens_per_second": rolling,
                "last_inference_at": time.time(),
            },
        )
        pipe.execute()
