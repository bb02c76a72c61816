"""The offloaded model against the plain transformers model, on the CPU tier (or on MOE_TEST_DEVICE).

- bf16 rows against the reference whose experts are rounded to bf16: same logits to float32 noise
  and the same greedy tokens.
- nf4 rows against the reference whose experts are the same rows dequantized: likewise.
- nf4 rows whose misses are computed on the CPU by the AVX2 kernel (`cpu_expert_kernel`, 12-bit integer
  products), or all of them where the CPU tier holds every expert in place: the same greedy tokens; logits
  within 2e-3 (measured 5.5e-4 for decode, 7.6e-4 over a prompt).
- nf4 rows against the untouched float32 reference: 4-bit error only. Stated tolerance: cosine
  similarity of the logits >= 0.97 (measured 0.981-0.988 on this random model, whose weights are
  the worst case for 4-bit: no outliers to spend the scale on, near-flat logits).
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from tests.worker.moe_offload.conftest import TEST_DEVICE
from tests.worker.moe_offload.deferred_copies import DeferredCopyStream
from worker.engine.cpu_extension import host_has_avx2
from worker.engine.moe_offload import builder
from worker.engine.moe_offload.budget import MemoryPlan
from worker.engine.moe_offload.builder import build_offloaded_model
from worker.engine.moe_offload.config import OffloadConfig
from worker.engine.moe_offload.converter import convert_checkpoint
from worker.engine.moe_offload.cpu_expert_kernel import CpuExpertKernel
from worker.engine.moe_offload.cpu_experts import MissSplit
from worker.engine.moe_offload.offloaded_experts import OffloadedExperts
from worker.engine.moe_offload.packing import ExpertLayout, unpack_experts


def _reference(checkpoint, experts_from=None):
    """The plain model; with `experts_from`, its experts replaced by that offloaded model's rows, unpacked."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).to(TEST_DEVICE).eval()
    if experts_from is not None:
        for name, module in experts_from.model.named_modules():
            if isinstance(module, OffloadedExperts):
                gate_up, down = unpack_experts(module.layout, module.cache.host_rows.cpu(), torch.float32)
                target = model.get_submodule(name)
                target.gate_up_proj.data.copy_(gate_up)
                target.down_proj.data.copy_(down)
    return model


def _layout(offloaded) -> ExpertLayout:
    return next(m.layout for m in offloaded.model.modules() if isinstance(m, OffloadedExperts))


def _offloaded(folder, slots: int, prefetch: bool = True, policy: str = "lru", misses: str = "copy"):
    config = OffloadConfig(cache_policy=policy, prefetch=prefetch, misses=misses, decode="host")
    return build_offloaded_model(folder, TEST_DEVICE, torch.float32, MemoryPlan(slots), config)


def _prompt(length: int = 14, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 390, (1, length), generator=torch.Generator().manual_seed(seed)).to(TEST_DEVICE)


def _greedy(model, prompt, new_tokens: int = 12) -> torch.Tensor:
    return model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("quant", ["bf16", "nf4"])
@pytest.mark.parametrize("slots,prefetch", [(32, False), (6, True), (6, False), (2, True)])
@torch.inference_mode()
def test_offloaded_model_matches_transformers_with_the_same_expert_weights(
    tiny_checkpoint, converted, quant, slots, prefetch
):
    offloaded = _offloaded(converted(quant), slots, prefetch)
    reference = _reference(tiny_checkpoint, experts_from=offloaded)
    # nf4 with every expert in place on the CPU: the 4-bit kernel's 12-bit products (see the module docstring)
    in_place = any(m.in_place_kernel is not None for m in offloaded.model.modules() if isinstance(m, OffloadedExperts))
    tolerance = 2e-3 if in_place else 1e-4
    for seed in range(2):
        prompt = _prompt(seed=seed)
        logits = offloaded.model(prompt).logits
        torch.testing.assert_close(logits, reference(prompt).logits, rtol=tolerance, atol=tolerance)
        assert torch.equal(_greedy(offloaded.model, prompt), _greedy(reference, prompt))
    stats = offloaded.experts.cache_stats()
    if slots == 32:
        assert stats.misses == 0 and stats.hits > 0
    else:
        # fewer slots than experts: every layer missed, evicted and copied rows in, and still matched
        assert stats.misses > 0 and stats.evictions > 0 and stats.bytes_copied > 0
    assert (stats.prefetched > 0) == (prefetch and slots < 32)


