"""The emulated bus: a token bucket never lets bytes through faster than its rate, however they come."""

import random

import pytest

from worker.engine.moe_offload.pacing import Pacer, TokenBucket


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_bytes_admitted_over_any_interval_never_exceed_the_rate_plus_the_burst():
    clock, rate, burst = FakeClock(), 1000.0, 300.0
    pacer = Pacer(TokenBucket(rate, burst, clock), sleep=clock.sleep)
    rng = random.Random(0)
    sent = []  # (time the sender may go on, bytes so far)
    total = 0
    for _ in range(500):
        clock.now += rng.choice([0.0, 0.0, 0.05, rng.random() * 0.3])  # compute between transfers, often none
        size = rng.choice([10, 100, 250, 900])
        pacer.pace(size)
        total += size
        sent.append((clock.now, total))
    for i, (start, before) in enumerate(sent):
        for end, after in sent[i + 1 :]:
            # bytes sent after the sender went on at `start` up to `end`: at most the rate over the gap, plus a burst
            assert after - before <= rate * (end - start) + burst + 1e-6
    assert total / clock.now == pytest.approx(rate, rel=0.35)  # busy enough to be held at the rate, not far below
    assert pacer.waited_s > 0 and pacer.bucket.admitted == total


def test_a_sender_slower_than_the_rate_never_waits():
    clock = FakeClock()
    pacer = Pacer(TokenBucket(1000.0, 100.0, clock), sleep=clock.sleep)
    for _ in range(20):
        clock.now += 0.2  # 100 bytes every 0.2 s: half the rate
        pacer.pace(100)
    assert pacer.waited_s == 0


def test_a_debt_is_paid_by_waiting_once():
    clock = FakeClock()
    bucket = TokenBucket(1000.0, 0.0, clock)
    assert bucket.charge(500) == pytest.approx(0.5)  # graph decode pays after the step: the next step waits
    clock.now += 0.5
    assert bucket.charge(0) == 0.0
    with pytest.raises(ValueError):
        TokenBucket(0.0, 1.0)
