"""Qwen3-Next's Gated DeltaNet decode step on the CPU: the recurrence as one fused kernel (`delta_rule.cpp`),
the short convolution without a convolution call.

transformers' Qwen3-Next decodes a DeltaNet layer through two module-level functions whose fast versions
(flash-linear-attention, causal-conv1d) are GPU-only: `torch_recurrent_gated_delta_rule`, which builds four
temporaries the size of the layer's state per token, and `causal_conv1d_update`, a grouped `conv1d` call that
costs more to set up than the 4-tap sum it computes. `install_fused_delta_rule` puts in their place functions
that take a CPU decode token (one sequence, one token, float32) through the kernel and a plain weighted sum,
updating the cache's states in place, and pass everything else to the reference unchanged.

Around those two, the layer's decode forward is dozens of small torch calls (splits, reshapes, the decay and
beta, the gated norm), which cost a CPU decode token more than the recurrence itself. `install_fused_delta_rule`
therefore also wraps `Qwen3NextGatedDeltaNet.forward`: a covered decode token goes from the two input
projections through one op (`gated_delta_decode`: convolution, recurrence, gated norm) to the output
projection. The ops have fake implementations, so a compiled decode step traces through them as single calls.
"""

import logging
from collections.abc import Callable
from functools import cache, partial
from pathlib import Path
from typing import Any

import torch
from transformers.activations import ACT2FN
from transformers.models.qwen3_next import modeling_qwen3_next

from worker.engine.cpu_extension import build_for_isa, host_isas

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("delta_rule.cpp")
NAMESPACE = "moe_cpu_delta_rule"
REFERENCE = modeling_qwen3_next.torch_recurrent_gated_delta_rule
CONV_REFERENCE = modeling_qwen3_next.causal_conv1d_update
FORWARD_REFERENCE = modeling_qwen3_next.Qwen3NextGatedDeltaNet.forward


@cache
def load_delta_step() -> Callable[..., torch.Tensor] | None:
    """The op (built for AVX2 at first use, then loaded), or None where the host cannot build it."""
    if not host_isas() or not build_for_isa("AVX2", NAMESPACE, SOURCE, "DELTA_RULE_NAMESPACE"):
        return None
    torch.library.register_fake(f"{NAMESPACE}::gated_delta_step")(_fake_step)
    torch.library.register_fake(f"{NAMESPACE}::gated_delta_decode")(_fake_decode)
    return getattr(torch.ops, NAMESPACE).gated_delta_step


def load_layer_decode() -> Callable[..., torch.Tensor] | None:
    """The whole-layer decode op (`gated_delta_decode`), built with the step; None where it cannot build."""
    return None if load_delta_step() is None else getattr(torch.ops, NAMESPACE).gated_delta_decode


def _fake_step(q, k, v: torch.Tensor, g, beta, state) -> torch.Tensor:
    return v.new_empty(v.shape)


def _fake_decode(qkvz: torch.Tensor, ba, conv_state, conv_weight, A_log, dt_bias, state: torch.Tensor, *rest):
    return qkvz.new_empty(1, state.shape[1] * state.shape[3])


