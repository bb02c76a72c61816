import random

import pytest
import torch

from tests.worker.moe_offload.conftest import TEST_DEVICE
from worker.engine.moe_offload.expert_cache import ExpertCache
from worker.engine.moe_offload.transfer import CopyStream

EXPERTS, ROW_BYTES = 16, 64


def _host_rows() -> torch.Tensor:
    # Row e is filled with byte e, so a slot's content tells which expert it holds.
    rows = torch.arange(EXPERTS, dtype=torch.uint8).unsqueeze(1).repeat(1, ROW_BYTES)
    return rows.pin_memory() if TEST_DEVICE.type == "cuda" else rows


def _cache(slots: int, policy: str = "lru") -> ExpertCache:
    return ExpertCache(_host_rows(), slots, TEST_DEVICE, CopyStream(TEST_DEVICE), policy)


def _wait(cache: ExpertCache, acquired) -> None:
    cache.wait_hits(acquired)
    cache.wait_misses(acquired)


def _resident(cache: ExpertCache) -> set[int]:
    return {expert for expert in range(EXPERTS) if cache.holds(expert)}


def _assert_present(cache: ExpertCache, experts: list[int], slots: list[int]) -> None:
    for expert, slot in zip(experts, slots, strict=True):
        assert cache.holds(expert)
        # read on the compute stream, after the wait the copies' event asked for (every row is distinct)
        assert torch.equal(cache.buffer[slot].cpu(), cache.host_rows[expert])


def test_misses_then_hits_count_copies_and_bytes():
    cache = _cache(slots=4)
    first = cache.acquire([1, 2, 3])
    _wait(cache, first)
    assert first.miss_experts == [1, 2, 3] and first.hit_experts == []
    _assert_present(cache, first.miss_experts, first.miss_slots)
    second = cache.acquire([2, 3, 5])
    _wait(cache, second)
    assert second.hit_experts == [2, 3] and second.miss_experts == [5]
    _assert_present(cache, second.hit_experts + second.miss_experts, second.hit_slots + second.miss_slots)
    stats = cache.stats
    assert (stats.hits, stats.misses, stats.evictions) == (2, 4, 0)
    assert stats.bytes_copied == 4 * ROW_BYTES
    assert stats.hit_rate == pytest.approx(2 / 6)


def test_lru_evicts_the_least_recently_used_and_never_a_requested_expert():
    cache = _cache(slots=3)
    cache.acquire([0, 1, 2])
    cache.acquire([0])  # 1 is now the least recently used
    acquired = cache.acquire([0, 7])
    _wait(cache, acquired)
    assert cache.stats.evictions == 1
    assert _resident(cache) == {0, 2, 7}
    _assert_present(cache, [0, 7], acquired.hit_slots + acquired.miss_slots)


def test_lfu_keeps_the_frequently_used_expert():
    cache = _cache(slots=2, policy="lfu")
    for _ in range(5):
        cache.acquire([4])
    cache.acquire([9])
    cache.acquire([11])  # evicts 9 (used once), not 4 (used five times)
    assert _resident(cache) == {4, 11}


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_every_routed_expert_is_present_when_used_under_random_traffic(policy):
    cache = _cache(slots=5, policy=policy)
    rng = random.Random(0)
    for _ in range(300):
        if rng.random() < 0.3:
            cache.prefetch(rng.sample(range(EXPERTS), 3))
        experts = rng.sample(range(EXPERTS), rng.randint(1, 5))
        acquired = cache.acquire(experts)
        _wait(cache, acquired)
        assert sorted(acquired.hit_experts + acquired.miss_experts) == sorted(experts)
        _assert_present(cache, acquired.hit_experts + acquired.miss_experts, acquired.hit_slots + acquired.miss_slots)
        assert len(_resident(cache)) <= 5
    stats = cache.stats
    assert stats.bytes_copied == (stats.misses + stats.prefetched) * ROW_BYTES
    assert stats.evictions == stats.misses + stats.prefetched - 5


def test_prefetch_turns_a_later_miss_into_a_hit():
    cache = _cache(slots=4)
    assert cache.prefetch([6, 8]) == 2
    assert cache.prefetch([6]) == 0  # already there
    acquired = cache.acquire([6, 8, 9])
    assert acquired.hit_experts == [6, 8]
    assert cache.stats.prefetch_hits == 2 and cache.stats.prefetched == 2


def test_asking_for_more_experts_than_slots_is_refused():
    with pytest.raises(ValueError, match="3 slots"):
        _cache(slots=3).acquire([0, 1, 2, 3])


