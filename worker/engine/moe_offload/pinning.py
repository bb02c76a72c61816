"""Page-locking host expert rows where they are, so host-to-device copies run asynchronously at full speed.

`Tensor.pin_memory()` copies into torch's caching pinned allocator, which rounds every block up to a power of
two: a Qwen3-Next layer's 0.84 GiB of rows would take 1 GiB, 7.5 GiB lost over 48 layers. `cudaHostRegister`
locks the rows in place instead. Registered memory must never go back to the heap while registered (a later
allocation on the same bytes could not be registered again), so registered rows are kept for the life of
the process, as the worker keeps its model.
"""

import ctypes
import logging
import os

import torch

log = logging.getLogger(__name__)

_registered: list[torch.Tensor] = []


def pin_in_place(rows: torch.Tensor) -> torch.Tensor:
    """`rows`, page-locked; a pinned copy if registering fails."""
    nbytes = rows.numel() * rows.element_size()
    status = int(torch.cuda.cudart().cudaHostRegister(rows.data_ptr(), nbytes, 0))
    if status == 0:
        _registered.append(rows)  # registered: never freed, whatever follows
        if rows.is_pinned():
            return rows
    else:
        _clear_last_cuda_error()
    log.warning("cudaHostRegister of %d bytes failed (CUDA error %d): using a pinned copy", nbytes, status)
    return rows.pin_memory()


def _clear_last_cuda_error() -> None:
    """A failed runtime call leaves its error pending; torch's next kernel launch check would raise it as its own.
    torch's cudart binding has no cudaGetLastError, so ask the runtime library torch loaded (same soname)."""
    version = (torch.version.cuda or "").split(".")[0]
    try:
        # RTLD_NOLOAD: only the runtime already in this process, never a second copy with its own error state
        ctypes.CDLL(f"libcudart.so.{version}", mode=os.RTLD_NOLOAD).cudaGetLastError()
    except OSError as error:
        raise RuntimeError(f"cudaHostRegister failed and its error could not be cleared: {error}") from error