@pytest.mark.parametrize("quant", ["bf16", "nf4"])
@pytest.mark.parametrize("cpu_share", [1.0, 0.5])
@torch.inference_mode()
def test_misses_computed_on_the_cpu_from_host_rows_give_the_same_model(
    tiny_checkpoint, converted, monkeypatch, quant, cpu_share
):
    kernel_calls: list[int] = []
    kernel_forward = CpuExpertKernel.forward
    monkeypatch.setattr(
        CpuExpertKernel, "forward", lambda self, *args: kernel_calls.append(1) or kernel_forward(self, *args)
    )
    offloaded = _offloaded(converted(quant), slots=6, misses="cpu")
    if cpu_share < 1:  # hybrid's share is timed at load; pin it so the test knows what it runs
        for module in offloaded.model.modules():
            if isinstance(module, OffloadedExperts):
                module.miss_split = MissSplit("hybrid", cpu_share)
    reference = _reference(tiny_checkpoint, experts_from=offloaded)
    prompt = _prompt(seed=4)
    torch.testing.assert_close(offloaded.model(prompt).logits, reference(prompt).logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(_greedy(offloaded.model, prompt), _greedy(reference, prompt))
    stats = offloaded.experts.cache_stats()
    # decode steps sent misses to the CPU; the prompt (many tokens) and prefetch still copied rows
    assert 0 < stats.computed_on_host <= stats.misses
    assert stats.bytes_copied > 0
    if cpu_share < 1:
        assert stats.computed_on_host < stats.misses - stats.misses // 4  # some decode misses were copied
    # nf4 rows on an AVX2 host go through the 4-bit kernel; bf16 rows are dequantize-then-multiply's
    assert bool(kernel_calls) == (quant == "nf4" and host_has_avx2())


@pytest.mark.parametrize("misses", ["copy", "cpu"])
@torch.inference_mode()
def test_every_read_of_a_slot_waits_for_its_copy(tiny_checkpoint, converted, monkeypatch, misses):
    """With copies that land only when waited for (as on a side CUDA stream), the model still matches:
    no compute reads a slot whose copy, miss or prefetch, it did not wait for."""
    monkeypatch.setattr(builder, "CopyStream", DeferredCopyStream)
    offloaded = _offloaded(converted("nf4"), slots=6, prefetch=True, misses=misses)
    reference = _reference(tiny_checkpoint, experts_from=offloaded)
    prompt = _prompt(seed=5)
    kwargs = dict(max_new_tokens=16, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    got, want = offloaded.model.generate(prompt, **kwargs), reference.generate(prompt, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    tolerance = 2e-3 if misses == "cpu" and CpuExpertKernel.for_layout(_layout(offloaded)) else 1e-4
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), rtol=1e-4, atol=tolerance)
    stats = offloaded.experts.cache_stats()
    assert stats.prefetch_hits > 0 and stats.evictions > 0


@torch.inference_mode()
def test_prefetch_asks_the_next_layers_loaded_router(converted):
    offloaded = _offloaded(converted("nf4"), slots=8, prefetch=True)
    layers = [m for m in offloaded.model.modules() if isinstance(m, OffloadedExperts)]
    for module, following in zip(layers, layers[1:], strict=False):
        router = module.next_layer.router
        assert router.weight.device.type == TEST_DEVICE.type  # the loaded weight, not the skeleton's meta placeholder
        assert module.next_layer.cache is following.cache
    offloaded.model.generate(_prompt(seed=6), max_new_tokens=40, do_sample=False, pad_token_id=0)
    stats = offloaded.experts.cache_stats()
    # measured 266 of 365 with the loaded router; 43 of 332 when it read the placeholder (noise)
    assert stats.prefetch_hits > stats.prefetched / 2


@torch.inference_mode()
def test_nf4_experts_stay_close_to_the_float32_model(tiny_checkpoint, converted):
    offloaded = _offloaded(converted("nf4"), slots=8)
    reference = _reference(tiny_checkpoint)
    for seed in range(3):
        prompt = _prompt(seed=seed)
        got, want = offloaded.model(prompt).logits.flatten(), reference(prompt).logits.flatten()
        assert torch.nn.functional.cosine_similarity(got, want, dim=0) >= 0.97


@torch.inference_mode()
def test_lfu_policy_gives_the_same_tokens(tiny_checkpoint, converted):
    lru = _offloaded(converted("nf4"), slots=5, policy="lru")
    lfu = _offloaded(converted("nf4"), slots=5, policy="lfu")
    prompt = _prompt(seed=3)
    assert torch.equal(_greedy(lru.model, prompt, 20), _greedy(lfu.model, prompt, 20))


@torch.inference_mode()
def test_another_fused_experts_family_qwen3_moe_offloads_the_same_way(tmp_path):
    config = Qwen3MoeConfig(
        vocab_size=390,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=16,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(config).save_pretrained(tmp_path / "qwen3-moe", max_shard_size="200KB")
    folder = convert_checkpoint(tmp_path / "qwen3-moe", tmp_path / "out", "nf4", 0, show_progress=False)
    offloaded = _offloaded(folder, slots=4)
    reference = _reference(tmp_path / "qwen3-moe", experts_from=offloaded)
    prompt = _prompt()
    torch.testing.assert_close(offloaded.model(prompt).logits, reference(prompt).logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(_greedy(offloaded.model, prompt), _greedy(reference, prompt))
    assert offloaded.experts.cache_stats().misses > 0
