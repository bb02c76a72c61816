"""Experts applied on the CPU from their host rows, and the copy/CPU split timed at load."""

import pytest
import torch

from worker.engine.moe_offload.cpu_experts import MissSplit, calibrate_miss_split, cpu_expert_forward
from worker.engine.moe_offload.packing import ExpertLayout, pack_expert, unpack_experts

CPU = torch.device("cpu")
SILU = torch.nn.functional.silu


def _rows(layout: ExpertLayout, count: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    rows = torch.empty((count, layout.row_bytes), dtype=torch.uint8)
    for row in rows:
        gate_up = torch.randn(2 * layout.intermediate, layout.hidden, generator=generator) * 0.05
        down = torch.randn(layout.hidden, layout.intermediate, generator=generator) * 0.05
        pack_expert(layout, gate_up, down, row)
    return rows


@pytest.mark.parametrize("quant", ["nf4", "fp4", "bf16"])
def test_cpu_expert_equals_the_unpacked_expert(quant):
    layout = ExpertLayout(128, 64, quant)
    rows = _rows(layout, 3)
    x = torch.randn(5, layout.hidden, generator=torch.Generator().manual_seed(1))
    gate_up, down = unpack_experts(layout, rows, torch.float32)
    for i in range(3):
        gate, up = (x @ gate_up[i].T).chunk(2, dim=-1)
        want = (SILU(gate) * up) @ down[i].T
        got = cpu_expert_forward(layout, rows[i], x, SILU)
        assert got.shape == (5, layout.hidden)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fixed_modes_need_no_timing_and_auto_on_the_cpu_copies():
    layout = ExpertLayout(128, 64, "nf4")
    rows = _rows(layout, 4)
    assert calibrate_miss_split("copy", layout, rows, CPU, torch.float32, SILU) == MissSplit("copy", 0.0)
    assert calibrate_miss_split("cpu", layout, rows, CPU, torch.float32, SILU) == MissSplit("cpu", 1.0)
    assert calibrate_miss_split("auto", layout, rows, CPU, torch.float32, SILU) == MissSplit("copy", 0.0)


def test_hybrid_splits_by_the_measured_times():
    layout = ExpertLayout(128, 64, "nf4")
    split = calibrate_miss_split("hybrid", layout, _rows(layout, 4), CPU, torch.float32, SILU)
    assert split.copy_ms > 0 and split.cpu_ms > 0
    assert split.cpu_share == pytest.approx(split.copy_ms / (split.copy_ms + split.cpu_ms))
    assert "computed on the CPU" in split.describe()


def test_cpu_count_rounds_the_share_of_each_steps_misses_down():
    assert MissSplit("hybrid", 0.3).cpu_count(10) == 3
    assert MissSplit("hybrid", 0.5).cpu_count(7) == 3  # 4 on the CPU would outlast 3 copies
    assert MissSplit("hybrid", 0.1).cpu_count(8) == 0  # a slow CPU gets nothing
    assert MissSplit("cpu", 1.0).cpu_count(7) == 7
    assert MissSplit("copy", 0.0).cpu_count(7) == 0
