"""Host and GPU memory figures for heartbeats: psutil always, NVML when a GPU is there."""

import logging
from dataclasses import dataclass

import psutil

log = logging.getLogger(__name__)
_GIB = 1024**3


@dataclass
class GpuMemory:
    name: str
    used_gb: float
    total_gb: float


def host_memory() -> dict[str, float]:
    memory = psutil.virtual_memory()
    return {
        "process_rss_gb": psutil.Process().memory_info().rss / _GIB,
        "system_memory_used_gb": (memory.total - memory.available) / _GIB,
        "system_memory_total_gb": memory.total / _GIB,
        "system_memory_available_gb": memory.available / _GIB,
    }


class GpuProbe:
    """Reads device 0 through NVML; silently absent on machines without an NVIDIA driver."""

    def __init__(self) -> None:
        self._handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception as error:  # no driver, no device, or no pynvml: report no GPU
            log.debug("no GPU for heartbeats: %s", error)

    def read(self) -> GpuMemory | None:
        if self._handle is None:
            return None
        info = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        name = self._nvml.nvmlDeviceGetName(self._handle)
        return GpuMemory(name=str(name), used_gb=info.used / _GIB, total_gb=info.total / _GIB)
