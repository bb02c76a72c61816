"""Turn memory budgets into a plan: how many expert slots per layer the device gets, or a clear refusal."""

from dataclasses import dataclass, field

_GIB = 1024**3


class MemoryBudgetError(RuntimeError):
    """The model cannot run within the memory the settings allow; the message says what it needs."""


# A card sold as N GB leaves processes about N - 0.5 GiB; the other half GiB is margin for what the estimates
# below miss. So GPU_MEMORY_GB=16 holds the whole process, as NVML counts it, to 15 GiB.
CARD_MARGIN_GB = 1.0


def process_limit_bytes(device_budget_gb: float, card_margin_gb: float = CARD_MARGIN_GB) -> int:
    """What the whole process may hold on the device, as NVML counts it, for a budget of `device_budget_gb`."""
    return int((device_budget_gb - card_margin_gb) * _GIB)


@dataclass(frozen=True)
class DeviceMemoryNeeds:
    """Bytes the process needs on the device besides the resident weights and the expert slots."""

    cuda_context: int = int(0.5 * _GIB)  # driver context and loaded kernels: NVML counts them, torch's allocator not
    workspaces: int = int(0.25 * _GIB)  # cuBLAS, Triton and inductor scratch
    graph_pools: int = int(0.25 * _GIB)  # the compiled decode's CUDA graph pools (one step's activations)
    kv_cache: int = 0  # the static cache's keys and values for MAX_MODEL_LEN tokens
    linear_attention_state: int = 0  # Gated DeltaNet's convolution and recurrent state
    prefill_activations: int = 0  # the peak of the longest prompt's forward
    gather_scratch: int = 0  # graph decode's rows gathered over the bus, kept for the refills
    # The prompt's experts are dequantized a group of up to `slots` at a time: this much per slot, so more slots
    # also mean a bigger prefill peak.
    prefill_bytes_per_slot: int = 0

    def items(self) -> dict[str, int]:
        return {
            name: getattr(self, name)
            for name in DeviceMemoryNeeds.__dataclass_fields__
            if name != "prefill_bytes_per_slot"
        }

    @property
    def total(self) -> int:
        return sum(self.items().values())


@dataclass(frozen=True)
class MemoryPlan:
    slots_per_layer: int
    # With `DeviceMemoryNeeds`: where the process limit goes (bytes, by item, slots and what is left last), and
    # what torch's allocator may hold (the process limit less what it never sees: the CUDA context).
    breakdown: dict[str, int] = field(default_factory=dict)
    allocator_limit_bytes: int = 0


def linear_attention_state_bytes(config) -> int:
    """Gated DeltaNet's state for one sequence: per linear-attention layer, the convolution's last inputs
    (in the model's dtype, counted as 2 bytes) and the recurrent state [value heads, key dim, value dim] in
    float32."""
    layers = sum(kind == "linear_attention" for kind in getattr(config, "layer_types", None) or [])
    if not layers:
        return 0
    key_dim = config.linear_num_key_heads * config.linear_key_head_dim
    value_dim = config.linear_num_value_heads * config.linear_value_head_dim
    conv = (2 * key_dim + value_dim) * config.linear_conv_kernel_dim * 2
    recurrent = config.linear_num_value_heads * config.linear_key_head_dim * config.linear_value_head_dim * 4
    return layers * (conv + recurrent)


def prefill_activation_bytes(config, tokens: int, dtype_bytes: int = 2) -> int:
    """The peak of a `tokens`-token prompt's forward besides its dequantized experts, estimated: a layer's
    activations (the residual stream, norms, projections and MLP intermediates: ~24 hidden-sized vectors a
    token) and the last token's logits in float32."""
    return tokens * config.hidden_size * 24 * dtype_bytes + config.vocab_size * 4


def dequantized_expert_bytes(layout_weights: int, dtype_bytes: int = 2) -> int:
    """One expert's weights dequantized for the prompt's batched matmuls."""
    return layout_weights * dtype_bytes


