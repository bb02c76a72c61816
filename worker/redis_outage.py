"""The worker's Redis client, and how it rides out Redis being unreachable.

The client fails fast: a command gives up within a fraction of a second when Redis is down, so a job's
token loop is never held up by redis-py's own retries. The writes that must not be lost (a job's claim and
its end) go through `retry_until_reachable`, which backs off until Redis answers, within a bound.
"""

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

T = TypeVar("T")

#: What Redis answers while it is down, restarting or still loading its data (LOADING is a ConnectionError).
UNREACHABLE: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError)

FIRST_DELAY_S = 0.2
MAX_DELAY_S = 5.0


class RedisUnreachable(Exception):
    """Redis did not answer within the bound."""


def connect(redis_url: str) -> redis.Redis:
    """A client that retries a command a few times within ~0.1 s (a stale pooled connection reconnects),
    then raises."""
    return redis.Redis.from_url(
        redis_url, decode_responses=True, retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=3)
    )


def retry_until_reachable(action: Callable[[], T], what: str, limit_s: float) -> T:
    """`action()`, run again with back-off while Redis is unreachable, for at most `limit_s` seconds.

    The action must be safe to repeat: a write whose reply was lost may have been applied."""
    deadline = time.monotonic() + limit_s
    delay, failures = FIRST_DELAY_S, 0
    while True:
        try:
            result = action()
        except UNREACHABLE as error:
            failures += 1
            if failures == 1:
                log.warning("%s: Redis is unreachable (%s); retrying for up to %.0f s", what, error, limit_s)
            if time.monotonic() + delay > deadline:
                log.error("%s: gave up after %d tries over %.0f s; Redis never answered", what, failures, limit_s)
                raise RedisUnreachable(what) from error
            time.sleep(delay)
            delay = min(delay * 2, MAX_DELAY_S)
            continue
        if failures:
            log.warning("%s: done once Redis answered again (after %d failed tries)", what, failures)
        return result
