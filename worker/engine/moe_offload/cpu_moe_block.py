"""Qwen3-Next's sparse MoE block on the CPU tier, in as few calls as its arithmetic needs.

transformers' block runs the shared expert's gate and up projections and its sigmoid gate as three matrix
products over the same input, and a dozen small torch calls around them. Where the experts are computed in place
by the 4-bit kernel and the dense layers are on the int4/q8 kernels, `install_cpu_moe_blocks` replaces each
block by `CpuSparseMoeBlock`: the router (kept in float: rounding it to 8 bits moves near-tied experts, and
the tiny test model's perplexity with them), the shared expert's gate, up and gate logit as one q4 call, then
the routed experts (two kernel calls) and the shared expert's down projection. Its routing is transformers':
softmax, top-k, renormalized when the config says so.
"""

import logging

import torch
from torch import nn
from transformers.models.qwen3_next import modeling_qwen3_next

from worker.engine.cpu_quant.linear import QuantizedLinear
from worker.engine.cpu_quant.packing import stack_rows
from worker.engine.moe_offload.offloaded_experts import OffloadedExperts

log = logging.getLogger(__name__)


class CpuSparseMoeBlock(nn.Module):
    """`Qwen3NextSparseMoeBlock`'s forward and result, from its parts (which it takes over)."""

    def __init__(self, block: modeling_qwen3_next.Qwen3NextSparseMoeBlock):
        super().__init__()
        shared = block.shared_expert
        self.experts: OffloadedExperts = block.experts
        self.router_weight = block.gate.weight
        self.top_k = block.gate.top_k
        self.norm_topk_prob = block.gate.norm_topk_prob
        self.shared_size = shared.gate_proj.out_features
        self.shared_gate_up = QuantizedLinear(
            stack_rows(shared.gate_proj.packed(), shared.up_proj.packed(), block.shared_expert_gate.packed()), None
        )
        self.shared_down = shared.down_proj
        self.act_fn = shared.act_fn

    @staticmethod
    def covers(block: nn.Module) -> bool:
        """A Qwen3-Next block whose experts run in place and whose shared expert is on the q4 kernel."""
        if not isinstance(block, modeling_qwen3_next.Qwen3NextSparseMoeBlock):
            return False
        shared = block.shared_expert
        linears = (shared.gate_proj, shared.up_proj, shared.down_proj, block.shared_expert_gate)
        return (
            isinstance(block.experts, OffloadedExperts)
            and block.experts.in_place_kernel is not None
            and all(isinstance(linear, QuantizedLinear) and linear.format == "q4" for linear in linears)
            and all(linear.bias is None for linear in linears)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        probabilities = torch.softmax(nn.functional.linear(x, self.router_weight).float(), dim=-1)
        weights, experts = torch.topk(probabilities, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = self.experts(x, experts, weights.to(x.dtype))
        gate, up, shared_logit = self.shared_gate_up(x).split([self.shared_size, self.shared_size, 1], dim=-1)
        out = out + self.shared_down(self.act_fn(gate) * up) * torch.sigmoid(shared_logit)
        return out.reshape(shape)


def install_cpu_moe_blocks(model: nn.Module) -> int:
    """Every covered block of `model` replaced; returns how many."""
    replaced = 0
    for name, module in list(model.named_modules()):
        if CpuSparseMoeBlock.covers(module):
            model.set_submodule(name, CpuSparseMoeBlock(module))
            replaced += 1
    if replaced:
        log.info("Sparse MoE blocks on the CPU kernels: %d (the shared expert's inputs in one call)", replaced)
    return replaced
