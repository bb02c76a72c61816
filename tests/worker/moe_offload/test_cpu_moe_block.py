"""The CPU tier's MoE block against transformers' block over the same parts: routing, output, expert use."""

import pytest
import torch
from transformers.models.qwen3_next import modeling_qwen3_next

from tests.worker.cpu_quant.reference import dequantize
from tests.worker.moe_offload.test_engine import _tiny
from worker.engine.cpu_extension import host_has_avx2
from worker.engine.moe_offload.config import OffloadConfig
from worker.engine.moe_offload.cpu_moe_block import CpuSparseMoeBlock
from worker.engine.moe_offload.engine import MoEOffloadEngine

pytestmark = pytest.mark.skipif(not host_has_avx2(), reason="the CPU kernels need AVX2")


@pytest.fixture(scope="module")
def blocks(converted, tmp_path_factory):
    """Each layer's transformers block (int4 dense layers, experts in place) and the CPU block built from it."""
    engine = MoEOffloadEngine(
        _tiny(converted("nf4"), cpu_weights="int4"), OffloadConfig(quant="nf4"), tmp_path_factory.mktemp("cache")
    )
    engine.load()
    replaced = [m for m in engine.model.modules() if isinstance(m, CpuSparseMoeBlock)]
    assert replaced, "the engine put no CPU block in"
    return engine, replaced


@pytest.mark.parametrize("tokens", [1, 5, 40])  # decode; a short prompt (kernel rows); a long one (unpacked rows)
@torch.inference_mode()
def test_the_block_routes_and_mixes_as_transformers_does(blocks, tokens):
    engine, replaced = blocks
    block = replaced[0]
    config = engine.model.config
    hidden = torch.randn(1, tokens, config.hidden_size, generator=torch.Generator().manual_seed(tokens))
    reference = modeling_qwen3_next.Qwen3NextSparseMoeBlock(config).eval()
    with torch.no_grad():  # the same weights: the router's, the shared expert's unpacked codes
        reference.gate.weight.copy_(block.router_weight)
        size = block.shared_size
        shared = dequantize(block.shared_gate_up.packed())
        reference.shared_expert.gate_proj.weight.copy_(shared[:size])
        reference.shared_expert.up_proj.weight.copy_(shared[size : 2 * size])
        reference.shared_expert_gate.weight.copy_(shared[2 * size :])
        reference.shared_expert.down_proj.weight.copy_(dequantize(block.shared_down.packed()))
    reference.experts = block.experts  # the same 4-bit experts, through the same kernel
    hits_before = block.experts.cache.stats.hits
    got = block(hidden)
    assert block.experts.cache.stats.hits - hits_before == tokens * config.num_experts_per_tok
    want = reference(hidden)
    assert got.shape == hidden.shape
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


def test_blocks_it_does_not_cover_stay_as_they_are(blocks):
    engine, _ = blocks
    float_block = modeling_qwen3_next.Qwen3NextSparseMoeBlock(engine.model.config)
    assert not CpuSparseMoeBlock.covers(float_block)  # float experts and shared expert
    assert not CpuSparseMoeBlock.covers(torch.nn.Linear(4, 4))
