"""200 concurrent submissions through the real stack: each accepted or refused with 429, none lost or run twice."""

import asyncio

import pytest

from benchmarks.load_test import run_load

pytestmark = pytest.mark.integration


def test_every_one_of_200_concurrent_submissions_is_accounted_for(stack):
    report = asyncio.run(run_load(stack, clients=200))
    assert report.accepted + report.refused_429 == 200 and not report.other_status
    assert report.accepted >= 1 and report.refused_429 >= 1  # the queue's bound (64 waiting) was reached
    assert report.succeeded == report.accepted and not report.not_succeeded  # none lost
    assert report.rerun == 0 and report.terminal_events_not_one == 0  # none ran twice
    assert report.health_checks > 0 and report.health_5xx == 0
    assert report.all_accounted_for
