"""What an inference job adds to the service-wide counters and latency histograms in Redis.

The worker hands these figures to the script that writes the job's end (`FINISH_SCRIPT` in
shared/job_record.py), which updates the counters in the same step: a job is counted once, when its end is
written, and its times (created, claimed, ended) are read from its record there.
"""

import json

from shared.histograms import LATENCY_BUCKETS, format_bound
from shared.redis_keys import RECENT_TPS_WINDOW
from shared.schemas import GenerationOutcome

_BUCKET_FIELDS = [format_bound(bound) for bound in LATENCY_BUCKETS]


def inference_figures(outcome: GenerationOutcome, first_token_at: float | None) -> str:
    """`first_token_at`: wall clock of the first streamed text, for the time-to-first-token histogram."""
    figures: dict[str, object] = {
        "tokens": outcome.tokens_generated,
        "generation_time": outcome.generation_time,
        "tokens_per_second": outcome.tokens_per_second,
        "window": RECENT_TPS_WINDOW,
        "buckets": _BUCKET_FIELDS,
    }
    if first_token_at is not None:
        figures["first_token_at"] = repr(first_token_at)  # kept in the job's record, to the microsecond
    return json.dumps(figures)
