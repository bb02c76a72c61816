"""Experts computed on the CPU straight from their host rows, for misses that cost more to copy than to compute.

A missed expert can cross the bus (one row copy) or stay in host RAM and be applied there to the token's
hidden state (a 4-bit matvec, bound by reading the row). Which wins depends on the machine: the PCIe
bandwidth against the CPU's 4-bit matvec speed. `calibrate_miss_split` times both once at load and
splits the misses so that both sides finish together (the hybrid path of the cost model).
One decode token's CPU experts go through `CpuExpertKernel` (an AVX2 4-bit kernel reading the rows in
place) where the host and the layout allow; elsewhere each expert is dequantized by bitsandbytes, then
multiplied, which is far slower per expert than copying it over PCIe. bitsandbytes' fused CPU `gemv_4bit` is
not used: on AVX512-BF16 CPUs it expects weights repacked into its own CPU layout, and on our rows it gave
wrong results; elsewhere it dequantizes then multiplies anyway.
"""

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from worker.engine.moe_offload.config import MissMode
from worker.engine.moe_offload.cpu_expert_kernel import CpuExpertKernel
from worker.engine.moe_offload.packing import ExpertLayout, unpack_experts

log = logging.getLogger(__name__)


def dequantized_expert_forward(layout: ExpertLayout, row: torch.Tensor, x: torch.Tensor, act_fn) -> torch.Tensor:
    """One expert applied to `x` [tokens, hidden] on the CPU, dequantized from its host row, then multiplied."""
    gate_up, down = unpack_experts(layout, row.unsqueeze(0), x.dtype)
    gate, up = torch.nn.functional.linear(x, gate_up[0]).chunk(2, dim=-1)
    return torch.nn.functional.linear(act_fn(gate) * up, down[0])


def cpu_expert_forward(layout: ExpertLayout, row: torch.Tensor, x: torch.Tensor, act_fn) -> torch.Tensor:
    """One expert applied to `x` [tokens, hidden] on the CPU, from its host row; returns [tokens, hidden]
    (one token: by `CpuExpertKernel` where it applies, in float32)."""
    kernel = CpuExpertKernel.for_layout(layout) if x.shape[0] == 1 else None
    if kernel is None:
        return dequantized_expert_forward(layout, row, x, act_fn)
    return kernel.forward(row.unsqueeze(0), [0], [1.0], x, act_fn).to(x.dtype)


def cpu_experts_forward(
    layout: ExpertLayout,
    rows: torch.Tensor,
    experts: Sequence[int],
    weights: Sequence[float],
    x: torch.Tensor,
    act_fn,
) -> torch.Tensor:
    """One token `x` [1, hidden] through the `experts` of `rows` [experts, row_bytes] (host memory), each
    output times its routing weight, summed: [1, hidden] float32. All k in one `CpuExpertKernel` call where it
    applies, else one dequantize-then-multiply per expert."""
    kernel = CpuExpertKernel.for_layout(layout)
    if kernel is not None:
        return kernel.forward(rows, experts, weights, x, act_fn)
    total = torch.zeros((1, layout.hidden), dtype=torch.float32)
    for expert, weight in zip(experts, weights, strict=True):
        total += weight * dequantized_expert_forward(layout, rows[expert], x, act_fn).float()
    return total


def describe_cpu_path(layout: ExpertLayout) -> str:
    if CpuExpertKernel.for_layout(layout) is not None:
        return "the AVX2 4-bit kernel over the host rows"
    return "dequantized, then multiplied"


@dataclass(frozen=True)
class MissSplit:
    """What share of each step's misses is computed on the CPU rather than copied into a slot."""

    mode: MissMode  # as resolved: never "auto"
    cpu_share: float
    copy_ms: float | None = None  # measured per expert row
    cpu_ms: float | None = None  # measured per expert, one token

    def cpu_count(self, misses: int) -> int:
        """Rounded down: the CPU's n experts must not outlast the bus's (misses - n) copies, which holds
        while n <= misses * copy / (copy + cpu) = misses * cpu_share."""
        return min(misses, int(misses * self.cpu_share + 1e-9))

    def describe(self) -> str:
        timing = ""
        if self.copy_ms is not None and self.cpu_ms is not None:
            timing = f" (expert copy {self.copy_ms:.3f} ms, CPU expert {self.cpu_ms:.3f} ms)"
        return f"misses: {self.mode}, {self.cpu_share:.0%} computed on the CPU{timing}"


def calibrate_miss_split(
    mode: MissMode,
    layout: ExpertLayout,
    host_rows: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    act_fn,
    samples: int = 8,
) -> MissSplit:
    """copy: all misses copied; cpu: all computed on the CPU; hybrid: split by measured speeds so both sides
    finish together; auto: hybrid on a GPU, copy on the CPU device (where both sides are the same RAM)."""
    if mode == "auto":
        mode = "hybrid" if device.type == "cuda" else "copy"
    if mode == "copy":
        return MissSplit(mode, 0.0)
    log.info("CPU experts: %s", describe_cpu_path(layout))  # builds the kernel now, not at the first token
    if mode == "cpu":
        return MissSplit(mode, 1.0)
    samples = min(samples, host_rows.shape[0])
    copy_ms = _time_copy(host_rows[:samples], device) / samples
    cpu_ms = _time_cpu(layout, host_rows[:samples], dtype, act_fn) / samples
    split = MissSplit(mode, copy_ms / (copy_ms + cpu_ms), copy_ms, cpu_ms)
    log.info("Expert %s", split.describe())
    return split


def _time_copy(rows: torch.Tensor, device: torch.device) -> float:
    target = torch.empty_like(rows, device=device)
    target.copy_(rows, non_blocking=True)  # warm-up
    _sync(device)
    start = time.perf_counter()
    for i in range(rows.shape[0]):
        target[i].copy_(rows[i], non_blocking=True)
    _sync(device)
    return (time.perf_counter() - start) * 1000


def _time_cpu(layout: ExpertLayout, rows: torch.Tensor, dtype: torch.dtype, act_fn) -> float:
    """All of `rows` through the CPU path as a decode step sends its CPU share: at once, for one token."""
    x = torch.randn(1, layout.hidden, dtype=dtype)
    experts, weights = range(rows.shape[0]), [1.0] * rows.shape[0]
    cpu_experts_forward(layout, rows, experts, weights, x, act_fn)  # warm-up (builds the kernel at first use)
    times = []
    for _ in range(3):  # the fastest of three: a load-time measurement must not catch one stray stall
        start = time.perf_counter()
        cpu_experts_forward(layout, rows, experts, weights, x, act_fn)
        times.append((time.perf_counter() - start) * 1000)
    return min(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
