"""The AVX2 4-bit CPU expert kernel against dequantize-then-multiply, and its place in the miss split.

Stated tolerance: the kernel rounds the codebook and the activations to 12-bit integers (2047 levels a
block), so against dequantize-then-multiply its output has cosine similarity >= 0.99999 and relative error
<= 0.5% (measured about 0.1%); against a float reference of those same rounded values it agrees to float32
summation order (1e-5).
"""

import bitsandbytes.functional as bnbf
import pytest
import torch

from worker.engine.cpu_extension import host_has_avx2, host_isas
from worker.engine.moe_offload import cpu_experts, int4_extension
from worker.engine.moe_offload.cpu_expert_kernel import CODEBOOK_LEVELS, CpuExpertKernel
from worker.engine.moe_offload.cpu_experts import (
    calibrate_miss_split,
    cpu_experts_forward,
    dequantized_expert_forward,
)
from worker.engine.moe_offload.packing import QUANT_BLOCKSIZE, ExpertLayout, pack_expert, section_view

CPU = torch.device("cpu")
SILU = torch.nn.functional.silu
needs_avx2 = pytest.mark.skipif(not host_has_avx2(), reason="the kernel needs AVX2")


def _rows(layout: ExpertLayout, count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.empty((count, layout.row_bytes), dtype=torch.uint8)
    for row in rows:
        gate_up = torch.randn(2 * layout.intermediate, layout.hidden, generator=generator) * 0.05
        down = torch.randn(layout.hidden, layout.intermediate, generator=generator) * 0.05
        pack_expert(layout, gate_up, down, row)
    return rows


def _dequantized_mix(layout, rows, experts, weights, x) -> torch.Tensor:
    outputs = [w * dequantized_expert_forward(layout, rows[e], x, SILU) for e, w in zip(experts, weights, strict=True)]
    return torch.stack(outputs).sum(0)


def _kernel(layout: ExpertLayout) -> CpuExpertKernel:
    kernel = CpuExpertKernel.for_layout(layout)
    assert kernel is not None
    return kernel


@needs_avx2
@pytest.mark.parametrize("quant", ["nf4", "fp4"])
@pytest.mark.parametrize("hidden,intermediate", [(128, 64), (192, 320), (320, 192), (2048, 512)])
def test_kernel_matches_dequantize_then_multiply(quant, hidden, intermediate):
    layout = ExpertLayout(hidden, intermediate, quant)
    rows = _rows(layout, 3)
    experts, weights = [2, 0, 1], [0.5, 0.3, 0.2]
    x = torch.randn(1, hidden, generator=torch.Generator().manual_seed(1))
    got = _kernel(layout).forward(rows, experts, weights, x, SILU)
    want = _dequantized_mix(layout, rows, experts, weights, x)
    assert got.shape == (1, hidden) and got.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) >= 0.99999
    assert (got - want).norm() / want.norm() <= 5e-3


def _codes(layout: ExpertLayout, rows: torch.Tensor, name: str) -> torch.Tensor:
    """The 4-bit codes of matrix `name` in every row, in element order (first element in the high nibble)."""
    packed = section_view(rows, layout.sections[f"{name}_packed"]).long()
    return torch.stack([packed >> 4, packed & 15], dim=-1).reshape(rows.shape[0], -1)


def _rounded(values: torch.Tensor) -> torch.Tensor:
    """Per block of 64 along the last axis, rounded to 2047 levels of the block's largest magnitude."""
    blocks = values.reshape(*values.shape[:-1], -1, QUANT_BLOCKSIZE)
    scale = blocks.abs().amax(-1, keepdim=True) / CODEBOOK_LEVELS
    return ((blocks / scale).round() * scale).reshape(values.shape)


def _rounded_reference(layout, rows, experts, weights, x) -> torch.Tensor:
    """The kernel's arithmetic in float64: the rounded codebook, rounded activations, float scales."""
    table = (bnbf.get_4bit_type(layout.quant, device="cpu").double() * CODEBOOK_LEVELS).round() / CODEBOOK_LEVELS
    picked = rows[experts]
    matrices = []
    shapes = {"gate_up": (2 * layout.intermediate, layout.hidden), "down": (layout.hidden, layout.intermediate)}
    for name, shape in shapes.items():
        absmax = section_view(picked, layout.sections[f"{name}_absmax"]).double()
        weights_flat = table[_codes(layout, picked, name)] * absmax.repeat_interleave(QUANT_BLOCKSIZE, dim=-1)
        matrices.append(weights_flat.reshape(len(experts), *shape))
    gate, up = (matrices[0] @ _rounded(x.double())[0]).chunk(2, dim=-1)
    hidden = _rounded(SILU(gate) * up)
    down = torch.bmm(matrices[1], hidden.unsqueeze(-1)).squeeze(-1)
    return (torch.tensor(weights, dtype=torch.float64) @ down).unsqueeze(0)


@needs_avx2
@pytest.mark.parametrize("hidden,intermediate", [(128, 64), (192, 320)])
def test_kernel_is_exact_against_a_float_reference_of_its_rounded_values(hidden, intermediate):
    layout = ExpertLayout(hidden, intermediate, "nf4")
    rows = _rows(layout, 4, seed=2)
    experts, weights = [3, 1], [0.7, -0.25]
    x = torch.randn(1, hidden, generator=torch.Generator().manual_seed(3))
    got = _kernel(layout).forward(rows, experts, weights, x, SILU)
    want = _rounded_reference(layout, rows, experts, weights, x)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(len(host_isas()) < 2, reason="the host runs one build only")