def plan_memory(
    *,
    device_budget_gb: float,
    reserve_gb: float,
    host_budget_gb: float,
    resident_bytes: int,
    num_layers: int,
    experts_per_layer: int,
    row_bytes: int,
    top_k: int,
    share_host_rows: bool = False,
    slots_override: int = 0,
    needs: DeviceMemoryNeeds | None = None,
    card_margin_gb: float = CARD_MARGIN_GB,
) -> MemoryPlan:
    """Slots per layer that fit `device_budget_gb` after the resident weights and `reserve_gb` (KV cache,
    activations, dequantized experts). `share_host_rows`: the device is the host (CPU tier), so every
    expert is usable in place and the device budget only has to hold the resident part. `slots_override`
    (EXPERT_SLOTS) sets the slots per layer outright, for measurements and tests.

    With `needs`, itemized instead of a flat reserve: the slots fill what is left of the process limit
    (`process_limit_bytes`: the whole process as NVML counts it) after the resident weights and each need."""
    host_expert_bytes = num_layers * experts_per_layer * row_bytes
    if host_budget_gb > 0 and host_expert_bytes > host_budget_gb * _GIB:
        raise MemoryBudgetError(
            f"the quantized experts need {host_expert_bytes / _GIB:.1f} GB of host RAM; HOST_MEMORY_GB is "
            f"{host_budget_gb:g}"
        )
    if slots_override:
        slots = min(slots_override, experts_per_layer)
        return MemoryPlan(slots)
    if share_host_rows:
        return MemoryPlan(experts_per_layer)
    if needs is not None:
        return _itemized_plan(
            process_limit_bytes(device_budget_gb, card_margin_gb),
            resident_bytes,
            needs,
            num_layers,
            experts_per_layer,
            row_bytes,
            top_k,
        )
    free = device_budget_gb * _GIB - reserve_gb * _GIB - resident_bytes
    slots = min(experts_per_layer, int(free // (num_layers * row_bytes))) if free > 0 else 0
    if slots < top_k:
        needed = resident_bytes + reserve_gb * _GIB + top_k * num_layers * row_bytes
        raise MemoryBudgetError(
            f"GPU_MEMORY_GB={device_budget_gb:g} is too small: the resident weights take "
            f"{resident_bytes / _GIB:.2f} GB, the reserve {reserve_gb:g} GB, and {top_k} expert slots per layer "
            f"{top_k * num_layers * row_bytes / _GIB:.2f} GB; at least {needed / _GIB:.2f} GB is needed"
        )
    return MemoryPlan(slots)


def _itemized_plan(
    limit: int,
    resident_bytes: int,
    needs: DeviceMemoryNeeds,
    num_layers: int,
    experts_per_layer: int,
    row_bytes: int,
    top_k: int,
) -> MemoryPlan:
    free = limit - resident_bytes - needs.total
    layer_row = num_layers * row_bytes
    per_slot = layer_row + needs.prefill_bytes_per_slot
    slots = min(experts_per_layer, free // per_slot) if free > 0 else 0
    breakdown = {
        "resident_weights": resident_bytes,
        **needs.items(),
        "prefill_dequantized_experts": slots * needs.prefill_bytes_per_slot,
        "expert_slots": slots * layer_row,
    }
    breakdown["left"] = limit - sum(breakdown.values())
    if slots < top_k:
        needed = resident_bytes + needs.total + top_k * per_slot
        items = ", ".join(f"{name} {value / _GIB:.2f}" for name, value in breakdown.items() if value)
        raise MemoryBudgetError(
            f"the process limit of {limit / _GIB:.2f} GiB is too small for {top_k} expert slots per layer: "
            f"at least {needed / _GIB:.2f} GiB is needed ({items}; GiB)"
        )
    return MemoryPlan(int(slots), breakdown, limit - needs.cuda_context)
