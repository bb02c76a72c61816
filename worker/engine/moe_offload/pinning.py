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
_HOST_REGISTER_MAPPED = 2  # cudaHostRegisterMapped


def pin_in_place(rows: torch.Tensor) -> torch.Tensor:
    """`rows`, page-locked; a pinned copy if registering fails."""
    nbytes = rows.numel() * rows.element_size()
    # Mapped too, so kernels may also read the rows where they are (`mapped_device_view`).
    status = int(torch.cuda.cudart().cudaHostRegister(rows.data_ptr(), nbytes, _HOST_REGISTER_MAPPED))
    if status == 0:
        _registered.append(rows)  # registered: never freed, whatever follows
        if rows.is_pinned():
            return rows
    else:
        _clear_last_cuda_error()
    log.warning("cudaHostRegister of %d bytes failed (CUDA error %d): using a pinned copy", nbytes, status)
    return rows.pin_memory()


def mapped_device_view(rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`rows` (contiguous uint8, in host RAM) as a tensor on the CUDA `device` whose kernels read them where they
    are, over the bus (zero-copy mapped memory). Pins them in place first unless they are page-locked already
    (by `pin_in_place`, or torch's pinned allocator, whose memory is mapped wherever addressing is unified)."""
    if not rows.is_pinned():
        rows = pin_in_place(rows)
    pointer = ctypes.c_void_p()
    status = _cudart().cudaHostGetDevicePointer(ctypes.byref(pointer), ctypes.c_void_p(rows.data_ptr()), 0)
    if status != 0:
        _clear_last_cuda_error()
        raise RuntimeError(f"cudaHostGetDevicePointer failed (CUDA error {status})")
    with torch.cuda.device(device):  # torch finds the device from the pointer's attributes
        assert pointer.value is not None  # a null pointer comes with a failed status, handled above
        return torch.as_tensor(_CudaArray(pointer.value, rows), device=device)


class _CudaArray:
    """The `__cuda_array_interface__` torch reads to wrap device-accessible memory without copying it."""

    def __init__(self, pointer: int, like: torch.Tensor):
        if like.dtype != torch.uint8 or not like.is_contiguous():
            raise ValueError("expects contiguous uint8 rows")
        self.__cuda_array_interface__ = {
            "shape": tuple(like.shape),
            "typestr": "|u1",
            "data": (pointer, False),
            "version": 3,
            "strides": None,
        }
        self.rows = like  # torch keeps this object, and so the rows, alive with the tensor


def _cudart() -> ctypes.CDLL:
    """The CUDA runtime library torch loaded, for the calls torch's cudart binding lacks. RTLD_NOLOAD: only the
    runtime already in this process, never a second copy with its own state. By its soname first, else by the
    path this process mapped it from (a build may ship it under another name)."""
    version = (torch.version.cuda or "").split(".")[0]
    try:
        return ctypes.CDLL(f"libcudart.so.{version}", mode=os.RTLD_NOLOAD)
    except OSError:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libcudart" in line}
        if not paths:
            raise
        return ctypes.CDLL(sorted(paths)[0], mode=os.RTLD_NOLOAD)


def _clear_last_cuda_error() -> None:
    """A failed runtime call leaves its error pending; torch's next kernel launch check would raise it as its own.
    torch's cudart binding has no cudaGetLastError."""
    try:
        _cudart().cudaGetLastError()
    except OSError as error:
        raise RuntimeError(f"a CUDA runtime error could not be cleared: {error}") from error
