"""The process's device memory as NVML counts it (what the card really gives up: the CUDA context, every
allocator's pools, CUDA graph pools), beside torch's allocator peak, and a loud failure past the budget.

torch's `max_memory_allocated` misses the context and anything not allocated through it, so a run can look
within 16 GB by torch's count and still not fit a 16 GB card.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass

_GIB = 1024**3


class OverBudgetError(RuntimeError):
    """The process held more device memory, as NVML counts it, than the budget allows."""


def nvml_reader(device_index: int, pid: int | None = None) -> Callable[[], int]:
    """A function that returns this process's device memory in bytes: its entry among the device's compute
    processes, or, where NVML lists none (some containers hide the process ids), the device's used memory
    less what was used when this reader was made."""
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
    pid = os.getpid() if pid is None else pid
    baseline = pynvml.nvmlDeviceGetMemoryInfo(handle).used

    def read() -> int:
        for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if process.pid == pid and process.usedGpuMemory is not None:
                return int(process.usedGpuMemory)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used) - baseline

    return read


@dataclass
class MemoryWatch:
    """Peaks of the NVML reading (sampled when `sample` is called) and of torch's allocator (`allocator_peak`
    reads it), against `limit_bytes`."""

    read_process: Callable[[], int]
    read_allocator_peak: Callable[[], int]
    limit_bytes: int
    nvml_peak: int = 0

    def sample(self) -> int:
        used = self.read_process()
        self.nvml_peak = max(self.nvml_peak, used)
        return used

    def report(self) -> dict:
        self.sample()
        allocator = self.read_allocator_peak()
        return {
            "nvml_peak_gib": self.nvml_peak / _GIB,
            "allocator_peak_gib": allocator / _GIB,
            "outside_allocator_gib": (self.nvml_peak - allocator) / _GIB,
            "limit_gib": self.limit_bytes / _GIB,
            "over_budget": self.nvml_peak > self.limit_bytes,
        }

    def describe(self) -> str:
        r = self.report()
        verdict = "OVER BUDGET" if r["over_budget"] else "within budget"
        return (
            f"NVML peak {r['nvml_peak_gib']:.2f} GiB (allocator peak {r['allocator_peak_gib']:.2f} GiB, "
            f"{r['outside_allocator_gib']:.2f} outside it) against {r['limit_gib']:.2f} GiB: {verdict}"
        )

    def check(self) -> None:
        """Raise `OverBudgetError` if the NVML peak went past the limit."""
        if self.report()["over_budget"]:
            raise OverBudgetError(self.describe())
