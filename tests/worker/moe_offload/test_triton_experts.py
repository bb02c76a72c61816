"""The fused Triton kernels for decode's experts against the torch path (dequantize, then multiply).

On the CPU they run in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py); with
MOE_TEST_DEVICE=cuda they are compiled for the GPU.
"""

import pytest
import torch

from tests.worker.moe_offload.conftest import TEST_DEVICE
from worker.engine.moe_offload.budget import MemoryPlan
from worker.engine.moe_offload.builder import build_offloaded_model, fused_decode_kernels
from worker.engine.moe_offload.config import OffloadConfig
from worker.engine.moe_offload.offloaded_experts import OffloadedExperts, mix_decode, mix_decode_table
from worker.engine.moe_offload.packing import ExpertLayout, pack_expert
from worker.engine.moe_offload.pinning import mapped_device_view

pytest.importorskip("triton")
from worker.engine.moe_offload import triton_experts  # noqa: E402


def _rows(layout: ExpertLayout, count: int) -> torch.Tensor:
    rows = torch.zeros(count, layout.row_bytes, dtype=torch.uint8)
    for row in rows:
        pack_expert(
            layout,
            torch.randn(2 * layout.intermediate, layout.hidden),
            torch.randn(layout.hidden, layout.intermediate),
            row,
        )
    return rows.to(TEST_DEVICE)


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_fused_kernels_compute_what_dequantize_then_multiply_does(quant, dtype):
    torch.manual_seed(0)
    layout = ExpertLayout(hidden=128, intermediate=64, quant=quant)
    rows = _rows(layout, 6)
    slots, positions = [4, 1, 3, 0], [5, 0, 2, 7]  # any order, any slot: read where they sit
    indices = torch.tensor(slots + positions, device=TEST_DEVICE)
    flat_weights = torch.rand(8, device=TEST_DEVICE).to(dtype)
    x = torch.randn(1, layout.hidden, device=TEST_DEVICE, dtype=dtype)

    code = triton_experts.code_table(layout, TEST_DEVICE)
    fused = triton_experts.fused_mix_decode(layout, code, triton_experts.Blocks(), rows, indices, flat_weights, x)
    reference = mix_decode(layout, torch.nn.SiLU(), torch.float32, rows, indices, flat_weights.float(), x.float())
    assert fused.shape == (1, layout.hidden) and fused.dtype == dtype
    # float32 sums in another order; bfloat16 input and output rounding on top
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(fused.float(), reference, rtol=tolerance, atol=tolerance * reference.abs().max().item())


@torch.inference_mode()
def test_table_mode_reads_each_expert_from_its_slot_or_else_from_host_memory():
    """A decode step that never leaves the device: experts by id, a table of their slots (-1: none), the rows of
    the ones without a slot read in host memory (gathered into device memory first by the kernels). Both paths
    must give what the same experts give from slots."""
    torch.manual_seed(0)
    layout = ExpertLayout(hidden=128, intermediate=64, quant="nf4")
    host = _rows(layout, 8)  # every expert's row, by id
    table = torch.full((8,), -1, dtype=torch.int32, device=TEST_DEVICE)
    buffer = torch.zeros(3, layout.row_bytes, dtype=torch.uint8, device=TEST_DEVICE)
    for slot, expert in enumerate([6, 2, 5]):  # three experts resident, in slots unrelated to their ids
        buffer[slot] = host[expert]
        table[expert] = slot
    host_only = host.clone()
    host_only[[6, 2, 5]] = 0  # so a resident expert read from host memory would show
    if TEST_DEVICE.type == "cuda":  # where graph decode keeps them: host RAM, mapped for the device
        host_only = mapped_device_view(host_only.cpu(), TEST_DEVICE)
    experts = torch.tensor([2, 7, 6, 0], device=TEST_DEVICE)  # two resident, two not
    positions = torch.arange(4, device=TEST_DEVICE)
    flat_weights, x = torch.rand(4, device=TEST_DEVICE), torch.randn(1, layout.hidden, device=TEST_DEVICE)

    reference = mix_decode(
        layout, torch.nn.SiLU(), torch.float32, host, torch.cat([experts, positions]), flat_weights, x
    )
    scratch = torch.zeros(4, layout.row_bytes, dtype=torch.uint8, device=TEST_DEVICE)
    through_torch = mix_decode_table(
        layout, torch.nn.SiLU(), torch.float32, buffer, host_only, scratch, experts, table, positions, flat_weights, x
    )
    torch.testing.assert_close(through_torch, reference)
    # the torch path leaves every routed expert's host row in the scratch, by position
    torch.testing.assert_close(scratch.cpu(), host_only.cpu()[[2, 7, 6, 0]])
    scratch.zero_()
    code = triton_experts.code_table(layout, TEST_DEVICE)
    through_kernels = triton_experts.fused_mix_decode_table(
        layout, code, triton_experts.Blocks(), buffer, host_only, scratch, experts, table, positions, flat_weights, x
    )
    torch.testing.assert_close(through_kernels, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())
    # the kernels gather only the experts without a slot (positions 1 and 3), where the refills will find them
    assert torch.equal(scratch[[1, 3]].cpu(), host[[7, 0]].cpu()) and not scratch[[0, 2]].any()