@pytest.mark.parametrize("hidden,intermediate", [(128, 64), (192, 320), (2048, 512)])
def test_the_avx512_build_computes_what_the_avx2_build_does(hidden, intermediate):
    """Pairs of blocks at once, an odd block left to the AVX2 step: same integers, only the sums' order differs."""
    layout = ExpertLayout(hidden, intermediate, "nf4")
    rows = _rows(layout, 4, seed=5)
    experts, weights = [3, 0, 2], [0.5, 0.3, 0.2]
    x = torch.randn(1, hidden, generator=torch.Generator().manual_seed(6))
    outputs = [
        CpuExpertKernel(layout, int4_extension.load_nf4_matvec(isa)).forward(rows, experts, weights, x, SILU)
        for isa in ("AVX2", "AVX-512 VNNI")
    ]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)


@needs_avx2
def test_each_expert_reads_its_own_row():
    layout = ExpertLayout(128, 64, "nf4")
    rows = _rows(layout, 5)
    kernel = _kernel(layout)
    x = torch.randn(1, 128, generator=torch.Generator().manual_seed(4))
    alone = [kernel.forward(rows, [e], [1.0], x, SILU) for e in range(5)]
    for e in range(5):
        want = _dequantized_mix(layout, rows, [e], [1.0], x)
        assert (alone[e] - want).norm() / want.norm() <= 5e-3  # its own row: far closer than any other's
    together = kernel.forward(rows, [4, 2], [0.6, 0.4], x, SILU)
    torch.testing.assert_close(together, 0.6 * alone[4] + 0.4 * alone[2], rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="out of range"):
        kernel.forward(rows, [5], [1.0], x, SILU)


@pytest.mark.parametrize(
    "layout",
    [ExpertLayout(96, 64, "nf4"), ExpertLayout(128, 96, "nf4"), ExpertLayout(128, 64, "bf16")],
    ids=["hidden-96", "intermediate-96", "bf16"],
)
def test_layouts_the_kernel_does_not_cover_fall_back_to_dequantize_then_multiply(layout):
    assert CpuExpertKernel.for_layout(layout) is None
    rows = _rows(layout, 3)
    x = torch.randn(1, layout.hidden, generator=torch.Generator().manual_seed(5))
    got = cpu_experts_forward(layout, rows, [1, 2], [0.4, 0.6], x, SILU)
    torch.testing.assert_close(got, _dequantized_mix(layout, rows, [1, 2], [0.4, 0.6], x), rtol=1e-5, atol=1e-6)


@needs_avx2
def test_calibration_times_the_kernel(monkeypatch):
    layout = ExpertLayout(128, 64, "nf4")
    calls: list[int] = []
    original = CpuExpertKernel.forward

    def counted(self, rows, experts, *args):
        calls.append(len(experts))
        return original(self, rows, experts, *args)

    monkeypatch.setattr(CpuExpertKernel, "forward", counted)
    split = calibrate_miss_split("hybrid", layout, _rows(layout, 4), CPU, torch.float32, SILU)
    assert calls and set(calls) == {4}  # the samples at once, as a decode step sends its CPU share
    assert split.cpu_ms is not None and split.cpu_ms > 0


@pytest.mark.parametrize("copy_ms,cpu_ms,misses,on_cpu", [(0.05, 2.65, 10, 0), (0.05, 0.04, 10, 5), (0.3, 0.1, 8, 6)])
def test_hybrid_sends_misses_to_the_cpu_when_it_is_faster(monkeypatch, copy_ms, cpu_ms, misses, on_cpu):
    """Timings stubbed per expert (8 samples): a slow CPU gets none of a step's misses, a CPU as fast as the
    bus half, a CPU three times faster three quarters."""
    layout = ExpertLayout(128, 64, "nf4")
    monkeypatch.setattr(cpu_experts, "_time_copy", lambda rows, device: copy_ms * rows.shape[0])
    monkeypatch.setattr(cpu_experts, "_time_cpu", lambda layout, rows, dtype, act_fn: cpu_ms * rows.shape[0])
    split = calibrate_miss_split("hybrid", layout, _rows(layout, 8), CPU, torch.float32, SILU)
    assert split.cpu_share == pytest.approx(copy_ms / (copy_ms + cpu_ms))
    assert split.cpu_count(misses) == on_cpu


@needs_avx2
@pytest.mark.parametrize("tokens", [1, 2, 7])
def test_routed_tokens_grouped_by_expert_match_dequantize_then_multiply(tokens):
    """A prompt's tokens through their own top-k experts in one call (each expert's tokens together, nothing
    dequantized): per token, the weighted sum of its experts as dequantize-then-multiply gives it."""
    layout = ExpertLayout(256, 128, "nf4")
    rows = _rows(layout, 6)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, layout.hidden, generator=generator)
    top_k_index = torch.stack([torch.randperm(6, generator=generator)[:3] for _ in range(tokens)])
    top_k_weights = torch.rand(tokens, 3, generator=generator)
    got = _kernel(layout).forward_routed(rows, top_k_index, top_k_weights, x, SILU)
    assert got.shape == (tokens, layout.hidden) and got.dtype == torch.float32
    for t in range(tokens):
        want = _dequantized_mix(layout, rows, top_k_index[t].tolist(), top_k_weights[t].tolist(), x[t : t + 1])
        relative = (got[t] - want[0]).norm() / want.norm()
        assert relative <= 5e-3, f"token {t}: relative error {relative:.2e}"
