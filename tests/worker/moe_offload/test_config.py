import pytest
from pydantic import ValidationError

from worker.engine.moe_offload.config import OffloadConfig
from worker.settings import OffloadSettings


def test_expert_knobs_read_their_prefixed_variables_and_the_budgets_their_own_names(monkeypatch):
    monkeypatch.setenv("EXPERT_SLOTS", "6")
    monkeypatch.setenv("EXPERT_CACHE_POLICY", "lfu")
    monkeypatch.setenv("OFFLOAD", "experts")
    monkeypatch.setenv("GPU_MEMORY_GB", "12")
    config = OffloadSettings(_env_file=None)
    assert isinstance(config, OffloadConfig)  # handed to the engine as it is
    assert (config.slots, config.cache_policy, config.offload, config.gpu_memory_gb) == (6, "lfu", "experts", 12.0)
    # values given in code take precedence over the environment, by their field names
    assert OffloadSettings(_env_file=None, offload="none", slots=3).model_dump(include={"offload", "slots"}) == {
        "offload": "none",
        "slots": 3,
    }
    # the engine's own config reads no environment
    assert (OffloadConfig().slots, OffloadConfig().offload) == (0, "auto")


def test_gpu_reserve_must_leave_room_for_weights():
    with pytest.raises(ValidationError, match="GPU_RESERVE_GB"):
        OffloadConfig(gpu_memory_gb=2, gpu_reserve_gb=2)
    assert OffloadConfig(gpu_memory_gb=0, gpu_reserve_gb=2).gpu_reserve_gb == 2  # 0 = whole GPU


def test_an_unknown_choice_is_refused():
    with pytest.raises(ValidationError, match="misses"):
        OffloadConfig(misses="sometimes")
