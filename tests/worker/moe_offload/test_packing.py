import bitsandbytes.functional as bnbf
import pytest
import torch

from worker.engine.moe_offload.packing import QUANT_BLOCKSIZE, ExpertLayout, pack_expert, unpack_experts

HIDDEN, INTERMEDIATE = 128, 64


def _pack(layout: ExpertLayout, count: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(count, 2 * INTERMEDIATE, HIDDEN, generator=generator) * 0.02
    down = torch.randn(count, HIDDEN, INTERMEDIATE, generator=generator) * 0.02
    rows = torch.empty(count, layout.row_bytes, dtype=torch.uint8)
    for i in range(count):
        pack_expert(layout, gate_up[i], down[i], rows[i])
    return gate_up, down, rows


def test_nf4_row_is_4_5_bits_per_weight_and_sections_are_aligned():
    layout = ExpertLayout(HIDDEN, INTERMEDIATE, "nf4")
    weights = 3 * HIDDEN * INTERMEDIATE
    assert layout.row_bytes == weights // 2 + weights // QUANT_BLOCKSIZE * 4
    assert all(section.offset % 16 == 0 for section in layout.sections.values())


def test_bf16_rows_round_trip_exactly_for_bf16_values():
    layout = ExpertLayout(HIDDEN, INTERMEDIATE, "bf16")
    gate_up, down, rows = _pack(layout, 3)
    got_gate_up, got_down = unpack_experts(layout, rows, torch.float32)
    assert torch.equal(got_gate_up, gate_up.to(torch.bfloat16).float())
    assert torch.equal(got_down, down.to(torch.bfloat16).float())


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_4bit_rows_hold_what_bitsandbytes_gives_for_each_matrix(quant):
    layout = ExpertLayout(HIDDEN, INTERMEDIATE, quant)
    gate_up, down, rows = _pack(layout, 4)
    # Unpacking several experts at once (one dequantize call) gives each one's own bnb round trip.
    got_gate_up, got_down = unpack_experts(layout, rows[[3, 1]], torch.float32)
    for position, expert in enumerate([3, 1]):
        for got, original in ((got_gate_up, gate_up), (got_down, down)):
            packed, state = bnbf.quantize_4bit(
                original[expert], blocksize=QUANT_BLOCKSIZE, quant_type=quant, compress_statistics=False
            )
            assert torch.equal(got[position], bnbf.dequantize_4bit(packed, state))
    error = (got_gate_up - gate_up[[3, 1]]).abs().max()
    assert 0 < error < 0.25 * gate_up.abs().max()


def test_pack_rejects_wrong_shapes():
    layout = ExpertLayout(HIDDEN, INTERMEDIATE, "nf4")
    row = torch.empty(layout.row_bytes, dtype=torch.uint8)
    with pytest.raises(ValueError, match="expected"):
        pack_expert(layout, torch.zeros(INTERMEDIATE, HIDDEN), torch.zeros(HIDDEN, INTERMEDIATE), row)
