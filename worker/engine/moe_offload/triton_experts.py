"""Decode's routed experts in two Triton kernels that read the 4-bit rows where they sit in the slot buffer.

The torch path (`offloaded_experts.mix_decode`) dequantizes the token's experts to 16-bit weights, then
multiplies: for Qwen3-Next's 10 experts a layer that writes and reads back 63 MB to use 17.7 MB of 4-bit
rows, ~6.9 GB a token. These kernels unpack the nibbles in registers instead (NF4 or FP4 code table, one
float32 absmax per 64 weights, as bitsandbytes packs them): 17.7 MB a layer. On a 16 GB card, whose memory
bandwidth is a fraction of a datacenter GPU's, the torch path's extra traffic would take most of the decode
budget.

- `_gate_up_kernel`, one program per (expert, block of intermediate rows): h = silu(gate x) * (up x).
- `_down_kernel`, one program per block of output rows, looping over the experts: y = sum_e w_e down_e h_e.

A row's bytes (`packing.ExpertLayout`): gate_up [2I, H] then down [H, I], each as packed nibbles (element
i of the row-major matrix in byte i // 2, the even element in the high nibble) and float32 absmax per 64.
"""

import logging
from dataclasses import dataclass
from functools import cache

import torch
import triton
import triton.language as tl
from bitsandbytes.functional import get_4bit_type

from worker.engine.moe_offload.offloaded_experts import mix_decode
from worker.engine.moe_offload.packing import QUANT_BLOCKSIZE, ExpertLayout, pack_expert

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Blocks:
    """Rows of the matrix each program computes, per kernel, and warps per program. The default gives 160
    gate/up programs (10 experts x 16) and 128 down programs at Qwen3-Next's shapes, about one per SM of a
    datacenter GPU; `tune` times the candidates on the device at hand."""

    gate_up_rows: int = 32
    down_rows: int = 16
    warps: int = 4

    def fits(self, layout: ExpertLayout) -> bool:
        return layout.intermediate % self.gate_up_rows == 0 and layout.hidden % self.down_rows == 0


CANDIDATES = tuple(Blocks(g, d, w) for g in (16, 32, 64) for d in (8, 16) for w in (2, 4))


# Where a kernel finds the i-th expert's row: `experts_ptr` holds slots of the buffer, or (GATHERED) expert ids
# whose slots `table_ptr` gives, -1 for none, such an expert's row being row i of what `_gather_kernel` gathered.
GATHER_CHUNK = 8192  # bytes of a row each gathering program copies


