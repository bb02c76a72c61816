"""A minute of the soak benchmark (`benchmarks/soak.py`): mixed traffic in every dialect, the worker killed
twice and Redis once, and every job still ends exactly once."""

from dataclasses import asdict

import pytest

from benchmarks.soak import KINDS, soak
from tests.integration.conftest import FAST_HEARTBEAT

pytestmark = pytest.mark.integration


def test_a_minute_of_mixed_traffic_with_a_killed_worker_and_redis_loses_no_job(bundled_model_path, tmp_path):
    report = soak(1.0, 3, tmp_path, **FAST_HEARTBEAT)
    assert report.worker_kills == 2 and report.redis_restarts == 1
    assert set(report.outcomes) == set(KINDS)  # every dialect was exercised
    assert sum(counts.get("200", 0) + counts.get("202", 0) for counts in report.outcomes.values()) >= len(KINDS)
    assert report.jobs > 0
    assert report.all_accounted_for, asdict(report)
