"""Host-to-device copies on a side CUDA stream, so they overlap compute; plain copies on the CPU tier."""

from typing import Any

import torch

from worker.engine.moe_offload.pacing import Pacer

#: A CUDA event (copies landed, compute done), or None where everything is already done (the CPU tier).
Landed = Any


class CopyStream:
    """Orders expert copies against the compute that reads the slots they overwrite."""

    def __init__(self, device: torch.device):
        self.device = device
        self.is_cuda = device.type == "cuda"
        self._stream: Any = torch.cuda.Stream(device=device) if self.is_cuda else None
        # The stream compute runs on, looked up once: `current_stream()` costs ~20 us of host time per call,
        # and a decode step is bound by host time. The worker computes on the default stream throughout.
        self._compute: Any = torch.cuda.current_stream(device) if self.is_cuda else None
        self.pacer: Pacer | None = None  # set only to emulate a slower bus (the benchmark's --h2d-gbps)

    def adopt(self, buffer: torch.Tensor) -> None:
        """`buffer` (allocated on the compute stream) is written on the side stream: keep the caching allocator
        from handing its memory out again while copies into it may still be running."""
        if self.is_cuda and buffer.is_cuda:
            buffer.record_stream(self._stream)

    def copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], after: "torch.cuda.Event | None") -> None:
        """Copy each (destination slot, source row in pinned host memory) once `after` (the slots' last read)
        is done."""
        self.pace(sum(source.numel() * source.element_size() for _, source in pairs))
        if not self.is_cuda:
            for destination, source in pairs:
                destination.copy_(source)
            return
        with torch.cuda.stream(self._stream):
            if after is not None:
                self._stream.wait_event(after)
            for destination, source in pairs:
                destination.copy_(source, non_blocking=True)

    def pace(self, nbytes: int) -> None:
        """Bytes about to cross the bus, or that just did: where a pacer is set, the host waits until its rate
        allows them (on a GPU the copies issued are then at most that rate ahead of the clock)."""
        if self.pacer is not None:
            self.pacer.pace(nbytes)

    def copy_on_device(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy each (destination slot, source row in device memory) on the compute stream: behind the compute
        that wrote the sources and last read the slots, and ahead of whatever is queued next (which may
        overwrite the sources), so nothing waits for an event and nothing is read early."""
        if not self.is_cuda:
            for destination, source in pairs:
                destination.copy_(source)
            return
        with torch.cuda.stream(self._compute):
            for destination, source in pairs:
                destination.copy_(source, non_blocking=True)

    def record(self) -> "torch.cuda.Event | None":
        """An event that fires when every copy issued so far has landed (None on the CPU: already done)."""
        return self._event_on(self._stream)

    def wait(self, event: "torch.cuda.Event | None") -> None:
        """Make the compute stream wait for `event` (copies landed) without blocking the host."""
        if event is not None:
            self._compute.wait_event(event)

    def compute_done(self) -> "torch.cuda.Event | None":
        """An event on the compute stream: slots read by compute issued so far may be overwritten after it."""
        return self._event_on(self._compute)

    def _event_on(self, stream: "torch.cuda.Stream | None") -> "torch.cuda.Event | None":
        if not self.is_cuda:
            return None
        event = torch.cuda.Event()
        event.record(stream)
        return event
