"""The memory plan's arithmetic: what GPU_MEMORY_GB leaves the slots once every need is counted."""

import pytest
from transformers import Qwen3NextConfig

from worker.engine.moe_offload.budget import (
    DeviceMemoryNeeds,
    MemoryBudgetError,
    dequantized_expert_bytes,
    linear_attention_state_bytes,
    plan_memory,
    prefill_activation_bytes,
    process_limit_bytes,
)

GIB, MIB = 1024**3, 1024**2
ROW = 1_769_472  # one Qwen3-Next expert, NF4


def _plan(budget_gb: float, needs: DeviceMemoryNeeds, resident: int = int(4.41 * GIB), **overrides):
    values = dict(
        device_budget_gb=budget_gb,
        reserve_gb=0,
        host_budget_gb=0,
        resident_bytes=resident,
        num_layers=48,
        experts_per_layer=512,
        row_bytes=ROW,
        top_k=10,
        needs=needs,
    )
    values.update(overrides)
    return plan_memory(**values)


def test_a_16_gb_budget_holds_the_whole_process_to_15_gib():
    assert process_limit_bytes(16) == 15 * GIB
    needs = DeviceMemoryNeeds(kv_cache=96 * MIB, linear_attention_state=74 * MIB, gather_scratch=48 * 10 * ROW)
    plan = _plan(16, needs)
    assert sum(plan.breakdown.values()) == 15 * GIB  # every byte of the limit is accounted for
    assert 0 <= plan.breakdown["left"] < 48 * ROW  # less than another slot per layer is left over
    expected = (15 * GIB - int(4.41 * GIB) - needs.total) // (48 * ROW)
    assert plan.slots_per_layer == expected
    # torch's allocator gets the limit less what it never sees
    assert plan.allocator_limit_bytes == 15 * GIB - needs.cuda_context


def test_every_need_takes_its_bytes_from_the_slots():
    base = _plan(16, DeviceMemoryNeeds())
    more_kv = _plan(16, DeviceMemoryNeeds(kv_cache=20 * 48 * ROW))
    assert base.slots_per_layer - more_kv.slots_per_layer == 20
    assert _plan(16, DeviceMemoryNeeds(), card_margin_gb=0.5).slots_per_layer > base.slots_per_layer


def test_too_small_a_budget_is_refused_with_what_it_needs():
    with pytest.raises(MemoryBudgetError, match=r"at least .* GiB is needed .*resident_weights 4\.41"):
        _plan(6, DeviceMemoryNeeds())


def test_the_flat_reserve_stays_as_it_was_without_needs():
    plan = _plan(16, None, reserve_gb=1.5)
    assert plan.slots_per_layer == int((14.5 * GIB - int(4.41 * GIB)) // (48 * ROW)) and plan.breakdown == {}


def test_state_and_prefill_estimates_follow_the_config():
    config = Qwen3NextConfig(num_hidden_layers=48, full_attention_interval=4)  # 36 DeltaNet layers
    one_layer = linear_attention_state_bytes(Qwen3NextConfig(num_hidden_layers=1, full_attention_interval=4))
    assert linear_attention_state_bytes(config) == 36 * one_layer > 0
    assert prefill_activation_bytes(config, 8192) > prefill_activation_bytes(config, 512) > 0


def test_the_prompts_dequantized_experts_grow_with_the_slots():
    """The prompt dequantizes a group of up to `slots` experts at once: each slot costs its rows in every layer
    and one dequantized expert, and the plan balances the two."""
    per_slot = dequantized_expert_bytes(3 * 2048 * 512)
    plan = _plan(16, DeviceMemoryNeeds(prefill_bytes_per_slot=per_slot))
    slots = plan.slots_per_layer
    assert plan.breakdown["prefill_dequantized_experts"] == slots * per_slot
    assert sum(plan.breakdown.values()) == 15 * GIB and 0 <= plan.breakdown["left"] < 48 * ROW + per_slot
    assert slots < _plan(16, DeviceMemoryNeeds()).slots_per_layer