@triton.jit
def _row(buf_u8, buf_f32, gathered_u8, gathered_f32, experts_ptr, table_ptr, i, row_bytes, GATHERED: tl.constexpr):
    """Byte and float32 pointers to the i-th expert's row."""
    index = tl.load(experts_ptr + i).to(tl.int64)
    if GATHERED:
        slot = tl.load(table_ptr + index).to(tl.int64)
        resident = slot >= 0
        u8 = tl.where(resident, buf_u8 + slot * row_bytes, gathered_u8 + i * row_bytes)
        f32 = tl.where(resident, buf_f32 + slot * (row_bytes // 4), gathered_f32 + i * (row_bytes // 4))
    else:
        u8 = buf_u8 + index * row_bytes
        f32 = buf_f32 + index * (row_bytes // 4)
    return u8, f32


@triton.jit
def _gather_kernel(host_u8, gathered_u8, experts_ptr, table_ptr, row_bytes, CHUNK: tl.constexpr):
    """Row i of `gathered` = the i-th expert's row in host memory, for each expert without a slot: whole rows in
    long contiguous loads: the expert kernels reading mapped host rows themselves fetch 32 bytes of a row at a
    time, which the bus serves far below its copy bandwidth (`benchmarks/zero_copy_probe.py` measures both)."""
    i = tl.program_id(0)
    expert = tl.load(experts_ptr + i).to(tl.int64)
    if tl.load(table_ptr + expert) < 0:
        offsets = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
        mask = offsets < row_bytes
        row = tl.load(host_u8 + expert * row_bytes + offsets, mask=mask)
        tl.store(gathered_u8 + i * row_bytes + offsets, row, mask=mask)


@triton.jit
def _dot_block(row_u8, row_f32, code_ptr, packed_off, absmax_off, rows, row_len, k0, x_even, x_odd):
    """Rows `rows` of a packed [*, row_len] matrix times the vector block at columns k0..k0+63 (split into its
    even and odd elements): one absmax block per row."""
    half = tl.arange(0, 32)
    flat = rows[:, None].to(tl.int64) * row_len + k0
    packed = tl.load(row_u8 + packed_off + flat // 2 + half[None, :]).to(tl.int32)
    high = tl.load(code_ptr + (packed >> 4))
    low = tl.load(code_ptr + (packed & 15))
    partial = tl.sum(high * x_even[None, :] + low * x_odd[None, :], axis=1)
    absmax = tl.load(row_f32 + absmax_off // 4 + (rows.to(tl.int64) * row_len + k0) // 64)
    return partial * absmax


@triton.jit
def _gate_up_kernel(
    buf_u8,
    buf_f32,
    gathered_u8,
    gathered_f32,
    code_ptr,
    experts_ptr,
    table_ptr,
    x_ptr,
    h_ptr,
    row_bytes,
    packed_off,
    absmax_off,
    HIDDEN: tl.constexpr,
    INTER: tl.constexpr,
    BLOCK: tl.constexpr,
    GATHERED: tl.constexpr,
):
    expert = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    row_u8, row_f32 = _row(
        buf_u8, buf_f32, gathered_u8, gathered_f32, experts_ptr, table_ptr, expert, row_bytes, GATHERED
    )
    half = tl.arange(0, 32)
    gate = tl.zeros([BLOCK], dtype=tl.float32)
    up = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, HIDDEN, 64):
        x_even = tl.load(x_ptr + k0 + 2 * half).to(tl.float32)
        x_odd = tl.load(x_ptr + k0 + 2 * half + 1).to(tl.float32)
        gate += _dot_block(row_u8, row_f32, code_ptr, packed_off, absmax_off, rows, HIDDEN, k0, x_even, x_odd)
        up += _dot_block(row_u8, row_f32, code_ptr, packed_off, absmax_off, rows + INTER, HIDDEN, k0, x_even, x_odd)
    h = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(h_ptr + expert * INTER + rows, h)


@triton.jit
def _down_kernel(
    buf_u8,
    buf_f32,
    gathered_u8,
    gathered_f32,
    code_ptr,
    experts_ptr,
    table_ptr,
    positions_ptr,
    weights_ptr,
    h_ptr,
    y_ptr,
    row_bytes,
    packed_off,
    absmax_off,
    EXPERTS: tl.constexpr,
    HIDDEN: tl.constexpr,
    INTER: tl.constexpr,
    BLOCK: tl.constexpr,
    GATHERED: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    half = tl.arange(0, 32)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for expert in range(EXPERTS):
        row_u8, row_f32 = _row(
            buf_u8, buf_f32, gathered_u8, gathered_f32, experts_ptr, table_ptr, expert, row_bytes, GATHERED
        )
        weight = tl.load(weights_ptr + tl.load(positions_ptr + expert)).to(tl.float32)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, INTER, 64):
            h_even = tl.load(h_ptr + expert * INTER + k0 + 2 * half)
            h_odd = tl.load(h_ptr + expert * INTER + k0 + 2 * half + 1)
            acc += _dot_block(row_u8, row_f32, code_ptr, packed_off, absmax_off, rows, INTER, k0, h_even, h_odd)
        total += weight * acc
    tl.store(y_ptr + rows, total.to(y_ptr.dtype.element_ty))


def supports(layout: ExpertLayout, hidden_act: str) -> bool:
    """4-bit rows of SiLU-gated experts whose sizes the kernels' blocks divide."""
    return (
        layout.is_4bit
        and hidden_act == "silu"
        and QUANT_BLOCKSIZE == 64
        and layout.hidden % 64 == 0
        and layout.intermediate % 64 == 0
        and Blocks().fits(layout)
    )


def fused_mix_decode(
    layout: ExpertLayout,
    code: torch.Tensor,
    blocks: Blocks,
    buffer: torch.Tensor,
    indices: torch.Tensor,
    flat_weights: torch.Tensor,
    x: torch.Tensor,
) -> torch.Tensor:
    """`offloaded_experts.mix_decode` for 4-bit rows: the same [1, H] result, from the rows in place."""
    experts = indices.shape[0] // 2
    return _launch(layout, code, blocks, buffer, buffer, indices[:experts], None, indices[experts:], flat_weights, x)


def fused_mix_decode_table(
    layout: ExpertLayout,
    code: torch.Tensor,
    blocks: Blocks,
    buffer: torch.Tensor,
    host: torch.Tensor,
    scratch: torch.Tensor,
    experts: torch.Tensor,
    table: torch.Tensor,
    positions: torch.Tensor,
    flat_weights: torch.Tensor,
    x: torch.Tensor,
) -> torch.Tensor:
    """`offloaded_experts.mix_decode_table` for 4-bit rows: each expert's row read from its slot in `buffer`
    where `table` gives one, else from `host` (page-locked host memory mapped for the device), gathered into
    `scratch` (row i for the i-th expert, in device memory; kept for the refills after the step) by
    `_gather_kernel` first."""
    count = experts.shape[0]
    _gather_kernel[(count, triton.cdiv(layout.row_bytes, GATHER_CHUNK))](
        host, scratch, experts, table, layout.row_bytes, CHUNK=GATHER_CHUNK
    )
    return _launch(layout, code, blocks, buffer, scratch, experts, table, positions, flat_weights, x)


def _launch(
    layout: ExpertLayout,
    code: torch.Tensor,
    blocks: Blocks,
    buffer: torch.Tensor,
    gathered: torch.Tensor,
    experts: torch.Tensor,
    table: torch.Tensor | None,
    positions: torch.Tensor,
    flat_weights: torch.Tensor,
    x: torch.Tensor,
) -> torch.Tensor:
    """The two expert kernels; with a `table`, experts by id and the rows of those without a slot in `gathered`,
    else slots of `buffer` (and `gathered` unused)."""
    count = experts.shape[0]
    hidden, inter = layout.hidden, layout.intermediate
    sections = layout.sections
    h = torch.empty((count, inter), dtype=torch.float32, device=x.device)
    y = torch.empty((1, hidden), dtype=x.dtype, device=x.device)
    gathers = table is not None
    # float32 views for the absmax sections, 16-byte aligned in every row
    rows = (
        buffer,
        buffer.view(torch.float32),
        gathered,
        gathered.view(torch.float32),
        code,
        experts,
        table if table is not None else experts,
    )
    _gate_up_kernel[(count, inter // blocks.gate_up_rows)](
        *rows,
        x,
        h,
        layout.row_bytes,
        sections["gate_up_packed"].offset,
        sections["gate_up_absmax"].offset,
        HIDDEN=hidden,
        INTER=inter,
        BLOCK=blocks.gate_up_rows,
        GATHERED=gathers,
        num_warps=blocks.warps,
    )
    _down_kernel[(hidden // blocks.down_rows,)](
        *rows,
        positions,
        flat_weights,
        h,
        y,
        layout.row_bytes,
        sections["down_packed"].offset,
        sections["down_absmax"].offset,
        EXPERTS=count,
        HIDDEN=hidden,
        INTER=inter,
        BLOCK=blocks.down_rows,
        GATHERED=gathers,
        num_warps=blocks.warps,
    )
    return y


def _sample(layout: ExpertLayout, device: torch.device, experts: int) -> tuple[torch.Tensor, ...]:
    """Random experts' rows on `device`, the routing of one token to all of them in reverse slot order, and
    the token: what `fused_mix_decode` takes after `blocks`."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.zeros(experts, layout.row_bytes, dtype=torch.uint8)
    for row in rows:
        pack_expert(
            layout,
            torch.randn(2 * layout.intermediate, layout.hidden, generator=generator),
            torch.randn(layout.hidden, layout.intermediate, generator=generator),
            row,
        )
    indices = torch.tensor([*reversed(range(experts)), *range(experts)])
    weights = torch.rand(experts, generator=generator)
    x = torch.randn(1, layout.hidden, generator=generator)
    return tuple(tensor.to(device) for tensor in (rows, indices, weights, x))


def check_against_torch(
    layout: ExpertLayout, device: torch.device, blocks: Blocks = Blocks(), experts: int = 3
) -> float:
    """Run the kernels once here on random rows of `layout` and compare them with dequantize-then-multiply;
    returns the largest difference relative to the output's scale, and raises past 1e-3 (float32 math on
    both sides, summed in another order: ~1e-6)."""
    sample = _sample(layout, device, experts)
    fused = fused_mix_decode(layout, code_table(layout, device), blocks, *sample)
    reference = mix_decode(layout, torch.nn.SiLU(), torch.float32, *sample)
    error = ((fused - reference).abs().max() / reference.abs().max()).item()
    if not error <= 1e-3:
        raise RuntimeError(f"the Triton expert kernels disagree with dequantize-then-multiply: {error:.2e}")
    return error


@dataclass(frozen=True)
class Tuning:
    blocks: Blocks  # the fastest candidate
    fused_ms: float  # its time for one token through the experts
    torch_ms: float  # dequantize-then-multiply's, in bf16, on the same rows


def _time_ms(run, repeats: int) -> float:
    run()  # compiles, the first time
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


@cache
def tune(layout: ExpertLayout, device: torch.device, experts: int, repeats: int = 20) -> Tuning:
    """The fastest of `CANDIDATES` for one token through `experts` experts on this CUDA device (compiling
    each once; Triton keeps them on disk), beside the torch path's time. CUDA events; once per shape."""
    code = code_table(layout, device)
    rows, indices, weights, x = _sample(layout, device, experts)
    timings = {
        blocks: _time_ms(lambda b=blocks: fused_mix_decode(layout, code, b, rows, indices, weights, x), repeats)
        for blocks in CANDIDATES
        if blocks.fits(layout)
    }
    best = min(timings, key=timings.__getitem__)
    x16 = x.to(torch.bfloat16)
    torch_ms = _time_ms(
        lambda: mix_decode(layout, torch.nn.SiLU(), torch.bfloat16, rows, indices, weights, x16), repeats
    )
    log.info(
        "Expert kernels for %d experts, one token: Triton %s %.1f us (default %.1f us, slowest %.1f us); "
        "dequantize-then-multiply %.1f us",
        experts,
        best,
        timings[best] * 1000,
        timings.get(Blocks(), float("nan")) * 1000,
        max(timings.values()) * 1000,
        torch_ms * 1000,
    )
    return Tuning(best, timings[best], torch_ms)


def code_table(layout: ExpertLayout, device: torch.device) -> torch.Tensor:
    """The 16 values a nibble stands for (NF4 or FP4), as bitsandbytes quantized against them."""
    return get_4bit_type(layout.quant, device="cpu").to(device=device, dtype=torch.float32)
