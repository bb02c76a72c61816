"""Turn memory budgets into a plan: how many expert slots per layer the device gets, or a clear refusal."""

from dataclasses import dataclass

_GIB = 1024**3


class MemoryBudgetError(RuntimeError):
    """The model cannot run within the memory the settings allow; the message says what it needs."""


@dataclass(frozen=True)
class MemoryPlan:
    slots_per_layer: int


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
) -> MemoryPlan:
    """Slots per layer that fit `device_budget_gb` after the resident weights and `reserve_gb` (KV cache,
    activations, dequantized experts). `share_host_rows`: the device is the host (CPU tier), so every
    expert is usable in place and the device budget only has to hold the resident part. `slots_override`
    (EXPERT_SLOTS) sets the slots per layer outright, for measurements and tests."""
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
