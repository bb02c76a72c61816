"""Which engine the settings ask for: the offload engine only for a fused-experts MoE that does not fit."""

import pytest

from tests.worker.moe_offload.tiny_moe import build_tiny_qwen3_next
from worker.engine.moe_offload.config import OffloadConfig
from worker.engine.moe_offload.engine import MoEOffloadEngine
from worker.engine.transformers_engine import TransformersEngine
from worker.engine_factory import create_engine, should_offload_experts
from worker.settings import EngineSettings


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory) -> EngineSettings:
    checkpoint = build_tiny_qwen3_next(tmp_path_factory.mktemp("tiny-moe"))
    return EngineSettings(_env_file=None, model_id=str(checkpoint), device="cpu")


def _offload(**values) -> OffloadConfig:
    return OffloadConfig(**values)


def test_auto_serves_a_moe_on_the_cpu_through_the_offload_engines_cpu_tier_whatever_its_size(tiny_moe):
    assert should_offload_experts(tiny_moe, _offload(offload="auto", host_memory_gb=0.001))
    assert should_offload_experts(tiny_moe, _offload(offload="auto", host_memory_gb=8))
    assert not should_offload_experts(tiny_moe, _offload(offload="none", host_memory_gb=0.001))
    assert not should_offload_experts(EngineSettings(_env_file=None), _offload(offload="auto"))  # bundled, dense


def test_the_engine_gets_the_model_path_it_is_handed_and_its_settings(tiny_moe, tmp_path):
    plain = create_engine("/models/somewhere", tiny_moe, _offload(offload="none"))
    assert isinstance(plain.inner, TransformersEngine) and not isinstance(plain.inner, MoEOffloadEngine)
    assert plain.inner.config.model_path == "/models/somewhere" and plain.model_name == tiny_moe.model_id
    assert plain.device == "cpu"
    offloaded = create_engine(tiny_moe.model_id, tiny_moe, _offload(offload="experts", slots=3))
    assert isinstance(offloaded.inner, MoEOffloadEngine)
    assert offloaded.inner.offload.slots == 3
    assert offloaded.inner.converted_root == tiny_moe.model_cache_dir / "offload"
