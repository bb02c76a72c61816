"""A drop-in for transformers' fused experts module (`forward(hidden_states, top_k_index, top_k_weights)`)
whose weights live in host RAM and come to the device through an `ExpertCache`."""

import torch
from torch import nn

from worker.engine.moe_offload.expert_cache import ExpertCache
from worker.engine.moe_offload.packing import ExpertLayout, unpack_experts


class NextLayerPredictor:
    """Guesses the next MoE layer's experts by applying its router to this layer's hidden state.

    The residual stream changes little from one layer to the next, so the next router's top-k on the
    current input overlaps the experts it will really pick; copying them now hides the copy behind this
    layer's compute and the next layer's attention.
    """

    def __init__(self, router_weight: nn.Parameter, top_k: int, cache: ExpertCache):
        self.router_weight = router_weight
        self.top_k = top_k
        self.cache = cache

    def predict(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = nn.functional.linear(hidden_states, self.router_weight)
        return torch.topk(logits, self.top_k, dim=-1).indices


class OffloadedExperts(nn.Module):
    def __init__(self, layout: ExpertLayout, cache: ExpertCache, act_fn, compute_dtype: torch.dtype):
        super().__init__()
        self.layout = layout
        self.cache = cache
        self.act_fn = act_fn
        self.compute_dtype = compute_dtype
        self.num_experts = cache.host_rows.shape[0]
        self.next_layer: NextLayerPredictor | None = None

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        decoding = hidden_states.shape[0] == 1
        wanted = top_k_index.reshape(-1)
        guess_count = 0
        if decoding and self.next_layer is not None:
            guess = self.next_layer.predict(hidden_states).reshape(-1)
            guess_count = guess.numel()
            wanted = torch.cat([wanted, guess.to(wanted.dtype)])
        ids = wanted.tolist()  # the one device-to-host sync per layer: the host decides what to copy
        routed = sorted(set(ids[: len(ids) - guess_count]))
        predicted = ids[len(ids) - guess_count:]

        output = torch.zeros_like(hidden_states)
        for start in range(0, len(routed), self.cache.capacity):
            group = routed[start:start + self.cache.capacity]
            acquired = self.cache.acquire(group)
            # Hits compute while the misses are still on their way.
            self._accumulate(output, hidden_states, top_k_index, top_k_weights,
                             acquired.hit_experts, acquired.hit_slots)
            if predicted and start == 0:
                self.next_layer.cache.prefetch(predicted)
            self.cache.wait(acquired)
            self._accumulate(output, hidden_states, top_k_index, top_k_weights,
                             acquired.miss_experts, acquired.miss_slots)
            self.cache.mark_read()
        return output

    def _accumulate(self, output: torch.Tensor, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor, experts: list[int], slots: list[int]) -> None:
        if not experts:
            return
        device = hidden_states.device
        rows = self.cache.buffer.index_select(0, torch.tensor(slots, device=device))
        gate_up, down = unpack_experts(self.layout, rows, self.compute_dtype)
        expert_ids = torch.tensor(experts, device=device, dtype=top_k_index.dtype)
        # weights[t, j]: how much token t routes to experts[j] (0 where it does not)
        match = top_k_index.unsqueeze(-1) == expert_ids
        weights = (top_k_weights.unsqueeze(-1) * match).sum(dim=1)
        x = hidden_states.to(self.compute_dtype)
        if hidden_states.shape[0] == 1:
            # Decode: every expert in the group sees the one token; batch them into two bmm calls.
            gate, up = torch.matmul(gate_up, x[0]).chunk(2, dim=-1)
            expert_out = torch.bmm(down, (self.act_fn(gate) * up).unsqueeze(-1)).squeeze(-1)
            output[0] += (weights[0].to(expert_out.dtype) @ expert_out).to(output.dtype)
            return
        for j in range(len(experts)):
            token_idx = torch.nonzero(match[:, :, j].any(dim=1)).squeeze(-1)
            gate, up = nn.functional.linear(x[token_idx], gate_up[j]).chunk(2, dim=-1)
            expert_out = nn.functional.linear(self.act_fn(gate) * up, down[j])
            expert_out = expert_out * weights[token_idx, j, None].to(expert_out.dtype)
            output.index_add_(0, token_idx, expert_out.to(output.dtype))
