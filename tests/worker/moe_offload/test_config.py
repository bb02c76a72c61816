import pytest
from pydantic import ValidationError

from worker.engine.moe_offload.config import OffloadConfig


def test_expert_knobs_read_their_prefixed_variables_and_the_budgets_their_own_names(monkeypatch):
    monkeypatch.setenv("EXPERT_SLOTS", "6")
    monkeypatch.setenv("EXPERT_CACHE_POLICY", "lfu")
    monkeypatch.setenv("OFFLOAD", "experts")
    monkeypatch.setenv("GPU_MEMORY_GB", "12")
    config = OffloadConfig(_env_file=None)
    assert (config.slots, config.cache_policy, config.offload, config.gpu_memory_gb) == (6, "lfu", "experts", 12.0)
    # values given in code take precedence over the environment, by their field names
    assert OffloadConfig(_env_file=None, offload="none", slots=3).model_dump(include={"offload", "slots"}) == {
        "offload": "none",
        "slots": 3,
    }


def test_gpu_reserve_must_leave_room_for_weights():
    with pytest.raises(ValidationError, match="GPU_RESERVE_GB"):
        OffloadConfig(_env_file=None, gpu_memory_gb=2, gpu_reserve_gb=2)
    assert OffloadConfig(_env_file=None, gpu_memory_gb=0, gpu_reserve_gb=2).gpu_reserve_gb == 2  # 0 = whole GPU


def test_an_unknown_choice_is_refused():
    with pytest.raises(ValidationError, match="misses"):
        OffloadConfig(_env_file=None, misses="sometimes")
