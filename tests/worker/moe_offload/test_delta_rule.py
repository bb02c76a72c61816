"""The fused Gated DeltaNet decode step against transformers' reference recurrence: output and state; and the
fused layer decode against transformers' own layer forward: outputs, recurrent and convolution states."""

import pytest
import torch
from transformers import DynamicCache, Qwen3NextConfig, StaticCache
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


def _restore_reference(monkeypatch) -> None:
    """Whatever an install puts in transformers' module goes back after the test."""
    monkeypatch.setattr(modeling_qwen3_next, "torch_recurrent_gated_delta_rule", delta_rule.REFERENCE)
    monkeypatch.setattr(modeling_qwen3_next, "causal_conv1d_update", delta_rule.CONV_REFERENCE)
    monkeypatch.setattr(modeling_qwen3_next.Qwen3NextGatedDeltaNet, "forward", delta_rule.FORWARD_REFERENCE)


@needs_avx2
def test_installing_routes_transformers_decode_through_the_kernel(monkeypatch):
    _restore_reference(monkeypatch)
    assert delta_rule.install_fused_delta_rule()
    installed = modeling_qwen3_next.torch_recurrent_gated_delta_rule
    assert installed.func is delta_rule.fused_recurrent_gated_delta_rule
    assert installed.keywords == {"step": delta_rule.load_delta_step()}
    assert modeling_qwen3_next.causal_conv1d_update is delta_rule.conv1d_update
    forward = modeling_qwen3_next.Qwen3NextGatedDeltaNet.forward
    assert forward.__qualname__.startswith(delta_rule.bound_decode_forward.__name__)
    assert delta_rule.load_layer_decode() in [cell.cell_contents for cell in forward.__closure__]


def _delta_layer(key_heads: int, heads: int, dk: int, dv: int):
    """A DeltaNet layer of random weights, and its config."""
    config = Qwen3NextConfig(
        hidden_size=64,
        num_hidden_layers=1,
        layer_types=["linear_attention"],
        linear_num_key_heads=key_heads,
        linear_num_value_heads=heads,
        linear_key_head_dim=dk,
        linear_value_head_dim=dv,
        vocab_size=32,
        num_experts=4,
        num_experts_per_tok=2,
    )
    torch.manual_seed(key_heads * 100 + heads)
    layer = modeling_qwen3_next.Qwen3NextGatedDeltaNet(config, 0).eval()
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.normal_(0, 0.1)
        layer.A_log.uniform_(-1, 1)
        layer.norm.weight.normal_(1, 0.1)
    return layer, config


def _prompt_then_decode(layer, config, hidden: torch.Tensor, prompt: int) -> tuple[torch.Tensor, ...]:
    """The prompt in one call, then one token a call, over one cache: outputs, recurrent state, conv state."""
    cache = DynamicCache(config=config)
    outputs = [layer(hidden[:, :prompt], cache=cache)]
    outputs += [layer(hidden[:, t : t + 1], cache=cache) for t in range(prompt, hidden.shape[1])]
    states = cache.layers[0]
    return torch.cat(outputs, dim=1), states.recurrent_states[0].clone(), states.conv_states[0].clone()


@needs_avx2
@pytest.mark.parametrize(("key_heads", "heads", "dk", "dv"), [(2, 4, 16, 24), (1, 3, 32, 16)])
@torch.inference_mode()
def test_the_fused_layer_decode_gives_the_layers_outputs_and_states(monkeypatch, key_heads, heads, dk, dv):
    """Five prompt tokens (the reference's prefill either way), then four decode tokens: through transformers'
    forward with its reference recurrence and convolution, and through the installed layer decode."""
    _restore_reference(monkeypatch)
    layer, config = _delta_layer(key_heads, heads, dk, dv)
    hidden = torch.randn(1, 9, 64, generator=torch.Generator().manual_seed(7))
    want = _prompt_then_decode(layer, config, hidden, prompt=5)
    calls: list[int] = []
    assert delta_rule.install_fused_delta_rule()
    decode = delta_rule.load_layer_decode()
    assert decode is not None
    monkeypatch.setattr(
        modeling_qwen3_next.Qwen3NextGatedDeltaNet,
        "forward",
        delta_rule.bound_decode_forward(lambda *args: calls.append(1) or decode(*args)),
    )
    got = _prompt_then_decode(layer, config, hidden, prompt=5)
    assert len(calls) == 4  # each decode token, not the prompt
    for actual, expected in zip(got, want, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


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


@pytest.mark.slow
@needs_avx2
@torch.inference_mode()
def test_the_fused_layer_decode_compiles_into_one_graph(monkeypatch):
    """Over a static cache, as the compiled decode step runs it: no graph break in the layer."""
    _restore_reference(monkeypatch)
    layer, config = _delta_layer(2, 4, 16, 24)
    hidden = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(8))
    want = _prompt_then_decode(layer, config, hidden, prompt=5)[0][:, -1:]
    assert delta_rule.install_fused_delta_rule()
    cache = StaticCache(config=config, max_cache_len=16)
    layer(hidden[:, :5], cache=cache)
    step = torch.compile(lambda token: layer(token, cache=cache), fullgraph=True)  # fullgraph: a break raises
    torch.testing.assert_close(step(hidden[:, 5:]), want, rtol=1e-4, atol=1e-5)
