"""Make a model route as a recorded one did: each MoE layer's router keeps its own logits (and so its
weights' cost) but its top-k ids are the recording's, token after token, so the cache sees a real model's
routing on synthetic weights.

The recorded ids and a counter of tokens routed so far sit on the device and are read and advanced inside
the step, so a compiled decode (one CUDA graph a step) replays them as well as an eager one: no host work,
no read-back. Tokens are taken in the recorded order, the prompt's and the decode's alike, wrapping around
at the end.
"""

import torch
from torch import nn
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextSparseMoeBlock

from benchmarks.route_file import RecordedRoutes


class RouteSchedule:
    def __init__(self, routes: RecordedRoutes, device: torch.device):
        self.ids = torch.as_tensor(routes.ids, dtype=torch.long, device=device)  # [tokens, layers, k]
        self.position = torch.zeros(1, dtype=torch.long, device=device)  # tokens routed so far
        for tensor in (self.ids, self.position):
            torch._dynamo.mark_static_address(tensor)  # read and advanced in place by the step's graph

    @property
    def tokens(self) -> int:
        return self.ids.shape[0]

    def expected(self, start: int, steps: int, layer: int) -> list[list[int]]:
        """The ids layer `layer` must route to for `steps` one-token steps from position `start`."""
        rows = [(start + step) % self.tokens for step in range(steps)]
        return self.ids[rows, layer].tolist()


class ReplayRouter(nn.Module):
    """Stands in for a top-k router module (`forward(hidden) -> (logits, weights, ids)`) with recorded ids;
    the weights are the router's own probabilities at those ids, normalized as the router would."""

    def __init__(self, inner: nn.Module, schedule: RouteSchedule, layer: int, advances: bool, normalize: bool):
        super().__init__()
        self.inner = inner
        self.schedule = schedule
        self.layer = layer
        self.advances = advances  # the last MoE layer moves the counter on
        self.normalize = normalize

    def forward(self, hidden_states: torch.Tensor):
        logits, _, _ = self.inner(hidden_states)
        tokens = logits.shape[0]
        rows = (self.schedule.position + torch.arange(tokens, device=logits.device)) % self.schedule.tokens
        ids = self.schedule.ids[rows, self.layer]
        weights = torch.softmax(logits, dim=-1, dtype=torch.float).gather(1, ids)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.advances:
            self.schedule.position.add_(tokens)
        return logits, weights.to(logits.dtype), ids


def install_replay(model: nn.Module, routes: RecordedRoutes) -> RouteSchedule:
    """Replace every Qwen3-Next MoE block's `gate` (the benchmark's model) with a `ReplayRouter` over `routes`;
    returns the shared schedule."""
    blocks = [module for module in model.modules() if isinstance(module, Qwen3NextSparseMoeBlock)]
    gates = [block.gate for block in blocks]
    top_k, experts = gates[0].top_k, gates[0].num_experts
    routes.check_fits(len(gates), experts, top_k)
    schedule = RouteSchedule(routes, next(model.parameters()).device)
    for layer, (block, gate) in enumerate(zip(blocks, gates, strict=True)):
        block.gate = ReplayRouter(
            gate, schedule, layer, advances=layer == len(gates) - 1, normalize=gate.norm_topk_prob
        )
    return schedule