def test_a_cache_with_a_slot_for_every_expert_never_misses_and_shares_host_rows_on_the_cpu():
    cache = _cache(slots=EXPERTS)
    assert (cache.buffer is cache.host_rows) == (TEST_DEVICE.type == "cpu")
    acquired = cache.acquire(list(range(EXPERTS)))
    assert len(acquired.hit_experts) == EXPERTS and cache.stats.misses == 0


def test_copies_can_start_after_the_caller_sends_its_indices():
    cache = _cache(slots=4)
    acquired = cache.acquire([3, 4], start_copies=False)
    assert acquired.miss_slots and cache.stats.bytes_copied == 0 and acquired.misses_ready is None
    cache.start_copies(acquired)
    _wait(cache, acquired)
    assert cache.stats.bytes_copied == 2 * ROW_BYTES
    _assert_present(cache, acquired.miss_experts, acquired.miss_slots)


def test_a_device_decode_step_is_counted_refilled_and_reported_as_table_changes():
    """`graph_decode`'s side: a step read its experts from slots or from host RAM; afterwards the cache counts
    it, starts copying in up to `refills` of its misses (evicting by policy) and reports each change of
    residence."""
    cache = _cache(slots=3)
    _wait(cache, cache.acquire([0, 1, 2]))
    cache.track_table()
    assert sorted(cache.drain_table_changes()) == [(0, 0), (1, 1), (2, 2)]  # where everything is, to start
    before = cache.stats.model_copy()
    # one hit, two misses, one of them copied in over expert 0 (LRU)
    refilled, landed = cache.record_step([2, 5, 7], hits=1, refills=1)
    assert refilled == {5} and (cache.stats.hits - before.hits, cache.stats.misses - before.misses) == (1, 2)
    assert cache.stats.bytes_copied - before.bytes_copied == ROW_BYTES and cache.holds(5) and not cache.holds(0)
    assert cache.drain_table_changes() == [(0, -1), (5, 0)] and cache.drain_table_changes() == []
    cache.copier.wait(landed)  # nothing waited for the copy: the caller decides when to read its slot
    assert torch.equal(cache.buffer[0].cpu(), cache.host_rows[5])
    for _ in range(30):  # changes nobody drains stay bounded: one entry per expert at most
        cache.record_step(random.sample(range(EXPERTS), 3), hits=0, refills=3)
    assert len(cache.drain_table_changes()) <= 2 * EXPERTS


def test_a_device_step_refills_from_its_gather_scratch_on_the_device_not_over_the_bus():
    """Graph decode gathered the step's missed rows into device memory: the refill copies them from there."""
    cache = _cache(slots=3)
    _wait(cache, cache.acquire([0, 1, 2]))
    cache.track_table()
    cache.drain_table_changes()
    before = cache.stats.model_copy()
    # scratch row i holds the step's i-th expert's row where it had no slot; marked so its source shows
    scratch = torch.full((3, ROW_BYTES), 200, dtype=torch.uint8, device=TEST_DEVICE)
    scratch[1], scratch[2] = 205, 207
    cache.record_gathered(2)
    refilled, landed = cache.record_step([2, 5, 7], hits=1, refills=2, gathered=scratch)
    assert refilled == {5, 7} and landed is None  # ordered before anything queued later: no event to wait for
    assert cache.drain_table_changes() == [(0, -1), (5, 0), (1, -1), (7, 1)]
    stats = cache.stats
    assert stats.bytes_copied == before.bytes_copied  # nothing crossed the bus for the slots
    assert stats.bytes_copied_on_device - before.bytes_copied_on_device == 2 * ROW_BYTES
    assert stats.bytes_gathered - before.bytes_gathered == 2 * ROW_BYTES  # what the step itself read
    assert stats.bytes_over_bus - before.bytes_over_bus == 2 * ROW_BYTES  # once per miss, not twice
    assert (cache.buffer[0].cpu() == 205).all() and (cache.buffer[1].cpu() == 207).all()  # from the scratch
    acquired = cache.acquire([5, 7, 2])  # the host path finds them in place
    _wait(cache, acquired)
    assert sorted(acquired.hit_experts) == [2, 5, 7]


def test_under_lfu_a_device_step_copies_in_only_experts_used_more_often_than_their_victim():
    cache = _cache(slots=2, policy="lfu")
    for _ in range(3):  # experts 0 and 1 resident, used three times each
        _wait(cache, cache.acquire([0, 1]))
    cache.track_table()
    refilled, _ = cache.record_step([0, 9], hits=1, refills=1)  # 9 seen once: not worth evicting 1
    assert refilled == set() and not cache.holds(9)
    for _ in range(3):
        cache.record_step([0, 9], hits=1, refills=1)
    assert cache.holds(9) and cache.holds(0) and not cache.holds(1)  # 9 overtook 1; 0, in use, stayed
