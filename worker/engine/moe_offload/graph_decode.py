"""Decode steps that never leave the device (`EXPERT_DECODE=graph`): no graph break at the MoE layers.

In a compiled decode the host path of `OffloadedExperts` breaks the graph at every MoE layer: the host reads
the routing, decides what to copy, and the next graph waits for it; that wait is most of a step's host time.
Here a compiled decode step reads instead a table [layers, experts] of the slot each expert sits in (-1: none)
and computes each routed expert from its slot, or, without one, from its row in host RAM, page-locked and
mapped for the device (the Triton path gathers such rows over the bus into device memory first, with a copy
kernel; the torch path reads them where they are). The whole step is one graph, one CUDA graph replay.

The step also writes the experts it routed to (`routes`). Between steps, `between_steps` (reached through the
model's `DecodeHooks.between_decode_steps`, which the compiled decode runs after every forward) reads them
back once, counts each layer's hits and misses, lets the cache's policy start copying up to `refills` of the
missed experts into slots, and sends the table's changes. The copies run beside the next steps, never in
their way: an evicted expert's entry turns -1 before the next step (whose kernels then read it from host RAM),
its slot is overwritten only after the step that last read it, and a refilled expert's entry is sent only
once its copy has landed. The prompt, and eager decode, take the host path through the same caches.
"""

import torch

from worker.engine.moe_offload.pinning import mapped_device_view
from worker.engine.moe_offload.transfer import Landed


class GraphDecode:
    """The table, the routes and the refills shared by every offloaded MoE layer of one model."""

    def __init__(self, layers: list, top_k: int, device: torch.device, refills: int):
        experts = layers[0].num_experts
        cuda = device.type == "cuda"
        self.layers = layers
        self.refills = refills
        self.table_host = torch.full((len(layers), experts), -1, dtype=torch.int32, pin_memory=cuda)
        self._table_rows = self.table_host.numpy()  # element writes from Python at numpy's cost, not torch's
        self.table = self.table_host.to(device)
        self.routes = torch.full((len(layers), top_k), -1, dtype=torch.long, device=device)
        self._landing: dict[tuple[int, int], tuple[int, Landed]] = {}  # (layer, expert): (slot, copy's event)
        self.positions = torch.arange(top_k, device=device)  # decode: the routing weights in the experts' order
        for tensor in (self.table, self.routes, self.positions):
            torch._dynamo.mark_static_address(tensor)  # written in place, read by the graph where they are
        for index, layer in enumerate(layers):
            host = mapped_device_view(layer.cache.host_rows, device) if cuda else layer.cache.host_rows
            for tensor in (host, layer.cache.buffer):
                torch._dynamo.mark_static_address(tensor)  # CUDA graphs would copy any other input in per call
            layer.cache.track_table()
            layer.graph_decode = GraphDecodeLayer(self, index, host)
        self.between_steps()

    def between_steps(self) -> None:
        """After a forward: account for what the last decode step routed (rows still -1: the forward was the
        prompt's, on the host path), start the refills, and send the table's changes ahead of the next step."""
        routes = self.routes.tolist()  # the one read-back a step
        self.routes.fill_(-1)
        for index, (layer, experts) in enumerate(zip(self.layers, routes, strict=True)):
            refilled, landed = set(), None
            if experts[0] >= 0:
                hits = sum(int(self._table_rows[index, expert] >= 0) for expert in experts)
                refilled, landed = layer.cache.record_step(experts, hits, self.refills)
            for expert, slot in layer.cache.drain_table_changes():
                self._landing.pop((index, expert), None)
                if slot >= 0 and expert in refilled:
                    self._landing[(index, expert)] = (slot, landed)
                else:  # evicted, or brought in by the host path, whose compute already waited for it
                    self._table_rows[index, expert] = slot
        for (index, expert), (slot, landed) in list(self._landing.items()):
            if landed is None or landed.query():
                self._table_rows[index, expert] = slot
                del self._landing[(index, expert)]
        self.table.copy_(self.table_host, non_blocking=True)


class GraphDecodeLayer:
    """One layer's part of a device-only decode step: `OffloadedExperts.forward` while compiling a decode."""

    def __init__(self, shared: GraphDecode, index: int, host: torch.Tensor):
        self.shared = shared
        self.index = index
        self.host = host

    def forward(
        self, experts_module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        experts = top_k_index.reshape(-1)
        self.shared.routes[self.index].copy_(experts)
        x = hidden_states.to(experts_module.compute_dtype)
        output = experts_module.mix_table(
            experts_module.cache.buffer,
            self.host,
            experts,
            self.shared.table[self.index],
            self.shared.positions,
            top_k_weights.reshape(-1),
            x,
        )
        return output.to(hidden_states.dtype)
