"""Decode steps that never leave the device (`EXPERT_DECODE=graph`): no graph break at the MoE layers.

In a compiled decode the host path of `OffloadedExperts` breaks the graph at every MoE layer: the host reads
the routing, decides what to copy, and the next graph waits for it; that wait is most of a step's host time.
Here a compiled decode step reads instead a table [layers, experts] of the slot each expert sits in (-1: none)
and computes each routed expert from its slot, or, without one, from its row in host RAM, page-locked and
mapped for the device, brought over the bus into the layer's gather scratch in device memory (the Triton path
gathers only the rows without a slot, with a copy kernel; the torch path reads every routed expert's host row
into it and keeps, per expert, the slot's or the scratch's). The whole step is one graph, one CUDA graph replay.

The step also writes the experts it routed to (`routes`). Between steps, `between_steps` (reached through the
model's `DecodeHooks.between_decode_steps`, which the compiled decode runs after every forward) reads them
back once, counts each layer's hits and misses, lets the cache's policy pick up to `refills` of the missed
experts for slots, and sends the table's changes. A refill is a device-to-device copy from the gather scratch,
where the step already brought the row: a miss crosses the bus once, not once for the step and again for its
slot. The copy is queued on the compute stream behind the step (which last read the slot it overwrites) and
ahead of the next step (whose gather overwrites the scratch), so an evicted expert's entry turns -1 and a
refilled one's gets its slot before the next step. The prompt, and eager decode, take the host path through
the same caches.
"""

from collections.abc import Callable

import torch

from worker.engine.moe_offload.pinning import mapped_device_view


class GraphDecode:
    """The table, the routes and the refills shared by every offloaded MoE layer of one model."""

    def __init__(self, layers: list, top_k: int, device: torch.device, refills: int):
        experts = layers[0].num_experts
        cuda = device.type == "cuda"
        self.layers = layers
        self.refills = refills
        # Called with each decode step's routes [layer][k] as read back (the benchmark's routing statistics).
        self.on_routes: Callable[[list[list[int]]], None] | None = None
        self.table_host = torch.full((len(layers), experts), -1, dtype=torch.int32, pin_memory=cuda)
        self._table_rows = self.table_host.numpy()  # element writes from Python at numpy's cost, not torch's
        self.table = self.table_host.to(device)
        self.routes = torch.full((len(layers), top_k), -1, dtype=torch.long, device=device)
        self.positions = torch.arange(top_k, device=device)  # decode: the routing weights in the experts' order
        for tensor in (self.table, self.routes, self.positions):
            torch._dynamo.mark_static_address(tensor)  # written in place, read by the graph where they are
        for index, layer in enumerate(layers):
            host = mapped_device_view(layer.cache.host_rows, device) if cuda else layer.cache.host_rows
            # Row i: the step's i-th routed expert's row where it came over the bus; kept until the refills
            # have copied from it, so it lives beside the slots rather than in the step's own memory.
            scratch = torch.empty((top_k, layer.cache.row_bytes), dtype=torch.uint8, device=device)
            for tensor in (host, layer.cache.buffer, scratch):
                torch._dynamo.mark_static_address(tensor)  # CUDA graphs would copy any other input in per call
            layer.cache.track_table()
            layer.graph_decode = GraphDecodeLayer(
                self, index, host, scratch, gathers_misses_only=layer.uses_fused_kernels
            )
        self.between_steps()

    @staticmethod
    def scratch_bytes(layers: int, top_k: int, row_bytes: int) -> int:
        """Device memory the gather scratches take: one row per routed expert per MoE layer."""
        return layers * top_k * row_bytes

    def between_steps(self) -> None:
        """After a forward: account for what the last decode step routed (rows still -1: the forward was the
        prompt's, on the host path), start the refills, and send the table's changes ahead of the next step."""
        routes = self.routes.tolist()  # the one read-back a step
        self.routes.fill_(-1)
        if routes[0][0] >= 0 and self.on_routes is not None:
            self.on_routes(routes)
        gathered_bytes = 0
        for index, (layer, experts) in enumerate(zip(self.layers, routes, strict=True)):
            if experts[0] >= 0:
                hits = sum(int(self._table_rows[index, expert] >= 0) for expert in experts)
                step = layer.graph_decode
                rows = len(experts) - hits if step.gathers_misses_only else len(experts)
                layer.cache.record_gathered(rows)
                gathered_bytes += rows * layer.cache.row_bytes
                layer.cache.record_step(experts, hits, self.refills, gathered=step.scratch)
            # Evicted; refilled from the scratch, ahead of the next step on the same stream; or brought in by
            # the host path, whose compute already waited for it: each entry is right for the next step.
            for expert, slot in layer.cache.drain_table_changes():
                self._table_rows[index, expert] = slot
        self.table.copy_(self.table_host, non_blocking=True)
        if gathered_bytes:  # the step's reads over the bus, paid for before the next step starts
            self.layers[0].cache.copier.pace(gathered_bytes)


class GraphDecodeLayer:
    """One layer's part of a device-only decode step: `OffloadedExperts.forward` while compiling a decode."""

    def __init__(
        self, shared: GraphDecode, index: int, host: torch.Tensor, scratch: torch.Tensor, gathers_misses_only: bool
    ):
        self.shared = shared
        self.index = index
        self.host = host
        self.scratch = scratch
        self.gathers_misses_only = gathers_misses_only  # the Triton path; the torch path reads every routed row

    def forward(
        self, experts_module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        experts = top_k_index.reshape(-1)
        self.shared.routes[self.index].copy_(experts)
        x = hidden_states.to(experts_module.compute_dtype)
        output = experts_module.mix_table(
            experts_module.cache.buffer,
            self.host,
            self.scratch,
            experts,
            self.shared.table[self.index],
            self.shared.positions,
            top_k_weights.reshape(-1),
            x,
        )
        return output.to(hidden_states.dtype)
