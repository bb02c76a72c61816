"""Hold host-to-device traffic to a set rate, to emulate a slower bus on a faster one (the benchmark's
`--h2d-gbps`; the worker never paces).

A token bucket: credit accrues at `rate` bytes a second up to `burst`; bytes sent spend it, and past zero the
sender must wait until the debt is paid. Paying after the fact suits graph decode, whose bytes cross the bus
inside a step and are known only from its routes afterwards: the next step waits instead.
"""

import time
from collections.abc import Callable


class TokenBucket:
    def __init__(self, rate_bytes_per_s: float, burst_bytes: float, clock: Callable[[], float] = time.perf_counter):
        if rate_bytes_per_s <= 0 or burst_bytes < 0:
            raise ValueError("the rate must be positive and the burst not negative")
        self.rate = rate_bytes_per_s
        self.burst = burst_bytes
        self._clock = clock
        self._credit = burst_bytes
        self._last = clock()
        self.admitted = 0  # bytes so far, for the achieved rate

    def charge(self, nbytes: int) -> float:
        """Spend `nbytes`; returns the seconds the sender must wait before it sends anything more."""
        now = self._clock()
        self._credit = min(self.burst, self._credit + (now - self._last) * self.rate) - nbytes
        self._last = now
        self.admitted += nbytes
        return max(0.0, -self._credit / self.rate)


class Pacer:
    """A bucket and the wait it asks for: `pace(nbytes)` blocks the host until the bytes are paid for."""

    def __init__(self, bucket: TokenBucket, sleep: Callable[[float], None] = time.sleep):
        self.bucket = bucket
        self._sleep = sleep
        self.waited_s = 0.0

    def pace(self, nbytes: int) -> None:
        wait = self.bucket.charge(nbytes)
        if wait > 0:
            self._sleep(wait)
            self.waited_s += wait
