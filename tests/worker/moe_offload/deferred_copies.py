"""A CPU stand-in for the side CUDA stream: copies land only when compute waits for an event covering them.

On the CPU tier `CopyStream` copies at once, so a read that forgot to wait for its copy still sees the
right bytes and no CPU test could notice. Here such a read sees the slot's old bytes, as it may on a GPU.
"""

from collections import deque

import torch

from worker.engine.moe_offload.transfer import CopyStream


class DeferredCopyStream(CopyStream):
    def __init__(self, device: torch.device):
        super().__init__(device)
        self._pending: deque[tuple[torch.Tensor, torch.Tensor]] = deque()
        self._issued = 0
        self._landed = 0

    def copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], after=None) -> None:
        self._pending.extend(pairs)
        self._issued += len(pairs)

    def record(self) -> int:
        return self._issued  # the event: "the first n copies have landed"

    def wait(self, event: int | None) -> None:
        while event is not None and self._landed < event:
            destination, source = self._pending.popleft()
            destination.copy_(source)
            self._landed += 1