@pytest.mark.slow
@torch.inference_mode()
def test_offloaded_model_decodes_the_same_through_the_kernels(converted):
    """The tiny Qwen3-Next (hidden 256, intermediate 128, NF4) with EXPERT_KERNEL=triton against torch."""
    models = {
        kernel: build_offloaded_model(
            converted("nf4"),
            TEST_DEVICE,
            torch.float32,
            MemoryPlan(6),
            OffloadConfig(misses="copy", kernel=kernel, decode="host"),
        ).model
        for kernel in ("triton", "torch")
    }
    fused = [m for m in models["triton"].modules() if isinstance(m, OffloadedExperts)]
    assert fused and all(m.uses_fused_kernels for m in fused)

    prompt = torch.randint(1, 390, (1, 10), generator=torch.Generator().manual_seed(1)).to(TEST_DEVICE)
    tokens = {
        kernel: model.generate(
            prompt, max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True
        )
        for kernel, model in models.items()
    }
    assert torch.equal(tokens["triton"].sequences, tokens["torch"].sequences)
    for fused_logits, torch_logits in zip(tokens["triton"].logits, tokens["torch"].logits, strict=True):
        torch.testing.assert_close(fused_logits, torch_logits, rtol=1e-4, atol=1e-4)


def test_auto_takes_the_kernels_only_after_they_pass_their_check_and_win_here(monkeypatch):
    layout = ExpertLayout(hidden=128, intermediate=64, quant="nf4")
    assert triton_experts.check_against_torch(layout, TEST_DEVICE) < 1e-4

    def broken(*args):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(triton_experts, "check_against_torch", broken)
    cuda = torch.device("cuda")  # auto only considers them on CUDA; the check is what fails here
    monkeypatch.setattr(triton_experts, "tune", lambda *args: triton_experts.Tuning(triton_experts.Blocks(), 1.0, 2.0))
    assert fused_decode_kernels("auto", layout, cuda, "silu", 4) is None
    with pytest.raises(RuntimeError, match="no kernel"):
        fused_decode_kernels("triton", layout, cuda, "silu", 4)
    bf16_rows = ExpertLayout(hidden=128, intermediate=64, quant="bf16")
    assert fused_decode_kernels("auto", bf16_rows, cuda, "silu", 4) is None

    # right, but slower than dequantize-then-multiply on this device: auto keeps the torch path
    monkeypatch.setattr(triton_experts, "check_against_torch", lambda *args: 0.0)
    monkeypatch.setattr(triton_experts, "tune", lambda *args: triton_experts.Tuning(triton_experts.Blocks(), 2.0, 1.0))
    assert fused_decode_kernels("auto", layout, cuda, "silu", 4) is None


@pytest.mark.skipif(TEST_DEVICE.type != "cuda", reason="times the kernels with CUDA events (gpu_check.sh runs it)")
@torch.inference_mode()
def test_tuning_picks_blocks_that_compute_right():
    layout = ExpertLayout(hidden=2048, intermediate=512, quant="nf4")  # Qwen3-Next's experts
    tuning = triton_experts.tune(layout, TEST_DEVICE, 10)
    assert tuning.blocks in triton_experts.CANDIDATES and tuning.blocks.fits(layout)
    assert tuning.fused_ms > 0 and tuning.torch_ms > 0
    assert triton_experts.check_against_torch(layout, TEST_DEVICE, tuning.blocks, experts=10) < 1e-4
