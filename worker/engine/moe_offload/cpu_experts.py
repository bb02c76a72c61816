"""Experts computed on the CPU straight from their host rows, for misses that cost more to copy than to compute.

A missed expert can cross the bus (one row copy) or stay in host RAM and be applied there to the token's
hidden state (a 4-bit matvec, bound by reading the row). Which wins depends on the machine: the PCIe
bandwidth against the CPU's 4-bit matvec speed. `calibrate_miss_split` times both once at load and
splits the misses so that both sides finish together (the hybrid path of the cost model).
The expert is dequantized, then multiplied: far slower per expert than copying it over PCIe, so machines
measured so far copy nearly everything (benchmarks/results/README.md). bitsandbytes' fused CPU `gemv_4bit` is
not used: on AVX512-BF16 CPUs it expects weights repacked into its own CPU layout, and on our rows it gave
wrong results; elsewhere it dequantizes then multiplies anyway.
"""

import logging
import time
from dataclasses import dataclass

import torch

from worker.engine.moe_offload.config import MissMode
from worker.engine.moe_offload.packing import ExpertLayout, unpack_experts

log = logging.getLogger(__name__)


def cpu_expert_forward(layout: ExpertLayout, row: torch.Tensor, x: torch.Tensor, act_fn) -> torch.Tensor:
    """One expert applied to `x` [tokens, hidden] on the CPU, from its host row; returns [tokens, hidden]."""
    gate_up, down = unpack_experts(layout, row.unsqueeze(0), x.dtype)
    gate, up = torch.nn.functional.linear(x, gate_up[0]).chunk(2, dim=-1)
    return torch.nn.functional.linear(act_fn(gate) * up, down[0])


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
    x = torch.randn(1, layout.hidden, dtype=dtype)
    cpu_expert_forward(layout, rows[0], x, act_fn)  # warm-up
    start = time.perf_counter()
    for row in rows:
        cpu_expert_forward(layout, row, x, act_fn)
    return (time.perf_counter() - start) * 1000


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
