"""The fused Gated DeltaNet decode step against transformers' reference recurrence: output and state."""

import pytest
import torch
from transformers.models.qwen3_next import modeling_qwen3_next

from worker.engine.cpu_extension import host_has_avx2
from worker.engine.moe_offload import delta_rule

needs_avx2 = pytest.mark.skipif(not host_has_avx2(), reason="the kernel needs AVX2")


def _inputs(key_heads: int, heads: int, dk: int, dv: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(1, 1, key_heads, dk, generator=generator)
    key = torch.randn(1, 1, key_heads, dk, generator=generator)
    value = torch.randn(1, 1, heads, dv, generator=generator)
    g = -torch.rand(1, 1, heads, generator=generator) * 2
    beta = torch.rand(1, 1, heads, generator=generator)
    state = torch.randn(1, heads, dk, dv, generator=generator) * 0.1
    return query, key, value, g, beta, state


@needs_avx2
@pytest.mark.parametrize(("key_heads", "heads", "dk", "dv"), [(2, 4, 32, 32), (16, 32, 128, 128), (1, 3, 16, 48)])
def test_the_fused_step_gives_the_reference_output_and_state(key_heads, heads, dk, dv):
    assert delta_rule.load_delta_step() is not None  # AVX2 is here: the kernel must build
    query, key, value, g, beta, state = _inputs(key_heads, heads, dk, dv)
    want_out, want_state = delta_rule.REFERENCE(
        query, key, value, g, beta, state.clone(), output_final_state=True, use_qk_l2norm_in_kernel=True
    )
    fused_state = state.clone()
    out, returned = delta_rule.fused_recurrent_gated_delta_rule(
        query,
        key,
        value,
        g,
        beta,
        fused_state,
        output_final_state=True,
        use_qk_l2norm_in_kernel=True,
        step=delta_rule.load_delta_step(),
    )
    assert returned is fused_state  # updated in place, as the cache holds it
    assert out.shape == want_out.shape and out.dtype == want_out.dtype
    torch.testing.assert_close(out, want_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused_state, want_state, rtol=1e-4, atol=1e-5)


@needs_avx2
def test_what_the_kernel_does_not_cover_goes_to_the_reference():
    query, key, value, g, beta, state = _inputs(2, 4, 32, 32)
    two_tokens = [torch.cat([t, t], dim=1) for t in (query, key, value, g, beta)]
    want = delta_rule.REFERENCE(*two_tokens, state.clone(), output_final_state=True, use_qk_l2norm_in_kernel=True)
    state_before = state.clone()
    got = delta_rule.fused_recurrent_gated_delta_rule(
        *two_tokens, state, output_final_state=True, use_qk_l2norm_in_kernel=True, step=delta_rule.load_delta_step()
    )
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(state, state_before)  # the reference never writes its input state


@needs_avx2
def test_installing_routes_transformers_decode_through_the_kernel(monkeypatch):
    monkeypatch.setattr(modeling_qwen3_next, "torch_recurrent_gated_delta_rule", delta_rule.REFERENCE)
    monkeypatch.setattr(modeling_qwen3_next, "causal_conv1d_update", delta_rule.CONV_REFERENCE)
    assert delta_rule.install_fused_delta_rule()
    installed = modeling_qwen3_next.torch_recurrent_gated_delta_rule
    assert installed.func is delta_rule.fused_recurrent_gated_delta_rule
    assert installed.keywords == {"step": delta_rule.load_delta_step()}
    assert modeling_qwen3_next.causal_conv1d_update is delta_rule.conv1d_update


@pytest.mark.parametrize(("kernel", "state_len"), [(4, 4), (4, 3)])
def test_the_short_convolution_step_gives_the_reference_output_and_state(kernel, state_len):
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(1, 24, 1, generator=generator)
    state = torch.randn(1, 24, state_len, generator=generator)
    weight = torch.randn(24, kernel, generator=generator)
    bias = torch.randn(24, generator=generator)
    want_state = state.clone()
    want = delta_rule.CONV_REFERENCE(hidden, want_state, weight, bias, activation="silu")
    got = delta_rule.conv1d_update(hidden, state, weight, bias, activation="silu")
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(state, want_state)


@pytest.mark.slow
@needs_avx2
def test_the_installed_step_compiles_into_one_graph(monkeypatch):
    """The op is bound at install, so a compiled decode step traces through it without a graph break (a
    look-up of the op inside the step broke the graph at every DeltaNet layer)."""
    monkeypatch.setattr(modeling_qwen3_next, "torch_recurrent_gated_delta_rule", delta_rule.REFERENCE)
    monkeypatch.setattr(modeling_qwen3_next, "causal_conv1d_update", delta_rule.CONV_REFERENCE)
    assert delta_rule.install_fused_delta_rule()
    rule = modeling_qwen3_next.torch_recurrent_gated_delta_rule
    query, key, value, g, beta, state = _inputs(2, 4, 32, 32)
    want, _ = rule(query, key, value, g, beta, state.clone(), output_final_state=True, use_qk_l2norm_in_kernel=True)

    def step(*args):
        return rule(*args, output_final_state=True, use_qk_l2norm_in_kernel=True)[0]

    got = torch.compile(step, fullgraph=True)(query, key, value, g, beta, state)  # fullgraph: a break raises
    torch.testing.assert_close(got, want)
