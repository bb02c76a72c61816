"""What a run's routing looked like, beside its hit rate: how many experts each layer used, how alike
consecutive steps were, and how much of the routing the most used `slots` experts would have covered.

A hit rate says little without these: random routers spread over every expert, a real model's router keeps
coming back to a few, and the same cache does very differently under each.
"""

from collections import Counter
from dataclasses import asdict, dataclass

import torch


class RoutingLog:
    """The routed expert ids of each decode step, per MoE layer, as the run saw them. Device tensors are
    kept as they come (no read-back while decoding) and read once at the end."""

    def __init__(self, layers: int):
        self._steps: list[list[list[int] | torch.Tensor]] = [[] for _ in range(layers)]

    def add(self, layer: int, experts: list[int] | torch.Tensor) -> None:
        """One decode step's experts for `layer` (a device tensor is cloned, not read)."""
        self._steps[layer].append(
            experts.detach().reshape(-1).clone() if isinstance(experts, torch.Tensor) else experts
        )

    def add_step(self, routes: list[list[int]]) -> None:
        """One decode step's experts for every layer, in layer order."""
        for layer, experts in enumerate(routes):
            self.add(layer, experts)

    def steps(self, layer: int) -> int:
        return len(self._steps[layer])

    def per_layer(self) -> list[list[list[int]]]:
        """[layer][step] -> the step's expert ids."""
        return [[e.tolist() if isinstance(e, torch.Tensor) else list(e) for e in steps] for steps in self._steps]

    def clear(self) -> None:
        for steps in self._steps:
            steps.clear()


@dataclass(frozen=True)
class RoutingStats:
    steps: int
    distinct_experts_per_layer: float  # mean over layers of the experts used at least once in the run
    distinct_experts_min: int
    distinct_experts_max: int
    consecutive_overlap: float  # share of a step's experts that the step before also used
    top_slots_coverage: float  # share of routed uses that went to each layer's `slots` most used experts
    slots: int

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (
            f"{self.distinct_experts_per_layer:.1f} distinct experts per layer ({self.distinct_experts_min}-"
            f"{self.distinct_experts_max}), consecutive steps share {self.consecutive_overlap:.1%}, the top "
            f"{self.slots} cover {self.top_slots_coverage:.1%} of uses"
        )


def routing_stats(per_layer: list[list[list[int]]], slots: int) -> RoutingStats | None:
    """`per_layer[layer][step]`: the experts a step routed to in that layer. None without a step."""
    layers = [steps for steps in per_layer if steps]
    if not layers:
        return None
    distinct = [len({e for step in steps for e in step}) for steps in layers]
    shared, used = 0, 0
    covered, uses = 0, 0
    for steps in layers:
        for before, now in zip(steps, steps[1:], strict=False):
            shared += len(set(now) & set(before))
            used += len(set(now))
        counts = Counter(e for step in steps for e in step)
        covered += sum(count for _, count in counts.most_common(slots))
        uses += sum(counts.values())
    return RoutingStats(
        steps=max(len(steps) for steps in layers),
        distinct_experts_per_layer=sum(distinct) / len(distinct),
        distinct_experts_min=min(distinct),
        distinct_experts_max=max(distinct),
        consecutive_overlap=shared / used if used else 0.0,
        top_slots_coverage=covered / uses if uses else 0.0,
        slots=slots,
    )