def fused_recurrent_gated_delta_rule(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    *,
    step: Callable[..., torch.Tensor] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`torch_recurrent_gated_delta_rule`'s signature and result; `step` (the kernel's op, bound at install:
    looking it up here would break a compiled step's graph at every layer) where it applies."""
    covered = (
        step is not None
        and query.device.type == "cpu"
        and query.shape[:2] == (1, 1)
        and use_qk_l2norm_in_kernel
        and initial_state is not None
        and initial_state.dtype == torch.float32
        and initial_state.is_contiguous()
    )
    if not covered:
        return REFERENCE(
            query, key, value, g, beta, initial_state, output_final_state, use_qk_l2norm_in_kernel, **kwargs
        )
    assert step is not None and initial_state is not None
    heads, dv = value.shape[-2:]
    state = initial_state.view(heads, initial_state.shape[-2], dv)
    out = step(_float(query[0, 0]), _float(key[0, 0]), _float(value[0, 0]), _float(g[0, 0]), _float(beta[0, 0]), state)
    return out.view(1, 1, heads, dv).to(query.dtype), initial_state if output_final_state else None


def conv1d_update(
    hidden_states: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """`causal_conv1d_update`'s signature and result (`hidden_states` [B, C, 1], `conv_state` [B, C, S] updated
    in place, `weight` [C, K]): for one float32 token on the CPU, the last K inputs times the taps, summed."""
    covered = (
        hidden_states.device.type == "cpu"
        and hidden_states.shape[-1] == 1
        and conv_state.dtype == weight.dtype == torch.float32
        and conv_state.shape[-1] >= weight.shape[-1] - 1
    )
    if not covered:
        return CONV_REFERENCE(hidden_states, conv_state, weight, bias, activation)
    window = torch.cat([conv_state, hidden_states.to(weight.dtype)], dim=-1)
    conv_state.copy_(window[..., -conv_state.shape[-1] :])
    out = (window[..., -weight.shape[-1] :] * weight).sum(-1, keepdim=True)
    if bias is not None:
        out = out + bias.unsqueeze(-1)
    if activation is not None:
        out = ACT2FN[activation](out)
    return out.to(hidden_states.dtype)


def decode_forward(
    self: modeling_qwen3_next.Qwen3NextGatedDeltaNet,
    hidden_states: torch.Tensor,
    cache: Any = None,
    attention_mask: torch.Tensor | None = None,
    *,
    layer_decode: Callable[..., torch.Tensor] | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """`Qwen3NextGatedDeltaNet.forward`'s signature and result; a CPU decode token of one float32 sequence with
    both states in the cache goes through `layer_decode` (bound at install), anything else through the
    reference forward."""
    conv_state = recurrent_state = None
    covered = (
        layer_decode is not None
        and cache is not None
        and hidden_states.device.type == "cpu"
        and hidden_states.dtype == torch.float32
        and hidden_states.shape[:2] == (1, 1)
        and self.conv1d.bias is None
        and self.activation == "silu"
        and not cache.is_recording_past(self.layer_idx)
    )
    if covered:
        conv_state = cache.get_conv_state(self.layer_idx)
        recurrent_state = cache.get_recurrent_state(self.layer_idx)
        covered = all(
            state is not None and state.dtype == torch.float32 and state.is_contiguous()
            for state in (conv_state, recurrent_state)
        )
    if not covered:
        return FORWARD_REFERENCE(self, hidden_states, cache, attention_mask, **kwargs)
    assert layer_decode is not None and conv_state is not None
    cache.increase_count(self.layer_idx, 0)  # the convolution's token, as the reference's in-place update counts it
    x = hidden_states.view(1, -1)
    core = layer_decode(
        _float(self.in_proj_qkvz(x)),
        _float(self.in_proj_ba(x)),
        conv_state,
        self.conv1d.weight.view(self.conv1d.weight.shape[0], -1),
        self.A_log,
        self.dt_bias,
        recurrent_state,
        self.norm.weight,
        self.norm.variance_epsilon,
        self.num_k_heads,
    )
    return self.out_proj(core).view(1, 1, -1)


def bound_decode_forward(layer_decode: Callable[..., torch.Tensor] | None) -> Callable[..., torch.Tensor]:
    """`decode_forward` with its op bound, as a closure: dynamo traces through a closure, but not through a
    `partialmethod`'s descriptor (the compiled step would break its graph at every DeltaNet layer)."""

    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        return decode_forward(self, hidden_states, cache, attention_mask, layer_decode=layer_decode, **kwargs)

    return forward


def _float(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.float32).contiguous()


def install_fused_delta_rule() -> bool:
    """Qwen3-Next's DeltaNet decode through the kernel from now on, in this process; False where it cannot
    build (the reference stays)."""
    step = load_delta_step()
    if step is None:
        return False
    modeling_qwen3_next.torch_recurrent_gated_delta_rule = partial(fused_recurrent_gated_delta_rule, step=step)
    modeling_qwen3_next.causal_conv1d_update = conv1d_update
    modeling_qwen3_next.Qwen3NextGatedDeltaNet.forward = bound_decode_forward(load_layer_decode())  # type: ignore[method-assign]
    log.info("Gated DeltaNet decode: the fused CPU kernel")
    return True
