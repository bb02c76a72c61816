"""Latency histograms the workers fill in Redis and the API exposes to Prometheus.

Each is one Redis hash (`RedisKeys.histogram`): a count per bucket, keyed by the bucket's upper bound, plus
`sum` and `count`. Workers add to it with HINCRBY as they write a job's end (`FINISH_SCRIPT`), so any number
of workers on any machines share it, and the API turns it into Prometheus's cumulative buckets when scraped.
"""

import math
from dataclasses import dataclass

SUM_FIELD = "sum"
INF = "+Inf"


@dataclass(frozen=True)
class HistogramSpec:
    name: str
    help: str
    buckets: tuple[float, ...]  # upper bounds, ascending; +Inf is implied

    def cumulative(self, fields: dict[str, str]) -> tuple[list[tuple[str, float]], float]:
        """Prometheus's buckets from a hash as read from Redis: [(upper bound, count at or below)], and the sum."""
        running, buckets = 0.0, []
        for bound in [*map(format_bound, self.buckets), INF]:
            running += float(fields.get(bound, 0))
            buckets.append((bound, running))
        return buckets, float(fields.get(SUM_FIELD, 0.0))


def format_bound(bound: float) -> str:
    return INF if math.isinf(bound) else repr(float(bound))


#: Every histogram's buckets (one set, so that the script that fills them takes them once).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

QUEUE_WAIT = HistogramSpec("queue_wait_seconds", "From a job's submission until a worker claimed it.", LATENCY_BUCKETS)
JOB_DURATION = HistogramSpec("job_duration_seconds", "From a job's claim by a worker until its end.", LATENCY_BUCKETS)
TIME_TO_FIRST_TOKEN = HistogramSpec(
    "time_to_first_token_seconds", "From a job's submission until the worker streamed its first text.", LATENCY_BUCKETS
)
HISTOGRAMS = (QUEUE_WAIT, JOB_DURATION, TIME_TO_FIRST_TOKEN)
