"""A drop-in for transformers' fused experts module (`forward(hidden_states, top_k_index, top_k_weights)`)
whose weights live in host RAM and come to the device through an `ExpertCache`, or, for a share of the
misses, are applied on the CPU where they are (see `cpu_experts`)."""

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from worker.engine.compiled_decode import decode_graph
from worker.engine.moe_offload.cpu_expert_kernel import CpuExpertKernel
from worker.engine.moe_offload.cpu_experts import MissSplit, cpu_experts_forward
from worker.engine.moe_offload.expert_cache import Acquired, ExpertCache
from worker.engine.moe_offload.packing import ExpertLayout, unpack_experts

if TYPE_CHECKING:
    from worker.engine.moe_offload.graph_decode import GraphDecodeLayer


class NextLayerPredictor:
    """Guesses the next MoE layer's experts by applying its router to this layer's hidden state.

    The residual stream changes little from one layer to the next, so the next router's top-k on the
    current input overlaps the experts it will really pick; copying them now hides the copy behind this
    layer's compute and the next layer's attention.
    """

    def __init__(self, router: Any, top_k: int, cache: ExpertCache):
        self.router = router  # the module, not its weight: loading assigns the weight after linking
        self.top_k = top_k
        self.cache = cache
        self._eager: Callable[..., torch.Tensor] = partial(routed_and_guessed, top_k=top_k)
        self._with_guesses: Callable[..., torch.Tensor] = self._eager

    def with_guesses(self, top_k_index: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """This layer's routed experts, then the next layer's guessed ones, flat: one tensor to read back."""
        return self._with_guesses(top_k_index, hidden_states, self.router.weight)

    def compile_decode(self, compiled: bool) -> None:
        """The guess (router matmul, top-k, concatenation) as one compiled graph; False goes back to eager."""
        self._with_guesses = decode_graph(self._eager, compiled)


def routed_and_guessed(
    top_k_index: torch.Tensor, hidden_states: torch.Tensor, next_router_weight: torch.Tensor, top_k: int
) -> torch.Tensor:
    guess = torch.topk(nn.functional.linear(hidden_states, next_router_weight), top_k, dim=-1).indices
    return torch.cat([top_k_index.reshape(-1), guess.reshape(-1).to(top_k_index.dtype)])


def to_device(values: torch.Tensor | list[int], device: torch.device) -> torch.Tensor:
    """A small host index tensor on `device` without blocking the host: a plain `torch.tensor(..., device=cuda)`
    copies from pageable memory, which waits for all queued GPU work and so breaks the copy/compute overlap."""
    values = torch.as_tensor(values, dtype=torch.long)
    if device.type != "cuda":
        return values
    return values.pin_memory().to(device, non_blocking=True)


class Routing:
    """Which tokens use which expert, with what weight, from the host copy of `top_k_index` (no more syncs).

    Positions index the flattened [tokens * top_k] routing: token = position // top_k."""

    def __init__(self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, host_ids: list[int]):
        self.top_k = top_k_index.shape[-1]
        self.flat_weights = top_k_weights.reshape(-1)
        self.positions: dict[int, list[int]] = {}
        for position, expert in enumerate(host_ids):
            self.positions.setdefault(expert, []).append(position)

    def padded(self, experts: list[int]) -> list[int]:
        """For prefill: each expert's positions padded to the busiest one's count, then 1/0 marks of which are
        real, flattened ([2, experts, most] as a list): the whole group computes in two bmm calls."""
        most = max(len(self.positions[e]) for e in experts)
        positions, real = [], []
        for expert in experts:
            own = self.positions[expert]
            positions += own + [own[0]] * (most - len(own))  # padding repeats a real position, weighted 0
            real += [1] * len(own) + [0] * (most - len(own))
        return positions + real


def mix_decode(
    layout: ExpertLayout,
    act_fn,
    dtype: torch.dtype,
    buffer: torch.Tensor,
    indices: torch.Tensor,
    flat_weights: torch.Tensor,
    x: torch.Tensor,
) -> torch.Tensor:
    """One token `x` [1, H] through the experts whose rows sit in `buffer` at the slots of `indices` (slots, then
    routing positions into `flat_weights`: one tensor, one copy in), each weighted by its routing weight,
    summed: [1, H]. Every expert sees the same token, so the group is two batched matmuls."""
    slot_index, position_index = indices.view(2, -1)
    return _mix_rows(
        layout, act_fn, dtype, buffer.index_select(0, slot_index), flat_weights.index_select(0, position_index), x
    )


def mix_decode_table(
    layout: ExpertLayout,
    act_fn,
    dtype: torch.dtype,
    buffer: torch.Tensor,
    host: torch.Tensor,
    scratch: torch.Tensor,
    experts: torch.Tensor,
    table: torch.Tensor,
    positions: torch.Tensor,
    flat_weights: torch.Tensor,
    x: torch.Tensor,
) -> torch.Tensor:
    """`mix_decode` for a decode step that never leaves the device: `experts` are expert ids, and each one's
    row is read from its slot in `buffer` where `table` [experts] gives one (-1: none), else from `host`
    (where it is: page-locked host memory mapped for the device, or the CPU tier's rows), through `scratch`
    [experts, row_bytes] in device memory, which keeps the rows for the refills after the step. This path
    brings every expert's host row into `scratch` and keeps, per expert, the slot's or the scratch's; the
    Triton kernels gather only the rows without a slot."""
    slots = table.index_select(0, experts)
    resident = (slots >= 0).unsqueeze(-1)
    torch.index_select(host, 0, experts, out=scratch)
    rows = torch.where(resident, buffer.index_select(0, slots.clamp(min=0)), scratch)
    return _mix_rows(layout, act_fn, dtype, rows, flat_weights.index_select(0, positions), x)


def _mix_rows(
    layout: ExpertLayout, act_fn, dtype: torch.dtype, rows: torch.Tensor, weights: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    gate_up, down = unpack_experts(layout, rows, dtype)
    gate, up = torch.matmul(gate_up, x[0]).chunk(2, dim=-1)
    expert_out = torch.bmm(down, (act_fn(gate) * up).unsqueeze(-1)).squeeze(-1)
    return (weights.to(expert_out.dtype) @ expert_out).unsqueeze(0)


@dataclass(frozen=True)
class DecodeKernels:
    """What computes one token's experts: from slots, with `mix_decode`'s signature past its first three
    arguments, and by table (`graph_decode`), with `mix_decode_table`'s."""

    from_slots: Callable[..., torch.Tensor]
    by_table: Callable[..., torch.Tensor]


class OffloadedExperts(nn.Module):
    """`kernels`: default the torch path (`mix_decode`, `mix_decode_table`); on a GPU the fused kernels of
    `triton_experts`. `graph_decode`, once `GraphDecode` sets it, takes a compiled decode's experts."""

    def __init__(
        self,
        layout: ExpertLayout,
        cache: ExpertCache,
        act_fn,
        compute_dtype: torch.dtype,
        kernels: DecodeKernels | None = None,
    ):
        super().__init__()
        self.layout = layout
        self.cache = cache
        self.act_fn = act_fn
        self.compute_dtype = compute_dtype
        self.num_experts = cache.host_rows.shape[0]
        self.next_layer: NextLayerPredictor | None = None
        self.miss_split = MissSplit("copy", 0.0)
        self.graph_decode: GraphDecodeLayer | None = None
        self.uses_fused_kernels = kernels is not None
        kernels = kernels or DecodeKernels(
            partial(mix_decode, layout, act_fn, compute_dtype), partial(mix_decode_table, layout, act_fn, compute_dtype)
        )
        self._mix_eager = kernels.from_slots
        self._mix_decode = self._mix_eager
        self.mix_table = kernels.by_table
        # The CPU tier holding every expert in place: each token's experts go straight through the 4-bit
        # kernel over their rows (no slots to manage, nothing dequantized).
        self.in_place_kernel = CpuExpertKernel.for_layout(layout) if cache.rows_in_place else None

    @property
    def decode_compiled(self) -> bool:
        return self._mix_decode is not self._mix_eager

    def compile_decode(self, compiled: bool) -> None:
        """Decode's expert math (gather, dequantize or the Triton kernels, the weighted sum) as one compiled
        graph for this layer; False goes back to eager."""
        if self.next_layer is not None:
            self.next_layer.compile_decode(compiled)
        self._mix_decode = decode_graph(self._mix_eager, compiled)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if self.in_place_kernel is not None:
            return self._forward_in_place(self.in_place_kernel, hidden_states, top_k_index, top_k_weights)
        if self.graph_decode is not None and hidden_states.shape[0] == 1 and torch.compiler.is_compiling():
            return self.graph_decode.forward(self, hidden_states, top_k_index, top_k_weights)
        return self._forward_on_host(hidden_states, top_k_index, top_k_weights)

    def _forward_in_place(
        self,
        kernel: CpuExpertKernel,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        """Every routed expert from its row where it is: nothing to decide on the host, so a compiled decode
        traces through (its steps go uncounted: the counters are the host's, updated where it runs eagerly)."""
        if not torch.compiler.is_compiling():
            self.cache.record_read_in_place(top_k_index.numel())
        x = hidden_states.to(self.compute_dtype)
        routed = kernel.forward_routed(self.cache.host_rows, top_k_index, top_k_weights, x, self.act_fn)
        return routed.to(hidden_states.dtype)

    # Host decisions (which experts to copy) need the routing on the host: a compiled decode without
    # `graph_decode` breaks its graph here and runs this eagerly between the graph before and the graph after.
    @torch.compiler.disable
    def _forward_on_host(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        decoding = hidden_states.shape[0] == 1
        wanted = top_k_index.reshape(-1)
        guess_count = 0
        if decoding and self.next_layer is not None:
            wanted = self.next_layer.with_guesses(top_k_index, hidden_states)
            guess_count = wanted.numel() - top_k_index.numel()
        ids = wanted.tolist()  # the one device-to-host sync per layer: the host decides what to copy
        routed_ids = ids[: len(ids) - guess_count]
        predicted = ids[len(ids) - guess_count :]
        routing = Routing(top_k_index, top_k_weights, routed_ids)
        routed = sorted(set(routed_ids))

        on_cpu = self._pick_cpu_experts(routed) if decoding else []
        if on_cpu:  # read while the device is idle, before it is given this layer's work
            host_x = hidden_states.to("cpu", self.compute_dtype)
            host_weights = top_k_weights.reshape(-1).tolist()
            routed = [e for e in routed if e not in on_cpu]

        parts = []
        for start in range(0, len(routed), self.cache.capacity):
            group = routed[start : start + self.cache.capacity]
            acquired = self.cache.acquire(group, start_copies=False)
            experts = acquired.hit_experts + acquired.miss_experts
            try:
                indices = self._device_indices(acquired, experts, routing, decoding)  # ahead of the rows
            finally:  # the slots are already promised to these experts: their bytes must come
                self.cache.start_copies(acquired)
            if predicted and self.next_layer is not None:  # queued behind this layer's misses, all it waits for
                self.next_layer.cache.prefetch(predicted)
                predicted = []
            # One pass over hits and misses together: this path is bound by host time, not the bus, and a
            # second pass to overlap the hits with the few misses' copies cost more host time than it hid.
            self.cache.wait_hits(acquired)
            self.cache.wait_misses(acquired)
            if experts:
                parts.append(self._mix(hidden_states, routing, len(experts), indices))
            self.cache.mark_read()
        if predicted and self.next_layer is not None:
            self.next_layer.cache.prefetch(predicted)
        if on_cpu:  # the device works through what was queued above while the CPU does its share
            from_cpu = self._compute_on_cpu(host_x, host_weights, routing, on_cpu).to(hidden_states.dtype)
            if hidden_states.is_cuda:
                from_cpu = from_cpu.pin_memory()
            parts.append(from_cpu.to(hidden_states.device, non_blocking=True))
        # Decode has one part (top-k fits the slots): no zeros to fill and add to, two launches fewer a layer.
        output = parts[0] if parts else torch.zeros_like(hidden_states)
        for part in parts[1:]:
            output = output + part
        return output

    def _pick_cpu_experts(self, routed: list[int]) -> list[int]:
        misses = [e for e in routed if not self.cache.holds(e)]
        count = self.miss_split.cpu_count(len(misses))
        chosen = misses[len(misses) - count :] if count else []
        self.cache.record_computed_on_host(len(chosen))
        return chosen

    def _compute_on_cpu(
        self, x: torch.Tensor, weights: list[float], routing: Routing, experts: list[int]
    ) -> torch.Tensor:
        expert_weights = [sum(weights[position] for position in routing.positions[expert]) for expert in experts]
        return cpu_experts_forward(self.layout, self.cache.host_rows, experts, expert_weights, x, self.act_fn)

    @staticmethod
    def _device_indices(acquired: Acquired, experts: list[int], routing: Routing, decoding: bool) -> torch.Tensor:
        """The slots of `experts` (the hits then the misses), then their routing positions (decode: one each;
        prefill: `Routing.padded`), in one copy."""
        slots = acquired.hit_slots + acquired.miss_slots
        if decoding:
            positions = [routing.positions[e][0] for e in experts]
        else:
            positions = routing.padded(experts) if experts else []
        return to_device(slots + positions, routing.flat_weights.device)

    def _mix(self, hidden_states: torch.Tensor, routing: Routing, count: int, indices: torch.Tensor) -> torch.Tensor:
        """The weighted sum of `count` experts' outputs (their slots and positions in `indices`) per token."""
        x = hidden_states.to(self.compute_dtype)
        if hidden_states.shape[0] == 1:
            return self._mix_decode(self.cache.buffer, indices, routing.flat_weights, x).to(hidden_states.dtype)
        slot_index, position_index = indices[:count], indices[count:]
        gate_up, down = unpack_experts(self.layout, self.cache.buffer.index_select(0, slot_index), self.compute_dtype)
        # Prefill: every expert's tokens, padded to the busiest expert's count, through two bmm calls.
        positions, real = position_index.view(2, count, -1)
        token_idx = positions // routing.top_k
        gate, up = torch.bmm(x[token_idx], gate_up.transpose(1, 2)).chunk(2, dim=-1)
        expert_out = torch.bmm(self.act_fn(gate) * up, down.transpose(1, 2))
        weights = routing.flat_weights[positions] * real
        expert_out = expert_out * weights.unsqueeze(-1).to(expert_out.dtype)
        output = torch.zeros_like(hidden_states)
        return output.index_add_(0, token_idx.reshape(-1), expert_out.reshape(-1, output.shape[-1]).to(output.dtype))
