"""The benchmark's routing statistics, and its NVML memory check with stubbed readings (no GPU here)."""

import itertools

import pytest
import torch

from benchmarks.nvml_memory import MemoryWatch, OverBudgetError
from benchmarks.routing_stats import RoutingLog, routing_stats

GIB = 1024**3


def test_routing_statistics_count_distinct_experts_overlap_and_the_top_slots_share():
    log = RoutingLog(layers=2)
    for step in ([0, 1], [1, 2], [1, 3], [1, 0]):  # layer 0: 4 experts; expert 1 in every step
        log.add(0, torch.tensor(step))  # device tensors are kept, read once at the end
    log.add_step([[5, 6], [0, 1]])  # a fifth step for layer 0, the first for layer 1
    log.add(1, [5, 6])
    stats = routing_stats(log.per_layer(), slots=1)
    # layer 0: {0,1,2,3,5,6} = 6 distinct; layer 1: {0,1,5,6} = 4
    assert (stats.distinct_experts_min, stats.distinct_experts_max, stats.distinct_experts_per_layer) == (4, 6, 5.0)
    # layer 0 shares 1 of 2 with the step before three times, then 0 of 2; layer 1 shares 0 of 2
    assert stats.consecutive_overlap == pytest.approx((1 + 1 + 1 + 0 + 0) / (4 * 2 + 2))
    # the most used expert of each layer: layer 0's expert 1 (4 of 10 uses), layer 1's any one (1 of 4)
    assert stats.top_slots_coverage == pytest.approx((4 + 1) / (10 + 4)) and stats.steps == 5
    assert routing_stats(RoutingLog(3).per_layer(), slots=4) is None


def _watch(readings: list[int], allocator_peak: int, limit: int) -> MemoryWatch:
    values = itertools.chain(readings, itertools.repeat(readings[-1]))
    return MemoryWatch(lambda: next(values), lambda: allocator_peak, limit)


def test_the_nvml_peak_is_set_beside_the_allocators_and_past_the_limit_fails_loudly():
    watch = _watch([int(14.2 * GIB), int(15.3 * GIB), int(14.9 * GIB), int(14.9 * GIB)], 14 * GIB, 15 * GIB)
    for _ in range(3):
        watch.sample()
    report = watch.report()
    assert report["nvml_peak_gib"] == pytest.approx(15.3) and report["allocator_peak_gib"] == 14
    assert report["outside_allocator_gib"] == pytest.approx(1.3) and report["over_budget"]
    with pytest.raises(OverBudgetError, match="OVER BUDGET"):
        watch.check()


def test_within_the_limit_passes():
    watch = _watch([int(13.0 * GIB)] * 3, int(12.5 * GIB), 15 * GIB)
    watch.sample()
    watch.check()
    assert "within budget" in watch.describe()
